"""Work nobody waits for (issue 37, item 7): a request whose client leaves stops generating, streaming or not, and
frees the model's worker; a client's ``generation_config`` cannot ask for more than the context and the server's
cap. On the tiny model with its context widened to 4096 positions (RoPE: the weights do not change), so that one
request can generate 2000 tokens (seconds on a CPU)."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from lafn_hf.models import tiny_model_path  # noqa: E402
from lafn_hf.serve import ServerThread, build_app  # noqa: E402
from lafn_hf.serve.requests import RequestLimits  # noqa: E402

BASE = "long"
PROMPT = "The capital of"
SECONDS = 4.0  # how long the long request runs (its length is set from the speed measured)
CAP = 2500  # over LONG, under the context


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    model = tmp_path_factory.mktemp("long") / "tiny-long"
    shutil.copytree(tiny_model_path(), model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 4096}))
    built = build_app(str(model), BASE, limits=RequestLimits(max_new_tokens=CAP))
    with ServerThread(built.app) as thread:
        yield thread
    built.shutdown()


def long_body(tokens: int, stream: bool = False) -> bytes:
    """``tokens`` tokens exactly (min_new_tokens: no early end of sequence)."""
    return json.dumps({"model": BASE, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": stream,
                       "generation_config": json.dumps({"min_new_tokens": tokens})}).encode()


def short_request(thread: ServerThread) -> float:
    """Seconds a 4-token completion takes (it waits for the worker: the model's process runs one at a time)."""
    api = openai.OpenAI(base_url=f"{thread.url}/v1", api_key="unused", max_retries=0, timeout=120)
    started = time.perf_counter()
    answer = api.completions.create(model=BASE, prompt=PROMPT, max_tokens=4, temperature=0)
    assert answer.usage is not None and answer.usage.completion_tokens == 4
    return time.perf_counter() - started


def leave_after(thread: ServerThread, raw: bytes, seconds: float) -> None:
    """Send a completion over a raw socket and close it after ``seconds``, before any answer."""
    with socket.create_connection((thread.host, thread.port)) as connection:
        connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: " + f"{thread.host}:{thread.port}".encode() +
                           b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(raw)).encode() +
                           b"\r\n\r\n" + raw)
        time.sleep(seconds)


def full_request(thread: ServerThread, tokens: int) -> tuple[float, Any]:
    connection = http.client.HTTPConnection(thread.host, thread.port, timeout=300)
    started = time.perf_counter()
    connection.request("POST", "/v1/completions", body=long_body(tokens), headers={"Content-Type": "application/json"})
    response = json.loads(connection.getresponse().read())
    connection.close()
    return time.perf_counter() - started, response


def test_a_client_that_leaves_frees_the_worker(server: ServerThread) -> None:
    short_request(server)  # warm-up
    took, response = full_request(server, 50)
    tokens = max(100, min(CAP, int(SECONDS * 50 / took)))  # about SECONDS on this machine now (shared CPUs vary)
    took, response = full_request(server, tokens)
    assert response["usage"]["completion_tokens"] == tokens
    assert took > 1.0, (tokens, took)  # long enough that waiting for it shows
    for stream in (False, True):
        leave_after(server, long_body(tokens, stream), 0.3)
        waited = short_request(server)
        # without cancelling, the short request waits for the rest of the long one (about took - 0.3 s)
        assert waited < took / 3, (stream, waited, took)


def test_generation_config_is_bounded_by_the_context_and_the_cap(server: ServerThread) -> None:
    api = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    room = 4096 - 6  # the prompt has 6 tokens
    cases = (({"min_new_tokens": 3000}, f"generation_config min_new_tokens is 3000, but this server generates at most "
              f"{CAP} tokens per request (--max-new-tokens)"),
             ({"max_new_tokens": 10**6}, f"generation_config max_new_tokens is 1000000, but this server generates at "
              f"most {CAP} tokens per request (--max-new-tokens)"),
             ({"max_length": 5000}, "generation_config max_length is 5000, more than the prompt and the answer can take"),
             ({"num_beams": 64}, "generation_config num_beams is 64, more than this server allows (4)"))
    for config, message in cases:
        with pytest.raises(openai.BadRequestError) as raised:
            api.completions.create(model=BASE, prompt=PROMPT, extra_body={"generation_config": json.dumps(config)})
        assert raised.value.response.json()["detail"].startswith(message), raised.value.response.json()
    assert room > CAP
