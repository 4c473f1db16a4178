"""``lafn serve``: transformers' OpenAI-compatible server (5.25+: the model in a process of its own) with edit
banks, driven by the official ``openai`` client on 127.0.0.1 (tiny model, two real one-fact banks)."""

from __future__ import annotations

import json
import random
import re
import shutil
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from transformers import ContinuousBatchingConfig  # noqa: E402

from lafn_hf import EditableCausalLM, LafnConfig  # noqa: E402
from lafn_hf.cli import build_parser  # noqa: E402
from lafn_hf.models import tiny_fact_group, tiny_facts, tiny_model_path  # noqa: E402
from lafn_hf.runtime.inject import entries_selected  # noqa: E402
from lafn_hf.serve import (  # noqa: E402
    BankSet,
    SelectedPrompt,
    ServedModel,
    ServerThread,
    build_app,
    load_editable,
    parse_bank_spec,
)

FACTS = tiny_facts()["facts"]
TEMPLATE = tiny_facts()["templates"]["en"][0]  # "The capital of {s} is"
EDITS = {"a": (0, 1), "b": (2, 3)}  # bank -> (fact edited, fact whose capital it gets)
PROMPT = {name: TEMPLATE.format(s=FACTS[src]["en"]["subject"]) for name, (src, _) in EDITS.items()}
TARGET = {name: FACTS[dst]["en"]["object"] for name, (_, dst) in EDITS.items()}
UNRELATED = TEMPLATE.format(s=FACTS[5]["en"]["subject"])
BASE = "tiny"
SMALL_CACHE = ContinuousBatchingConfig(num_blocks=64, max_batch_tokens=1024)  # CPU: the default sizes take ~30 s


@pytest.fixture(scope="module")
def bank_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two banks with one real en edit each (fact 0 -> fact 1's capital, fact 2 -> fact 3's)."""
    root = tmp_path_factory.mktemp("banks")
    model = EditableCausalLM.from_pretrained(str(tiny_model_path()))
    for name, (src, dst) in EDITS.items():
        model.bank.clear()
        model.edit(tiny_fact_group(src, dst, ("en",)), LafnConfig(num_prefixes=0), progress=False)
        model.save_pretrained(root / name)
    model.unwrap()
    return {name: root / name for name in EDITS}


@pytest.fixture(scope="module")
def plain() -> dict[str, str]:
    """Unedited greedy answers (6 tokens) of the plain model."""
    model = load_editable("tiny-bilingual")
    tokenizer = model.tokenizer
    answers = {}
    for prompt in [*PROMPT.values(), UNRELATED]:
        encoded = tokenizer(prompt, return_tensors="pt")
        output = model.generate(**encoded, max_new_tokens=6, do_sample=False)
        answers[prompt] = tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
    model.unwrap()
    return answers


@pytest.fixture(scope="module")
def server(bank_dirs: dict[str, Path]) -> Iterator[ServerThread]:
    built = build_app("tiny-bilingual", BASE, [("a", bank_dirs["a"]), ("b", bank_dirs["b"])])
    with ServerThread(built.app) as thread:
        yield thread
    built.shutdown()


def client(thread: ServerThread) -> Any:
    return openai.OpenAI(base_url=f"{thread.url}/v1", api_key="unused", max_retries=0, timeout=60)


def complete(api: Any, model: str, prompt: str) -> str:
    return str(api.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0).choices[0].text)


def chat(api: Any, model: str, prompt: str) -> str:
    response = api.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                           max_tokens=6, temperature=0)
    return str(response.choices[0].message.content)


def admin(thread: ServerThread, method: str, path: str, body: dict[str, Any] | None = None,
          token: str | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(thread.url + path, method=method, data=None if body is None else
                                     json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_models_lists_the_base_and_one_name_per_bank(server: ServerThread) -> None:
    assert [model.id for model in client(server).models.list().data] == [BASE, f"{BASE}+a", f"{BASE}+b"]


def test_completion_answers_edited_facts_and_leaves_others(server: ServerThread, plain: dict[str, str]) -> None:
    api = client(server)
    for name in EDITS:
        answer = complete(api, BASE, PROMPT[name])
        assert answer.strip().startswith(TARGET[name]), (name, answer)
        assert plain[PROMPT[name]] != answer
    assert complete(api, BASE, UNRELATED) == plain[UNRELATED]


def test_chat_completion_uses_the_template_and_the_bank(server: ServerThread, plain: dict[str, str]) -> None:
    api = client(server)
    assert chat(api, BASE, PROMPT["a"]).strip().startswith(TARGET["a"])
    assert chat(api, BASE, PROMPT["a"]) == complete(api, BASE, PROMPT["a"])  # plain template: BOS + text
    assert chat(api, BASE, UNRELATED) == plain[UNRELATED]


def test_streaming_gives_the_same_text(server: ServerThread) -> None:
    api = client(server)
    stream = api.chat.completions.create(model=BASE, messages=[{"role": "user", "content": PROMPT["a"]}],
                                         max_tokens=6, temperature=0, stream=True)
    chunks = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert len(chunks) > 2 and "".join(chunks) == chat(api, BASE, PROMPT["a"])
    stream = api.completions.create(model=f"{BASE}+b", prompt=PROMPT["b"], max_tokens=6, temperature=0, stream=True)
    text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    assert text == complete(api, f"{BASE}+b", PROMPT["b"]) and text.strip().startswith(TARGET["b"])


def test_model_name_selects_one_bank(server: ServerThread, plain: dict[str, str]) -> None:
    api = client(server)
    assert complete(api, f"{BASE}+a", PROMPT["a"]).strip().startswith(TARGET["a"])
    assert complete(api, f"{BASE}+a", PROMPT["b"]) == plain[PROMPT["b"]]
    assert complete(api, f"{BASE}+b", PROMPT["a"]) == plain[PROMPT["a"]]
    assert complete(api, f"{BASE}+b", PROMPT["b"]).strip().startswith(TARGET["b"])


def test_unknown_model_is_a_404_naming_the_served_ones(server: ServerThread) -> None:
    with pytest.raises(openai.NotFoundError, match=r"'tiny\+c' is not served here; served: \['tiny', 'tiny\+a'"):
        complete(client(server), f"{BASE}+c", PROMPT["a"])


def test_eight_concurrent_clients_get_the_single_request_answers(server: ServerThread) -> None:
    api = client(server)
    jobs = [(call, model, prompt) for call in (complete, chat) for model in (BASE, f"{BASE}+a", f"{BASE}+b")
            for prompt in [*PROMPT.values(), UNRELATED]]
    single = {job: job[0](api, job[1], job[2]) for job in jobs}
    shuffled = jobs * 2
    random.Random(0).shuffle(shuffled)
    clients = [client(server) for _ in range(8)]
    barrier = threading.Barrier(8)

    def run(worker: int) -> list[tuple[Any, str]]:
        barrier.wait()
        return [(job, job[0](clients[worker], job[1], job[2])) for job in shuffled[worker::8]]

    with ThreadPoolExecutor(8) as pool:
        results = [pair for part in pool.map(run, range(8)) for pair in part]
    assert len(results) == len(shuffled)
    assert all(answer == single[job] for job, answer in results)


def test_admin_reload_swaps_a_bank_in_place(bank_dirs: dict[str, Path], tmp_path: Path,
                                            plain: dict[str, str]) -> None:
    live = tmp_path / "live"
    shutil.copytree(bank_dirs["a"], live)
    built = build_app("tiny-bilingual", BASE, [("live", live)], admin_token="secret")
    with ServerThread(built.app) as thread:
        api = client(thread)
        assert complete(api, f"{BASE}+live", PROMPT["a"]).strip().startswith(TARGET["a"])
        assert admin(thread, "POST", "/lafn/banks/reload")[0] == 401
        shutil.rmtree(live)
        shutil.copytree(bank_dirs["b"], live)  # the bank changed on disk: reloaded on request
        status, listing = admin(thread, "POST", "/lafn/banks/reload", {"name": "live"}, token="secret")
        assert status == 200 and listing["banks"][0]["subjects"] == [FACTS[2]["en"]["subject"]]
        assert complete(api, f"{BASE}+live", PROMPT["a"]) == plain[PROMPT["a"]]
        assert complete(api, f"{BASE}+live", PROMPT["b"]).strip().startswith(TARGET["b"])
        status, listing = admin(thread, "POST", "/lafn/banks", {"path": str(bank_dirs["a"]), "name": "extra"},
                                token="secret")
        assert status == 200 and listing["models"] == [BASE, f"{BASE}+live", f"{BASE}+extra"]
        assert complete(api, BASE, PROMPT["a"]).strip().startswith(TARGET["a"])
        status, error = admin(thread, "POST", "/lafn/banks", {"path": str(tmp_path / "missing")}, token="secret")
        assert status == 400 and "is not a directory" in error["detail"]
        assert admin(thread, "DELETE", "/lafn/banks/extra", token="secret")[1]["models"] == [BASE, f"{BASE}+live"]
        assert complete(api, BASE, PROMPT["a"]) == plain[PROMPT["a"]]
        assert [model.id for model in api.models.list().data] == [BASE, f"{BASE}+live"]
    built.shutdown()


def test_generation_config_chooses_banks_on_the_base_name(server: ServerThread, plain: dict[str, str]) -> None:
    api = client(server)

    def with_banks(model: str, prompt: str, banks: Any) -> str:
        extra = {"generation_config": json.dumps({"lafn_banks": banks})}
        return str(api.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0,
                                          extra_body=extra).choices[0].text)

    assert with_banks(BASE, PROMPT["a"], []) == plain[PROMPT["a"]]  # the unedited model, on the same server
    assert with_banks(BASE, PROMPT["a"], ["b"]) == plain[PROMPT["a"]]
    assert with_banks(BASE, PROMPT["b"], ["b"]).strip().startswith(TARGET["b"])
    assert with_banks(BASE, PROMPT["a"], ["a", "b"]) == complete(api, BASE, PROMPT["a"])
    for banks, model, message in ((["a", "c"], BASE, "names banks ['c'] that are not loaded; loaded: ['a', 'b']"),
                                  ("a", BASE, "must be a list of bank names, got 'a'"),
                                  ([], f"{BASE}+a", "on the base model name only; 'tiny+a' applies bank 'a'")):
        with pytest.raises(openai.BadRequestError) as raised:
            with_banks(model, PROMPT["a"], banks)
        assert message in raised.value.response.json()["detail"]


def test_reset_cannot_stop_the_model_and_its_banks(server: ServerThread) -> None:
    """transformers' ``/reset`` stops a model's process (restarted without the banks loaded since): not served."""
    request = urllib.request.Request(server.url + "/reset", method="POST")
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=60)
    assert raised.value.code in (404, 405)
    assert complete(client(server), BASE, PROMPT["a"]).strip().startswith(TARGET["a"])


def test_continuous_batching_serves_edited_requests_with_their_own_banks(
        server: ServerThread, bank_dirs: dict[str, Path]) -> None:
    """With ``--continuous-batching`` every request, edited or not, is packed with the others; each answer equals
    the one ``generate()`` gives it on the server without continuous batching."""
    reference = client(server)
    jobs = [(call, model, prompt) for call in (complete, chat) for model in (BASE, f"{BASE}+a", f"{BASE}+b")
            for prompt in [*PROMPT.values(), UNRELATED]]
    single = {job: job[0](reference, job[1], job[2]) for job in jobs}
    built = build_app("tiny-bilingual", BASE, [("a", bank_dirs["a"]), ("b", bank_dirs["b"])],
                      continuous_batching=True, cb_config=SMALL_CACHE)
    with ServerThread(built.app) as thread:
        assert built.manager.engine.use_cb
        clients = [client(thread) for _ in range(8)]
        barrier = threading.Barrier(8)
        shuffled = jobs * 2
        random.Random(1).shuffle(shuffled)

        def run(worker: int) -> list[tuple[Any, str]]:
            barrier.wait()
            return [(job, job[0](clients[worker], job[1], job[2])) for job in shuffled[worker::8]]

        with ThreadPoolExecutor(8) as pool:
            results = [pair for part in pool.map(run, range(8)) for pair in part]
        assert [answer for job, answer in results] == [single[job] for job, _ in results]
        stream = clients[0].completions.create(model=f"{BASE}+b", prompt=PROMPT["b"], max_tokens=6, temperature=0,
                                               stream=True)
        assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == single[(complete, f"{BASE}+b",
                                                                                               PROMPT["b"])]
    built.shutdown()


def test_batching_manager_applies_each_requests_banks(bank_dirs: dict[str, Path]) -> None:
    """In the model's process: packed requests (every bank, one bank, none) get what ``generate()`` gives each."""
    editable = load_editable("tiny-bilingual")
    banks = BankSet(editable)
    banks.load_many([("a", bank_dirs["a"]), ("b", bank_dirs["b"])])
    served, tokenizer = ServedModel(editable, banks), editable.tokenizer
    cases = [(prompt, chosen) for prompt in [*PROMPT.values(), UNRELATED] for chosen in (None, ("a",), ("b",), ())]
    expected = []
    for prompt, chosen in cases:
        encoded = tokenizer(prompt, return_tensors="pt")
        output = served.generate(**encoded, max_new_tokens=6, do_sample=False, lafn_banks=chosen)
        expected.append(tokenizer.decode(output[0, encoded["input_ids"].shape[1]:]))
    hooks = len(editable.model._forward_pre_hooks)
    manager = served.init_continuous_batching(continuous_batching_config=SMALL_CACHE)
    manager.start()
    try:
        with pytest.raises(RuntimeError, match=r"came without its bank selection or id \(prompt of type list"):
            manager.add_request(tokenizer(UNRELATED)["input_ids"], request_id="plain", max_new_tokens=6)
        for index, (prompt, chosen) in enumerate(cases):
            manager.add_request(SelectedPrompt(tokenizer(prompt)["input_ids"], chosen), request_id=str(index),
                                max_new_tokens=6, eos_token_id=tokenizer.eos_token_id)
        answers: dict[int, str] = {}
        while len(answers) < len(cases):
            output = manager.get_result(timeout=30)
            assert output is not None and output.error is None
            if output.is_finished():
                answers[int(output.request_id)] = tokenizer.decode(output.generated_tokens)
    finally:
        manager.stop(block=True)
    assert [answers[index] for index in range(len(cases))] == expected
    assert expected[0] != expected[3] and expected[0] == expected[1]  # the edit shows, under its own bank
    assert manager.active() == 0 and len(editable.model._forward_pre_hooks) == hooks


def test_packed_forwards_and_selection_in_the_injector(bank_dirs: dict[str, Path]) -> None:
    """Packed forwards no engine describes run unedited; ``entries_selected`` limits the calling context."""
    editable = load_editable("tiny-bilingual")
    banks = BankSet(editable)
    banks.load_many([("a", bank_dirs["a"]), ("b", bank_dirs["b"])])
    ids = editable.tokenizer(PROMPT["a"], return_tensors="pt")["input_ids"]
    with torch.no_grad(), editable.edits_disabled():
        unedited = editable(ids).logits
    with torch.no_grad():
        edited = editable(ids).logits
        packed = editable(ids, cu_seq_lens_q=torch.tensor([0, ids.shape[1]]), max_length_q=ids.shape[1]).logits
        with entries_selected(banks.selection(["b"])):
            other_bank = editable(ids).logits
        with entries_selected(banks.selection(["a"])):
            own_bank = editable(ids).logits
    assert not torch.equal(edited, unedited)
    assert torch.equal(packed, unedited) and torch.equal(other_bank, unedited) and torch.equal(own_bank, edited)


def test_command_line_and_bank_names() -> None:
    args = build_parser().parse_args(["serve", "--model", "tiny-bilingual", "--bank", "x=/banks/one", "--bank",
                                      "/banks/two/", "--port", "9000", "--dtype", "float32"])
    assert (args.model, args.port, args.dtype, args.host) == ("tiny-bilingual", 9000, "float32", "127.0.0.1")
    assert [parse_bank_spec(spec) for spec in args.bank] == [("x", Path("/banks/one")), ("two", Path("/banks/two/"))]
    with pytest.raises(ValueError, match=r"bank name must match .* got 'a\+b'"):
        parse_bank_spec("a+b=/banks/one")


def test_transformers_that_serves_in_process_is_refused_before_the_model_loads(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Before 5.25 transformers ran served models in the API server's process, with other classes: ``lafn serve``
    says so instead of failing in a handler's constructor, and says it before loading any model."""
    import transformers

    from lafn_hf.serve.app import check_serving_transformers, serve

    for version in ("5.25.0", "5.25.1.dev0", "5.30.0", "6.0.0"):
        check_serving_transformers(version)
    for version in ("5.0.0", "5.24.0", "5.24.1.dev0"):
        with pytest.raises(ImportError, match=rf"transformers >= 5\.25 .*found {re.escape(version)}: pip install"):
            check_serving_transformers(version)
    monkeypatch.setattr(transformers, "__version__", "5.24.0")
    with pytest.raises(ImportError, match=r"found 5\.24\.0"):
        serve(str(tmp_path / "no-such-model"))
    with pytest.raises(ImportError, match=r"found 5\.24\.0"):
        build_app(str(tmp_path / "no-such-model"), BASE)
