"""Bad requests to ``lafn serve`` (issue 35): every bad field of ``/v1/completions``, ``/v1/chat/completions`` and
``/v1/responses`` (wrong types, out-of-range values, empty messages, invalid JSON, non-UTF-8 bytes, a prompt longer
than the model's context, a ``generation_config`` asking for more than the model takes) answers a 4xx that names
the field, never a 500 and never a silent 200, and the server answers correctly afterwards. Raw HTTP and the
``openai`` client, against the tiny model (context: 64 positions)."""

from __future__ import annotations

import http.client
import json
from collections import Counter
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from lafn_hf.serve import ServerThread, build_app  # noqa: E402
from lafn_hf.serve.requests import RequestLimits  # noqa: E402

BASE = "tiny"
CONTEXT = 64  # the tiny model's max_position_embeddings
COMPLETIONS, CHAT, RESPONSES = "/v1/completions", "/v1/chat/completions", "/v1/responses"
GOOD = {COMPLETIONS: {"model": BASE, "prompt": "The capital of", "max_tokens": 4, "temperature": 0},
        CHAT: {"model": BASE, "messages": [{"role": "user", "content": "The capital of"}], "max_tokens": 4,
               "temperature": 0},
        RESPONSES: {"model": BASE, "input": "The capital of", "max_output_tokens": 4, "temperature": 0}}
LONG = "word " * 10_000  # about 10,000 tokens
HUGE = (10**9, 2**70, 1e30)


def body(path: str, **fields: Any) -> bytes:
    """The good request for ``path`` with ``fields`` changed (a value of ``...`` removes the field)."""
    changed = {**GOOD[path], **fields}
    return json.dumps({key: value for key, value in changed.items() if value is not ...}).encode()


def bad_requests() -> list[tuple[str, str, bytes, str]]:
    """(kind of bad input, path, raw body, a part of the error message it must get)."""
    cases: list[tuple[str, str, bytes, str]] = []

    def add(kind: str, path: str, raw: bytes, message: str) -> None:
        cases.append((kind, path, raw, message))

    for path, field in ((COMPLETIONS, "max_tokens"), (CHAT, "max_tokens"), (CHAT, "max_completion_tokens"),
                        (RESPONSES, "max_output_tokens")):
        for value in (-1, 0, -5):
            add("max_tokens < 1", path, body(path, **{field: value}), f"{field} must be")
        for value in ("x", 1.5, True, [4], {"n": 4}):
            add("max_tokens of a wrong type", path, body(path, **{field: value}), f"{field} must be")
        for value in HUGE:
            add("max_tokens past the context", path, body(path, **{field: value}), field)
        add("max_tokens past the context, streaming", path, body(path, **{field: 10**9, "stream": True}), field)
    for path in (COMPLETIONS, CHAT, RESPONSES):
        for field, values in (("temperature", ("hot", -1, 3, [1], 10**400)), ("top_p", ("x", -0.5, 2)),
                              ("seed", ("x", 1.5, 2**70)), ("stream", ("yes", 1)),
                              ("model", (5, ["tiny"], {"a": 1}))):
            for value in values:
                add("sampling field of a wrong type or range", path, body(path, **{field: value}), field)
        add("prompt past the context", path, body(path, **{"prompt": LONG} if path == COMPLETIONS else
                                                  {"input": LONG} if path == RESPONSES else
                                                  {"messages": [{"role": "user", "content": LONG}]}),
            f"takes at most {CONTEXT}")
        for value in ("not json", "[]", "5", 5, '{"max_new_tokens": "x"}', '{"min_new_tokens": 2000}',
                      '{"max_new_tokens": 1000000000}', '{"max_length": 100000}', '{"min_length": 100000}',
                      '{"num_beams": -1}', '{"temperature": "x"}', '{"return_dict_in_generate": true}',
                      '{"stopping_criteria": 1}', '{"input_ids": [1]}', '{"no_such_setting": 1}'):
            add("generation_config", path, body(path, generation_config=value), "generation_config")
        for raw in (b"{", b"\xff\xfe{}", b'{"model": "tiny", "prompt": "\xff"}', b"[]", b'"x"', b"",
                    b'{"model": "tiny", "prompt": "x", "messages": [], "input": "x", "temperature": NaN}',
                    b"[" * 100_000):
            add("body not a JSON object (invalid JSON, non-UTF-8, NaN, nesting)", path, raw, "")
    for field, values in (("frequency_penalty", ("x", -5, 1e30)), ("stop", (5, [1, 2], {"a": 1})),
                          ("stream_options", ("x", 5)), ("suffix", (5, ["x"]))):
        for value in values:
            add("completion field of a wrong type or range", COMPLETIONS, body(COMPLETIONS, **{field: value}),
                field)
    for path, field, value in ((COMPLETIONS, "n", 2), (COMPLETIONS, "best_of", 3), (COMPLETIONS, "echo", True),
                               (COMPLETIONS, "logprobs", 5), (COMPLETIONS, "presence_penalty", 1.5), (CHAT, "n", 2),
                               (CHAT, "logprobs", True), (CHAT, "top_logprobs", 3), (CHAT, "presence_penalty", -1),
                               (COMPLETIONS, "logit_bias", {"5": 10}),
                               (CHAT, "response_format", {"type": "json_object"})):
        add("an option transformers ignores, asked for", path, body(path, **{field: value}),
            f"{field} is not supported by this server")
    for value in (5, [1, 2, 3], {"a": 1}, None):
        add("prompt not a string", COMPLETIONS, body(COMPLETIONS, prompt=value), "prompt")
    for value in ([], ..., "hi", None, [1], [{"role": "user"}], [{"content": "hi"}],
                  [{"role": "user", "content": 5}], [{"role": "user", "content": [{"type": "text"}]}],
                  [{"role": "user", "content": [5]}], [{"role": "wizard", "content": "hi"}],
                  [{"role": 5, "content": "hi"}]):
        add("messages empty or malformed", CHAT, body(CHAT, messages=value), "messages")
    for field, values in (("logit_bias", ("x", {"a": 1}, {"5": "x"}, {"5": 1000}, {"5": 10**400}, {"600": 1})),
                          ("tools", ("x", [5])),
                          ("chat_template_kwargs", ("x", [1])), ("frequency_penalty", ("x", -5)),
                          ("stop", (5, [1]))):
        for value in values:
            add("chat field of a wrong type or range", CHAT, body(CHAT, **{field: value}), field)
    for value in (5, [], ..., [5], [{"type": "weird"}], None, {"a": 1},
                  [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]):
        add("input empty or malformed", RESPONSES, body(RESPONSES, input=value), "input")
    for value in (5, ["x"]):
        add("responses field of a wrong type", RESPONSES, body(RESPONSES, instructions=value), "instructions")
    return cases


def post(url: str, path: str, raw: bytes, headers: dict[str, str] | None = None,
         method: str = "POST", timeout: float = 30) -> tuple[int, str]:
    """Raw HTTP: (status, body text); a timeout is status 0."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        connection.request(method, path, body=raw, headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    except TimeoutError:
        return 0, "timed out"
    finally:
        connection.close()


def answers_correctly(url: str) -> bool:
    status, text = post(url, COMPLETIONS, body(COMPLETIONS))
    return status == 200 and json.loads(text)["choices"][0]["finish_reason"] in ("length", "stop")


def probe(url: str) -> tuple[Counter[tuple[str, int]], list[tuple[str, str, bytes, int, str]]]:
    """Every bad request once: counts of (kind, status), and the cases that were no 4xx or missed their message."""
    counts: Counter[tuple[str, int]] = Counter()
    wrong = []
    for kind, path, raw, message in bad_requests():
        status, text = post(url, path, raw)
        counts[kind, status] += 1
        if not 400 <= status < 500 or message not in text:
            wrong.append((kind, path, raw[:120], status, text[:300]))
    return counts, wrong


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    built = build_app("tiny-bilingual", BASE)
    with ServerThread(built.app) as thread:
        yield thread
    built.shutdown()


def test_every_bad_request_is_a_4xx_that_names_the_field(server: ServerThread) -> None:
    counts, wrong = probe(server.url)
    assert wrong == []
    assert sum(counts.values()) == len(bad_requests()) == 229
    assert answers_correctly(server.url)


ROOM = ("the prompt has 6 tokens and the model takes at most 64, prompt and answer, so this request may generate at "
        "most 58 tokens")


def bad_request(call: Any) -> str:
    with pytest.raises(openai.BadRequestError) as raised:
        call()
    return str(raised.value.response.json()["detail"])


def test_the_openai_client_gets_the_field_and_the_limit(server: ServerThread) -> None:
    api = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    prompt, messages = "The capital of", [{"role": "user", "content": "The capital of"}]
    assert bad_request(lambda: api.completions.create(model=BASE, prompt=prompt, max_tokens=10**9)) == \
        f"max_tokens is 1000000000, but {ROOM}"
    assert bad_request(lambda: api.completions.create(model=BASE, prompt=prompt, max_tokens=-1)) == \
        "max_tokens must be an integer >= 1, got -1"
    assert bad_request(lambda: api.chat.completions.create(model=BASE, messages=messages,  # type: ignore[arg-type]
                                                           max_completion_tokens=-5)) == \
        "max_completion_tokens must be an integer >= 1, got -5"
    assert bad_request(lambda: api.chat.completions.create(model=BASE, messages=[])) == \
        "messages must be a non-empty list of messages, got []"
    assert bad_request(lambda: api.completions.create(model=BASE, prompt=prompt, max_tokens=500, stream=True)) == \
        f"max_tokens is 500, but {ROOM}"
    assert bad_request(lambda: api.responses.create(model=BASE, input=prompt, max_output_tokens=2**70)) == \
        f"max_output_tokens is {2**70}, but {ROOM}"
    assert bad_request(lambda: api.completions.create(model=BASE, prompt=LONG)) == \
        f"The prompt has 40001 tokens, but the model takes at most {CONTEXT}, prompt and answer (`--max-model-len`)."
    config = {"generation_config": json.dumps({"min_new_tokens": 2000})}
    assert bad_request(lambda: api.completions.create(model=BASE, prompt=prompt, extra_body=config)) == \
        f"generation_config min_new_tokens is 2000, but {ROOM}"
    config = {"generation_config": json.dumps({"stopping_criteria": 1})}
    assert bad_request(lambda: api.completions.create(model=BASE, prompt=prompt, extra_body=config)).endswith(
        "got [\"stopping_criteria\"]")
    # without max_tokens the answer may take the rest of the context (transformers' default is 1024 tokens)
    answer = api.completions.create(model=BASE, prompt=prompt, temperature=0)
    assert answer.usage is not None and answer.usage.prompt_tokens + answer.usage.completion_tokens <= CONTEXT
    assert answers_correctly(server.url)


def test_the_servers_cap_refuses_more_and_caps_a_request_that_asks_nothing() -> None:
    with pytest.raises(ValueError, match=r"RequestLimits.max_new_tokens must be an integer >= 1, got 0"):
        RequestLimits(max_new_tokens=0)
    built = build_app("tiny-bilingual", BASE, limits=RequestLimits(max_new_tokens=3))
    with ServerThread(built.app) as thread:
        api = openai.OpenAI(base_url=f"{thread.url}/v1", api_key="unused", max_retries=0, timeout=60)
        assert bad_request(lambda: api.completions.create(model=BASE, prompt="The capital of", max_tokens=5)) == \
            "max_tokens is 5, but this server generates at most 3 tokens per request (--max-new-tokens)"
        answer = api.completions.create(model=BASE, prompt="The capital of", temperature=0)
        assert answer.usage is not None and answer.usage.completion_tokens == 3
        assert answer.choices[0].finish_reason == "length"
    built.shutdown()


def test_logit_bias_takes_integers_and_token_ids_of_the_vocabulary(server: ServerThread) -> None:
    """transformers' ``sequence_bias`` takes floats only: ``{"5": 10}`` (what the OpenAI client sends) works."""
    api = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    messages: Any = [{"role": "user", "content": "The capital of"}]
    plain = api.chat.completions.create(model=BASE, messages=messages, max_tokens=3, temperature=0)
    token = 20
    biased = api.chat.completions.create(model=BASE, messages=messages, max_tokens=3, temperature=0,
                                         logit_bias={str(token): 100})
    assert biased.choices[0].message.content != plain.choices[0].message.content
    assert bad_request(lambda: api.chat.completions.create(model=BASE, messages=messages, logit_bias={"600": 1})) == \
        "logit_bias token id 600 is not in the model's vocabulary (600 tokens)"
