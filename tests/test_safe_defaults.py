"""Safe defaults, without a server: loopback binding, a loud warning when exposed without a key,
and a body-size limit that refuses before reading."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from streaming_tutorial.server import app, security
from streaming_tutorial.server.args import parse_args


def test_binds_loopback_unless_told_otherwise():
    assert parse_args([]).host == "127.0.0.1"
    assert parse_args(["--host", "0.0.0.0"]).host == "0.0.0.0"


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_no_warning_on_loopback(host):
    assert security.non_loopback_warning(host, []) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "classroom.example.org", None, ""])
def test_warns_when_exposed_without_a_key(host):
    warning = security.non_loopback_warning(host, [])
    assert warning is not None and "\n" not in warning
    assert "--api-key" in warning and "SECURITY WARNING" in warning


def test_no_warning_with_a_key_or_a_unix_socket():
    assert security.non_loopback_warning("0.0.0.0", ["secret"]) is None
    assert security.non_loopback_warning("0.0.0.0", [], uds="/tmp/vllm.sock") is None


def test_keys_come_from_the_flag_or_the_environment(monkeypatch):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    assert security.api_keys(parse_args([])) == []
    assert security.api_keys(parse_args(["--api-key", "a"])) == ["a"]
    monkeypatch.setenv("VLLM_API_KEY", "env")
    assert security.api_keys(parse_args([])) == ["env"]
    assert security.api_keys(parse_args(["--api-key", "a"])) == ["a"]  # the flag wins, as in vLLM


class RecordingLogger:
    def __init__(self):
        self.lines: list[tuple[str, str]] = []

    def __getattr__(self, level):
        return lambda message, *args: self.lines.append((level, message % args if args else message))


def test_start_up_logs_the_warning_once(monkeypatch):
    """What `streaming_server.main` logs about keys before vLLM starts (server/app.py, `load_keyring`): one
    WARNING line for an exposed keyless server. (A stand-in logger: the server configures vLLM's logging, which
    pytest's caplog then does not see.)"""
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    for argv, expected in ((["--host", "0.0.0.0"], 1), (["--host", "0.0.0.0", "--api-key", "secret"], 0),
                           ([], 0)):
        log = RecordingLogger()
        monkeypatch.setattr(app, "logger", log)
        app.load_keyring(parse_args(argv))
        warnings = [message for level, message in log.lines if "SECURITY WARNING" in message]
        assert len(warnings) == expected, (argv, log.lines)
        assert all(level == "warning" for level, message in log.lines if "SECURITY WARNING" in message)


def test_body_limit_refuses_declared_and_streamed_bodies():
    async def echo(scope, receive, send):
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(len(body)).encode()})

    client = TestClient(security.BodySizeLimitMiddleware(echo, max_bytes=1000))
    assert client.post("/", content=b"x" * 1000).text == "1000"
    too_big = client.post("/", content=b"x" * 1001)
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == 413
    streamed = client.post("/", content=iter([b"x" * 600, b"x" * 600]))  # chunked, no Content-Length
    assert streamed.status_code == 413
    assert client.post("/", content=iter([b"x" * 400, b"x" * 400])).text == "800"
