"""A real nginx in front of a stand-in SSE upstream (streaming_tutorial/processes/proxy.py, scripts/proxy.py).

The upstream is a small Starlette app in a thread of this process, so each test knows how many events it had sent
when a read arrived through nginx: the tests count reads and events, never milliseconds. What nginx 1.22 was seen
to do, and what these tests hold it to:
- `proxy_buffering off`: each event arrives on its own, as it is sent;
- `proxy_buffering on` alone: the same, while the client keeps up (nginx passes what it has read on at once);
- `proxy_buffering on` with gzip on text/event-stream: nothing, not even the headers, until the stream ends;
  `proxy_buffering off` with gzip, or the upstream's `X-Accel-Buffering: no`, streams again;
- `proxy_read_timeout` cuts a silent stream without its last event, unless keep-alive comments flow.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from streaming_tutorial.processes import proxy as proxy_module
from streaming_tutorial.processes.local_server import free_port
from streaming_tutorial.processes.proxy import HOW_TO_GET_ONE, Proxy, ProxyError, config_text
from streaming_tutorial.processes.stopping import group_members

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "proxy.py"
spec = importlib.util.spec_from_file_location("proxy_script", SCRIPT)
proxy_script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(proxy_script)

nginx = pytest.mark.nginx

EVENTS = 20  # per stream, GAP_S apart: about 2 s a stream
GAP_S = 0.1
# Out of EVENTS + 1 (the last is `event: done`): "nearly as many reads as events", with room for a busy machine
# that now and then reads two events at once.
SEPARATE = 15
DONE = b"event: done"


# --- the stand-in upstream -----------------------------------------------------------------------------------

class StandIn:
    """An SSE server on a free loopback port, in a thread: /events, /silent, /echo. `sent[name]` counts the events
    stream `name` has sent so far."""

    def __init__(self) -> None:
        self.sent: dict[str, int] = {}
        self.names = itertools.count()
        app = Starlette(routes=[Route("/events", self.events), Route("/silent", self.silent),
                                Route("/echo", self.echo, methods=["POST"])])
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def start(self) -> StandIn:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the stand-in upstream did not start"
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.socket.close()

    def new_name(self) -> str:
        return f"stream-{next(self.names)}"

    async def events(self, request: Request) -> StreamingResponse:
        """?name=N: EVENTS events GAP_S apart, then `event: done`; &accel=no sends `X-Accel-Buffering: no`."""
        name = request.query_params["name"]
        self.sent[name] = 0

        async def stream():
            for i in range(EVENTS):
                self.sent[name] = i + 1
                yield f'data: {{"token": {i}}}\n\n'
                await asyncio.sleep(GAP_S)
            yield "event: done\ndata: {}\n\n"

        headers = {"X-Accel-Buffering": request.query_params["accel"]} if "accel" in request.query_params else {}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    async def silent(self, request: Request) -> StreamingResponse:
        """One event, `silence` seconds with nothing (or a `: keep-alive` comment every `keepalive` s), then done."""
        silence = float(request.query_params.get("silence", "3"))
        keepalive = float(request.query_params.get("keepalive", "0"))

        async def stream():
            yield 'data: {"token": 0}\n\n'
            until = time.monotonic() + silence
            while (left := until - time.monotonic()) > 0:
                await asyncio.sleep(min(keepalive, left) if keepalive else left)
                if keepalive and time.monotonic() < until:
                    yield ": keep-alive\n\n"
            yield "event: done\ndata: {}\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def echo(self, request: Request) -> JSONResponse:
        body = await request.body()
        return JSONResponse({"bytes": len(body), "x_forwarded_for": request.headers.get("x-forwarded-for")})


@pytest.fixture(scope="module")
def upstream():
    stand_in = StandIn().start()
    yield stand_in
    stand_in.stop()


# --- reading a stream through nginx ----------------------------------------------------------------------------

@dataclass
class Arrival:
    size: int
    events: int  # SSE events in this read (0 in a gzipped body)
    sent: int  # events the upstream had sent when this read arrived


@dataclass
class Received:
    sent_at_headers: int
    arrivals: list[Arrival] = field(default_factory=list)
    raw: bytes = b""
    gzipped: bool = False

    @property
    def body(self) -> bytes:
        return zlib.decompress(self.raw, wbits=31) if self.gzipped else self.raw


def read_events(proxy: Proxy, upstream: StandIn, *, gzip: bool = False, accel: str | None = None) -> Received:
    """One /events stream through `proxy`, read as it arrives (`iter_raw`: the bytes as nginx sent them)."""
    name = upstream.new_name()
    params = {"name": name, **({"accel": accel} if accel else {})}
    headers = {"Accept-Encoding": "gzip" if gzip else "identity"}
    with httpx.stream("GET", proxy.url_for("events"), params=params, headers=headers, timeout=30) as response:
        assert response.status_code == 200
        received = Received(upstream.sent.get(name, 0), gzipped=response.headers.get("content-encoding") == "gzip")
        for chunk in response.iter_raw():
            received.arrivals.append(Arrival(len(chunk), chunk.count(b"\n\n"), upstream.sent[name]))
            received.raw += chunk
    assert received.gzipped == gzip
    assert received.body.count(b"data: {\"token\"") == EVENTS and DONE in received.body
    return received


def assert_streamed(received: Received) -> None:
    """Nearly one read per event, the first while the upstream had sent only the first or second."""
    assert len(received.arrivals) >= SEPARATE, received.arrivals
    assert received.arrivals[0].sent <= 2, received.arrivals[0]
    if not received.gzipped:
        assert sum(a.events == 1 for a in received.arrivals) >= SEPARATE, received.arrivals


# --- buffering --------------------------------------------------------------------------------------------------

@nginx
def test_with_buffering_off_each_event_arrives_on_its_own_as_it_is_sent(upstream):
    with Proxy(upstream.url, buffering=False) as proxy:
        assert_streamed(read_events(proxy, upstream))


@nginx
def test_with_buffering_on_alone_nginx_1_22_still_passes_each_event_on_while_the_client_keeps_up(upstream):
    with Proxy(upstream.url, buffering=True) as proxy:
        assert_streamed(read_events(proxy, upstream))


@nginx
def test_with_buffering_on_and_gzip_nothing_arrives_not_even_the_headers_until_the_stream_ends(upstream):
    with Proxy(upstream.url, buffering=True, gzip=True) as proxy:
        received = read_events(proxy, upstream, gzip=True)
    assert received.sent_at_headers == EVENTS
    assert all(arrival.sent == EVENTS for arrival in received.arrivals)
    assert len(received.arrivals) <= 3, received.arrivals  # seen: 1


@nginx
def test_with_buffering_off_a_gzipped_stream_still_arrives_as_it_is_sent(upstream):
    with Proxy(upstream.url, buffering=False, gzip=True) as proxy:
        assert_streamed(read_events(proxy, upstream, gzip=True))


@nginx
def test_the_upstreams_x_accel_buffering_no_turns_buffering_off_for_its_response(upstream):
    with Proxy(upstream.url, buffering=True, gzip=True) as proxy:
        assert_streamed(read_events(proxy, upstream, gzip=True, accel="no"))
        # The same proxy, the header saying "yes": held back again, so it is the header that made the difference.
        held = read_events(proxy, upstream, gzip=True, accel="yes")
    assert held.sent_at_headers == EVENTS


# --- timeouts ---------------------------------------------------------------------------------------------------

def read_silent(proxy: Proxy, **params: float) -> tuple[bytes, Exception | None]:
    """A /silent stream through `proxy`: its bytes, and the error that ended it early, if one did."""
    body = b""
    try:
        with httpx.stream("GET", proxy.url_for("silent"), params=params, timeout=30) as response:
            assert response.status_code == 200
            for chunk in response.iter_raw():
                body += chunk
    except httpx.HTTPError as error:
        return body, error
    return body, None


@pytest.fixture(scope="module")
def impatient(upstream):
    """nginx that closes a stream after 1 s without a byte from the upstream."""
    with Proxy(upstream.url, read_timeout_s=1) as proxy:
        yield proxy


@nginx
def test_a_read_timeout_of_1_s_cuts_a_stream_silent_for_3_s_before_its_last_event(impatient):
    body, error = read_silent(impatient, silence=3)
    assert b'data: {"token": 0}' in body
    assert DONE not in body
    # nginx closes the connection without the chunked body's end: httpx calls that a protocol error.
    assert isinstance(error, httpx.RemoteProtocolError), error
    assert "upstream timed out" in impatient.error_log.read_text()


@nginx
def test_keep_alive_comments_every_0_3_s_keep_the_same_silence_from_being_cut(impatient):
    body, error = read_silent(impatient, silence=3, keepalive=0.3)
    assert error is None
    assert DONE in body
    assert body.count(b": keep-alive\n\n") >= 5


# --- the proxy's own behaviour -------------------------------------------------------------------------------

@nginx
def test_a_long_prompt_of_200_kb_reaches_the_upstream_with_the_forwarded_for_header(upstream):
    # Bigger than nginx's in-memory request body buffer: nginx writes it to a temp file in the proxy's folder.
    body = b"x" * 200_000
    with Proxy(upstream.url) as proxy:
        answer = httpx.post(proxy.url_for("echo"), content=body, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"bytes": len(body), "x_forwarded_for": "127.0.0.1"}


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def nginx_processes(pgid: int) -> list[psutil.Process]:
    return [process for process in group_members(pgid) if alive(process)]


@nginx
def test_stop_leaves_no_nginx_process_of_its_group_and_removes_its_folder(upstream):
    proxy = Proxy(upstream.url).start()
    pgid, folder = proxy.process.pid, proxy.prefix
    assert len(nginx_processes(pgid)) == 2  # the master and its one worker
    assert (folder / "nginx.conf").read_text() == proxy.config
    assert proxy.stop() is not None
    assert nginx_processes(pgid) == []
    assert not folder.exists()
    assert proxy.stop() == proxy.process.returncode  # a second stop does nothing more


@nginx
def test_an_interrupted_with_block_leaves_nothing_running_or_on_disk(upstream):
    with pytest.raises(KeyboardInterrupt), Proxy(upstream.url) as proxy:
        pgid, folder = proxy.process.pid, proxy.prefix
        raise KeyboardInterrupt
    assert nginx_processes(pgid) == []
    assert not folder.exists()


@nginx
def test_a_proxy_whose_port_is_taken_fails_with_one_line_naming_the_port(upstream):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ProxyError) as failure:
            Proxy(upstream.url, port).start()
    message = str(failure.value)
    assert f"port {port}" in message and "in use" in message and "\n" not in message


def test_the_config_has_the_streaming_settings_and_a_comment_for_each():
    folder = Path("/tmp/nginx-proxy-example")
    text = config_text(8080, "http://127.0.0.1:8100/", buffering=False, read_timeout_s=300, prefix=folder)
    lines = [row.split("#")[0].strip() for row in text.splitlines()]  # what nginx reads, comments left out
    for line in ["daemon off;", "worker_processes 1;", "listen 127.0.0.1:8080;", "proxy_pass http://127.0.0.1:8100;",
                 "proxy_http_version 1.1;", 'proxy_set_header Connection "";', "proxy_buffering off;",
                 "proxy_read_timeout 300s;", "gzip off;", f"pid {folder}/nginx.pid;",
                 f"proxy_temp_path {folder}/proxy;", f"client_body_temp_path {folder}/client_body;"]:
        assert line in lines, line
    for directive in ("proxy_http_version", "proxy_set_header Connection", "proxy_buffering", "proxy_read_timeout"):
        at = next(i for i, row in enumerate(lines) if row.startswith(directive))
        assert text.splitlines()[at - 1].strip().startswith("#"), f"{directive} has no comment above it"
    assert ("user root;" in lines) == (os.geteuid() == 0)
    buffered = config_text(8080, "http://127.0.0.1:8100", buffering=True, read_timeout_s=1.5, prefix=folder,
                           gzip=True)
    assert {"proxy_buffering on;", "proxy_read_timeout 1500ms;", "gzip on;", "gzip_types text/event-stream;"} \
        <= {row.strip() for row in buffered.splitlines()}


@pytest.mark.parametrize("upstream_url", ["https://127.0.0.1:8100", "http://127.0.0.1:8100/v1", "127.0.0.1:8100",
                                          "http://127.0.0.1:8100;evil", "http://"])
def test_an_upstream_that_is_not_an_http_host_and_port_is_refused_in_one_line(upstream_url):
    with pytest.raises(ValueError) as failure:
        Proxy(upstream_url)
    assert "\n" not in str(failure.value)


@nginx
def test_make_nginx_finds_nginx_and_says_which(capsys):
    assert proxy_module.main() == 0
    assert re.fullmatch(r"nginx for the proxy lessons and tests: \S+ \(nginx/[\d.]+\)\n", capsys.readouterr().out)


# --- the command line -------------------------------------------------------------------------------------------

READY = re.compile(r"Proxy ready: http://127\.0\.0\.1:(\d+) -> (\S+) \(buffering off, read timeout 300 s\); "
                   r"Ctrl-C stops it\.")


class Lines:
    """A process's output, line by line, read by a thread so that the test can wait with a deadline."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.thread = threading.Thread(target=self.pump, args=(process.stdout,), daemon=True)
        self.thread.start()

    def pump(self, stream) -> None:
        for line in stream:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, pattern: re.Pattern, timeout: float = 30) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            self.seen.append(line)
            if match := pattern.fullmatch(line):
                return match
        raise AssertionError(f"no line matching {pattern.pattern!r}; output:\n" + "\n".join(self.seen))

    def rest(self) -> list[str]:
        """Every line, once the process has exited."""
        self.thread.join(10)
        while not self.lines.empty():
            if (line := self.lines.get_nowait()) is not None:
                self.seen.append(line)
        return self.seen


@nginx
@pytest.mark.parametrize("stop_with", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
def test_the_command_line_serves_until_a_signal_then_stops_nginx_and_exits_0(upstream, stop_with):
    port = free_port()
    process = subprocess.Popen([sys.executable, str(SCRIPT), "--port", str(port), "--upstream", upstream.url],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output = Lines(process)
        ready = output.wait_for(READY)
        assert ready.groups() == (str(port), upstream.url)
        assert any(line.strip() == "proxy_buffering off;" for line in output.seen)  # it printed its config
        children = psutil.Process(process.pid).children(recursive=True)
        assert any("nginx" in child.name() for child in children)
        answer = httpx.post(f"http://127.0.0.1:{port}/echo", content=b"hello", timeout=30)
        assert answer.json()["bytes"] == 5
        process.send_signal(stop_with)
        assert process.wait(timeout=30) == 0
        lines = output.rest()
        closing = re.compile(rf"Stopped nginx \(pid \d+\) on http://127\.0\.0\.1:{port} and removed (\S+)\.")
        match = next(filter(None, map(closing.fullmatch, lines)), None)
        assert match, "\n".join(lines)
        assert not Path(match.group(1)).exists()
        assert not [child for child in children if alive(child)]
        assert "Traceback" not in "\n".join(lines)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("args, expected", [
    (["--port", "0"], "from 1 to 65535"),
    (["--port", "eighty"], "not a port number"),
    (["--upstream", "https://127.0.0.1:8100"], "http:// URL"),
    (["--upstream", "http://127.0.0.1:8100/v1"], "without a path"),
    (["--buffering", "maybe"], "on or off"),
    (["--read-timeout", "0"], "above 0"),
    (["--colour", "blue"], "unrecognized arguments"),
])
def test_bad_command_line_input_is_one_line_and_exit_code_2(capsys, args, expected):
    with pytest.raises(SystemExit) as leaving:
        proxy_script.main(args)
    assert leaving.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and expected in captured.err, captured.err


@nginx
def test_a_port_in_use_is_one_line_and_exit_code_1(capsys, upstream):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert proxy_script.main(["--port", str(port), "--upstream", upstream.url]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"scripts/proxy.py: port {port} is already in use on 127.0.0.1\n", captured
    assert captured.out == ""


def test_no_nginx_is_one_line_saying_how_to_get_one_and_exit_code_1(capsys, monkeypatch):
    monkeypatch.setattr(proxy_module, "find_nginx", lambda: None)
    assert proxy_script.main(["--port", str(free_port())]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"scripts/proxy.py: {HOW_TO_GET_ONE}\n" and captured.out == ""


def test_bad_input_from_a_real_command_line_shows_no_traceback():
    done = subprocess.run([sys.executable, str(SCRIPT), "--upstream", "ftp://example"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert done.stdout == "" and done.stderr.count("\n") == 1 and "http:// URL" in done.stderr
