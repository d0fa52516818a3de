"""API keys with names (streaming_tutorial/server/keys.py), without a server: the keys file's format and its errors,
reloading while the server runs, and a repeated `--api-key` that keeps every key."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time

import httpx
import pytest
from server_checks import metrics, wait_for
from test_limits import engine_idle
from workshop_clients import Stream, async_client, stream_chat

from streaming_tutorial.client.metrics import metric
from streaming_tutorial.processes.local_server import PROJECT_ROOT
from streaming_tutorial.server import app
from streaming_tutorial.server.args import parse_args
from streaming_tutorial.server.keys import (
    KeyRing,
    KeysFileError,
    digest,
    example_keys_file,
    keyring_from_args,
    parse_keys,
)


def test_keys_file_lines_names_keys_and_limits():
    keys = parse_keys("# the class of 2026\n\nalice:k-alice\n  bob:k-bob:2  \ninstructor:k-inst:16\n")
    assert [(k.name, k.max_in_flight) for k in keys] == [("alice", None), ("bob", 2), ("instructor", 16)]
    assert keys[1].digest == digest("k-bob")
    assert all("k-" not in repr(k) for k in keys)  # the key itself is not kept, only its digest


@pytest.mark.parametrize("text, words", [
    ("alice", "line 1: expected `name:key`"),
    ("a:b:c:d", "line 1: expected `name:key`"),
    ("ok:k1\nbad name:k2", "line 2: the name 'bad name'"),
    ("alice:", "line 1: the key of 'alice' is empty"),
    ("alice:k1:zero", "line 1: the limit of 'alice'"),
    ("alice:k1:0", "line 1: the limit of 'alice'"),
    ("alice:k1\nalice:k2", "line 2: the name 'alice' appears twice"),
    ("alice:k1\nbob:k1", "line 2: the key of 'bob' is also another name's key"),
])
def test_a_malformed_line_is_one_clear_line(text, words):
    with pytest.raises(KeysFileError) as error:
        parse_keys(text, "keys.txt")
    message = str(error.value)
    assert message.startswith("keys.txt, ") and words in message and "\n" not in message


def touch(path, text):
    """Write `text` and move the modification time on, so a reload within the same clock tick is seen too."""
    stat = path.stat() if path.exists() else None
    path.write_text(text)
    if stat is not None:
        os.utime(path, ns=(stat.st_atime_ns, max(stat.st_mtime_ns + 1_000_000, path.stat().st_mtime_ns)))


def test_reload_adds_removes_and_changes_keys_and_reports_what_is_gone(tmp_path):
    path = tmp_path / "keys.txt"
    touch(path, "alice:k-alice\nbob:k-bob\n")
    ring = KeyRing([], path)
    gone_events = []
    ring.on_change(gone_events.append)
    assert ring.lookup("k-alice").name == "alice" and ring.lookup("k-carol") is None
    assert ring.refresh() is False  # unchanged file: not even re-read

    touch(path, "alice:k-alice2\ncarol:k-carol:8\n")  # alice's key changed, bob removed, carol added
    assert ring.refresh() is True
    assert ring.lookup("k-alice") is None and ring.lookup("k-bob") is None
    assert ring.lookup("k-alice2").name == "alice" and ring.lookup("k-carol").max_in_flight == 8
    assert gone_events == [{("alice", digest("k-alice")), ("bob", digest("k-bob"))}]


def test_a_broken_edit_keeps_the_previous_keys(tmp_path, caplog):
    path = tmp_path / "keys.txt"
    touch(path, "alice:k-alice\n")
    ring = KeyRing([], path)
    touch(path, "alice k-alice\n")  # a typo: no colon
    with caplog.at_level("ERROR", logger="vllm.streaming_tutorial.server.keys"):
        assert ring.refresh() is False
    assert ring.lookup("k-alice").name == "alice"
    assert "previous 1 key(s) stay" in caplog.text and "line 1" in caplog.text and "k-alice" not in caplog.text
    path.unlink()  # deleted by mistake: the keys stay too
    assert ring.refresh() is False and ring.lookup("k-alice") is not None
    touch(path, "alice:k-alice\nbob:k-bob\n")  # fixed: taken at once
    assert ring.refresh() is True and ring.lookup("k-bob").name == "bob"


def test_repeated_api_key_flags_are_merged(monkeypatch):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    args = parse_args(["--api-key", "k1", "--api-key", "k2", "k3"])
    assert args.api_key == ["k1", "k2", "k3"]  # vLLM alone keeps ["k2", "k3"]
    ring = keyring_from_args(args)
    assert [ring.lookup(t).name for t in ("k1", "k2", "k3")] == ["api-key-1", "api-key-2", "api-key-3"]


def test_keys_come_from_flags_file_or_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    monkeypatch.delenv("TUTORIAL_API_KEYS_FILE", raising=False)
    assert keyring_from_args(parse_args([])) is None  # a learner's local server: no key
    path = tmp_path / "keys.txt"
    path.write_text("alice:k-alice\n")
    both = keyring_from_args(parse_args(["--api-key", "k1", "--api-keys-file", str(path)]))
    assert {k.name for k in both.keys} == {"api-key-1", "alice"}
    monkeypatch.setenv("TUTORIAL_API_KEYS_FILE", str(path))
    assert [k.name for k in keyring_from_args(parse_args([])).keys] == ["alice"]
    monkeypatch.setenv("VLLM_API_KEY", "from-env")
    assert {k.name for k in keyring_from_args(parse_args([])).keys} == {"api-key-1", "alice"}


def test_a_file_name_that_clashes_with_a_flag_key_name_is_refused(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_text("api-key-1:k-other\n")
    with pytest.raises(KeysFileError, match="api-key-1"):
        keyring_from_args(parse_args(["--api-key", "k1", "--api-keys-file", str(path)]))


def test_the_workshop_guides_keys_file_is_ignored_by_git():
    """The workshop guide (docs/workshop.md) writes the keys to `keys.txt` in the project: git must never offer to
    commit it."""
    assert "> keys.txt" in (PROJECT_ROOT / "docs" / "workshop.md").read_text()
    if shutil.which("git") is None or not (PROJECT_ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    for path in ("keys.txt", "notebooks/keys.txt"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=PROJECT_ROOT).returncode == 0, path


def test_the_server_refuses_a_malformed_keys_file_in_one_line_before_loading_the_engine(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_text("alice:k1\nbob\n")
    result = subprocess.run([sys.executable, "streaming_server.py", "--api-keys-file", str(path)], cwd=PROJECT_ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --api-keys-file:") and "line 2" in last, result.stderr[-2000:]
    assert "Loading" not in result.stderr and "EngineCore" not in result.stderr  # stopped before the engine


# ---- end to end: editing the keys file of a running server (keyed_server, tests/conftest.py) ----

RELOAD_DEADLINE_S = 5.0


@pytest.mark.server
def test_editing_the_keys_file_adds_removes_and_changes_keys_while_streams_run(keyed_server):
    """student-4's key is removed and student-5's changed while each has a stream running; student-6 is untouched
    and a newcomer is added. Within 5 s the removed and old keys get 401, their streams end with an error event
    and [DONE] and leave the engine; the new keys work; student-6's stream completes."""
    keys, path = keyed_server.keys, keyed_server.keys_file
    original = path.read_text()
    newcomer = example_keys_file(["newcomer"]).strip().split(":")[1]
    new_key_5 = example_keys_file(["student-5"]).strip().split(":")[1]
    edited = "".join(line + "\n" for line in original.splitlines()
                     if not line.startswith(("student-4:", "student-5:")))
    edited += f"student-5:{new_key_5}\nnewcomer:{newcomer}\n"
    url = keyed_server.url_for("v1", "models")

    def status(key: str) -> int:
        return httpx.get(url, headers={"Authorization": f"Bearer {key}"}, timeout=10).status_code

    def running() -> float:
        return metric(metrics(keyed_server.url), "vllm:num_requests_running")

    engine_idle(keyed_server)
    revoked_before = metric(metrics(keyed_server.url), "tutorial:rejections_total", reason="revoked")

    async def scenario():
        async with async_client(keyed_server.url) as client:
            removed = asyncio.create_task(stream_chat(client, keys["student-4"], Stream(), 250, long=True))
            changed = asyncio.create_task(stream_chat(client, keys["student-5"], Stream(), 250, long=True))
            kept = asyncio.create_task(stream_chat(client, keys["student-6"], Stream(), 120, long=True))
            deadline = time.monotonic() + 120
            while running() < 3:
                assert time.monotonic() < deadline, "the three streams did not start"
                await asyncio.sleep(0.1)
            touch(path, edited)
            edited_at = time.monotonic()
            while status(keys["student-4"]) != 401 or status(keys["student-5"]) != 401:
                assert time.monotonic() - edited_at < RELOAD_DEADLINE_S, "the removed keys still work"
                await asyncio.sleep(0.05)
            latency = time.monotonic() - edited_at
            while running() > 1:  # only student-6's stream is left in the engine
                assert time.monotonic() - edited_at < RELOAD_DEADLINE_S + 2, "revoked streams still run"
                await asyncio.sleep(0.05)
            aborted = time.monotonic() - edited_at
            fresh = (status(new_key_5), status(newcomer), status(keys["student-6"]))
            return latency, aborted, fresh, await removed, await changed, await kept

    try:
        latency, aborted, fresh, removed, changed, kept = asyncio.run(scenario())
    finally:
        touch(path, original)
    print(f"\nkeys file edited: old keys refused after {latency:.2f} s; their streams left the engine after "
          f"{aborted:.2f} s")
    assert fresh == (200, 200, 200)
    for record in (removed, changed):
        assert record.status == 200 and record.done, record  # the stream ended cleanly: [DONE]
        assert record.events[-1]["error"]["code"] == 401 and "removed" in record.events[-1]["error"]["message"]
        assert len([e for e in record.events if e.get("choices")]) < 250
    assert kept.status == 200 and kept.done and kept.completion_tokens == 120 and "error" not in kept.events[-1]
    revoked = metric(metrics(keyed_server.url), "tutorial:rejections_total", reason="revoked") - revoked_before
    assert revoked == 2
    wait_for(lambda: status(keys["student-4"]) == 200, RELOAD_DEADLINE_S, what="the restored keys file")


def test_the_keys_file_is_read_once_when_the_server_starts(monkeypatch, tmp_path):
    """`streaming_server.main` reads the keys (load_keyring) before the engine loads; the app reuses them."""
    path = tmp_path / "keys.txt"
    path.write_text("alice:k1\n")
    args = parse_args(["--api-keys-file", str(path)])
    keyring = app.load_keyring(args)
    monkeypatch.setattr(app, "keyring_from_args", lambda *a, **k: pytest.fail("the keys file was read again"))
    built = app.create_app(args, ("generate",))
    assert built.state.tutorial_keyring is keyring and [k.name for k in keyring.keys] == ["alice"]
