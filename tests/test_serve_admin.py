"""The ``/lafn/banks`` admin routes closed by default (issue 35): a token always (generated when none is given),
the ``Host`` header checked against the served addresses (DNS rebinding), no browser (``Origin``) calls, and
errors that name the path and the field but never echo what a file on disk holds."""

from __future__ import annotations

import http.client
import json
import os
import stat
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from lafn_hf import EditBank  # noqa: E402
from lafn_hf.bank.lafn_config import BANK_CONFIG_NAME  # noqa: E402
from lafn_hf.bank.store import save_bank  # noqa: E402
from lafn_hf.cli import build_parser  # noqa: E402
from lafn_hf.serve import ServerThread, build_app, load_editable  # noqa: E402
from lafn_hf.serve.admin import AdminSettings, redact, served_hosts  # noqa: E402
from lafn_hf.serve.app import write_token  # noqa: E402

from .conftest import make_entry  # noqa: E402

BASE = "tiny"
SECRET = "sk-SECRET-0123456789"


def call(url: str, method: str, path: str, raw: bytes | None = None, token: str | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, Any, dict[str, str]]:
    """Raw HTTP (``headers`` may replace ``Host``): status, JSON body (or text), response headers."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    sent = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {}),
            **(headers or {})}
    try:
        connection.putrequest(method, path, skip_host="Host" in sent)
        for name, value in {**sent, "Content-Length": str(len(raw or b""))}.items():
            connection.putheader(name, value)
        connection.endheaders(raw)
        response = connection.getresponse()
        text = response.read().decode("utf-8", "replace")
        try:
            payload: Any = json.loads(text)
        except ValueError:
            payload = text
        return response.status, payload, {k.lower(): v for k, v in response.getheaders()}
    finally:
        connection.close()


@pytest.fixture(scope="module")
def good_bank(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("admin") / "good"
    editable = load_editable("tiny-bilingual")
    save_bank(directory, EditBank([make_entry({"en": "Marbrafi"}, size=256, seed=1)]), editable.base_ref)
    return directory


@pytest.fixture(scope="module")
def server(good_bank: Path) -> Iterator[tuple[ServerThread, str]]:
    built = build_app("tiny-bilingual", BASE, [("good", good_bank)])  # no token given
    assert built.admin is not None
    with ServerThread(built.app) as thread:
        yield thread, built.admin.token
    built.shutdown()


def test_a_token_is_made_when_none_is_given_and_every_admin_call_needs_it(server: tuple[ServerThread, str]) -> None:
    thread, token = server
    assert len(token) >= 40
    for method, path, raw in (("GET", "/lafn/banks", None), ("POST", "/lafn/banks/reload", b"{}"),
                              ("POST", "/lafn/banks", b'{"path": "/tmp"}'), ("DELETE", "/lafn/banks/good", None)):
        for wrong in (None, "", "x", token[:-1], token + "x"):
            status, error, _ = call(thread.url, method, path, raw, token=wrong)
            assert (status, error) == (401, {"detail": "admin calls need 'Authorization: Bearer <admin token>'"})
    status, listing, _ = call(thread.url, "GET", "/lafn/banks", token=token)
    assert status == 200 and listing["models"] == [BASE, f"{BASE}+good"]


def test_host_header_must_name_the_served_address(server: tuple[ServerThread, str]) -> None:
    """DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1 sends ``Host: evil.example``."""
    thread, token = server
    for host in ("evil", f"evil:{thread.port}", "evil.example", f"127.0.0.1.evil.example:{thread.port}", "",
                 f"10.0.0.1:{thread.port}"):
        status, error, _ = call(thread.url, "POST", "/lafn/banks/reload", b"{}", token=token, headers={"Host": host})
        assert status == 403, host
        assert error["detail"] == ("admin calls must name this server in their Host header (one of ['127.0.0.1', "
                                   "'::1', 'localhost'], with the port)")
    for host in (f"127.0.0.1:{thread.port}", f"localhost:{thread.port}", f"[::1]:{thread.port}", "LOCALHOST"):
        assert call(thread.url, "GET", "/lafn/banks", token=token, headers={"Host": host})[0] == 200, host
    assert call(thread.url, "GET", "/v1/models", headers={"Host": "evil"})[0] == 200  # the API itself is not admin


def test_no_browser_calls_and_no_cors_on_admin_routes(server: tuple[ServerThread, str]) -> None:
    thread, token = server
    origin = {"Origin": "http://evil.example"}
    status, error, headers = call(thread.url, "DELETE", "/lafn/banks/good", token=token, headers=origin)
    assert (status, error["detail"]) == (403, "admin calls from a web page (an Origin header) are refused")
    assert "access-control-allow-origin" not in headers
    status, _, headers = call(thread.url, "OPTIONS", "/lafn/banks", headers={
        **origin, "Access-Control-Request-Method": "DELETE", "Access-Control-Request-Headers": "authorization"})
    assert status >= 400 and not any(name.startswith("access-control-") for name in headers)
    assert call(thread.url, "GET", "/lafn/banks", token=token)[1]["models"] == [BASE, f"{BASE}+good"]


def test_no_admin_leaves_the_routes_out(good_bank: Path) -> None:
    built = build_app("tiny-bilingual", BASE, [("good", good_bank)], admin=False)
    assert built.admin is None
    with ServerThread(built.app) as thread:
        assert call(thread.url, "GET", "/lafn/banks")[0] == 404
        assert call(thread.url, "POST", "/lafn/banks", b'{"path": "/tmp"}')[0] in (404, 405)
    built.shutdown()


def test_a_failing_bank_names_path_and_field_but_never_what_the_file_holds(server: tuple[ServerThread, str],
                                                                          good_bank: Path, tmp_path: Path) -> None:
    thread, token = server
    secret = tmp_path / "credentials.json"
    secret.write_text(json.dumps({"format_version": SECRET, "api_key": SECRET, "entries": [SECRET]}))
    linked = tmp_path / "linked"
    linked.mkdir()
    for item in good_bank.iterdir():
        (linked / item.name).write_bytes(item.read_bytes())
    (linked / BANK_CONFIG_NAME).unlink()
    (linked / BANK_CONFIG_NAME).symlink_to(secret)
    status, error, _ = call(thread.url, "POST", "/lafn/banks", json.dumps({"path": str(linked)}).encode(),
                            token=token)
    assert status == 400 and SECRET not in json.dumps(error) and "sk-" not in error["detail"]
    assert error["detail"] == (f"bank 'linked' at {linked}: {linked / BANK_CONFIG_NAME} is not a valid "
                               f"{BANK_CONFIG_NAME}: format_version must be an integer (1, 2, 3), got <not shown>")
    config = json.loads((good_bank / BANK_CONFIG_NAME).read_text())
    config["entries"][0]["subjects"] = {"en": SECRET * 10_000}  # a value the loader quotes
    quoting = tmp_path / "quoting"
    quoting.mkdir()
    for item in good_bank.iterdir():
        (quoting / item.name).write_bytes(item.read_bytes())
    (quoting / BANK_CONFIG_NAME).write_text(json.dumps(config))
    status, error, _ = call(thread.url, "POST", "/lafn/banks", json.dumps({"path": str(quoting), "name": "q"})
                            .encode(), token=token)
    assert status == 400 and SECRET[:8] not in error["detail"] and "subjects.en" in error["detail"]
    assert error["detail"].startswith(f"bank 'q' at {quoting}: ")
    assert call(thread.url, "GET", "/lafn/banks", token=token)[1]["models"] == [BASE, f"{BASE}+good"]


def test_redact_keeps_the_path_and_name_and_hides_values() -> None:
    assert redact("bank 'a' at /x: entries[0].id 'sk-1' is already used, got string \"sk-2\"", ("a",)) == \
        "bank 'a' at /x: entries[0].id <not shown> is already used, got <not shown>"


def bad_admin_requests(good: Path) -> list[tuple[str, str, str, bytes | None, int]]:
    """(kind, method, path, raw body, status expected)."""
    load = "/lafn/banks"
    cases: list[tuple[str, str, str, bytes | None, int]] = []
    for raw in (b"{", b"\xff\xfe{}", b"[]", b'"x"', b"", b'{"path": NaN}'):
        cases.append(("admin body not a JSON object", "POST", load, raw, 422))
    cases.append(("admin body not a JSON object", "POST", load, b"[" * 100_000, 400))  # too deep to parse
    for body in ({"path": 5}, {"path": ""}, {"path": None}, {}, {"path": str(good) + "\x00"},
                 {"path": str(good), "name": 5}, {"path": str(good), "name": "a+b"}, {"path": str(good), "x": 1}):
        cases.append(("admin load field wrong", "POST", load, json.dumps(body).encode(), 422))
    cases.append(("admin load field wrong", "POST", load, json.dumps({"path": str(good / "missing")}).encode(), 400))
    for body, status in (({"name": 5}, 422), ({"name": ["good"]}, 422), ({"name": "nope"}, 404), ({"x": 1}, 422)):
        cases.append(("admin reload field wrong", "POST", f"{load}/reload", json.dumps(body).encode(), status))
    cases.append(("admin reload field wrong", "POST", f"{load}/reload", b"[]", 422))
    cases.append(("admin delete unknown", "DELETE", f"{load}/nope", None, 404))
    cases.append(("admin delete unknown", "DELETE", f"{load}/a%2Bb", None, 404))
    return cases


def probe_admin(url: str, token: str, good: Path) -> tuple[Counter[tuple[str, int]], list[Any]]:
    counts: Counter[tuple[str, int]] = Counter()
    wrong = []
    for kind, method, path, raw, expected in bad_admin_requests(good):
        status, payload, _ = call(url, method, path, raw, token=token)
        counts[kind, status] += 1
        if status != expected:
            wrong.append((kind, method, path, (raw or b"")[:80], status, str(payload)[:200]))
    return counts, wrong


def test_bad_admin_requests_are_4xx_and_change_nothing(server: tuple[ServerThread, str], good_bank: Path) -> None:
    thread, token = server
    counts, wrong = probe_admin(thread.url, token, good_bank)
    assert wrong == []
    assert sum(counts.values()) == 23
    assert call(thread.url, "GET", "/lafn/banks", token=token)[1]["models"] == [BASE, f"{BASE}+good"]


def test_token_file_is_private_and_settings_are_checked(tmp_path: Path) -> None:
    path = write_token(tmp_path / "run" / "serve-8000.token", "abc")
    assert path.read_text() == "abc\n" and stat.S_IMODE(path.stat().st_mode) == 0o600
    path.chmod(0o644)
    write_token(path, "def")
    assert path.read_text() == "def\n" and stat.S_IMODE(path.stat().st_mode) == 0o600
    link = tmp_path / "link.token"
    link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError):
        write_token(link, "ghi")
    assert not (tmp_path / "elsewhere").exists()
    for token in ("", "a b", "a\nb"):
        with pytest.raises(ValueError, match="admin token must be a non-empty string of printable characters"):
            AdminSettings(token)
    wildcard = AdminSettings.for_host("0.0.0.0")
    assert wildcard.host_allowed("192.168.1.7:8000") and not wildcard.host_allowed("evil:8000")
    assert not AdminSettings("t", served_hosts("10.0.0.2")).host_allowed("10.0.0.3:8000")
    assert AdminSettings("t", served_hosts("10.0.0.2", ["lafn.internal"])).host_allowed("lafn.internal:80")


def test_command_line_admin_options() -> None:
    args = build_parser().parse_args(["serve", "--model", "tiny-bilingual"])
    assert (args.no_admin, args.admin_token, args.admin_token_file, args.max_new_tokens) == (False, None, None, None)
    args = build_parser().parse_args(["serve", "--model", "m", "--no-admin", "--allowed-host", "a", "--allowed-host",
                                      "b", "--max-new-tokens", "256", "--admin-token-file", os.devnull])
    assert (args.no_admin, args.allowed_host, args.max_new_tokens) == (True, ["a", "b"], 256)


def test_lafn_serve_prints_the_token_it_made_and_writes_it_private(tmp_path: Path) -> None:
    """The command itself: the token in its banner and in a 0600 file while it runs, removed when it stops."""
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    token_path = tmp_path / "token"
    process = subprocess.Popen([sys.executable, "-m", "lafn_hf.cli", "serve", "--model", "tiny-bilingual", "--port",
                                str(port), "--admin-token-file", str(token_path)], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, env={**os.environ, "LAFN_ADMIN_TOKEN": ""}, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None and time.monotonic() < deadline, "lafn serve did not start"
            try:
                if call(url, "GET", "/v1/models")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        token = token_path.read_text().strip()
        assert len(token) >= 40 and stat.S_IMODE(token_path.stat().st_mode) == 0o600
        assert call(url, "GET", "/lafn/banks", token=token)[0] == 200
        assert call(url, "GET", "/lafn/banks")[0] == 401
    finally:
        process.terminate()
        banner, _ = process.communicate(timeout=60)
    assert f"/lafn/banks with 'Authorization: Bearer {token}' (also in {token_path}, mode 0600)" in banner
    assert not token_path.exists()
