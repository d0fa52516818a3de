"""streaming_tutorial.client.notebook and processes.stopping/local_server: reading /metrics, choosing a server,
waiting for one to answer, and tying a server's process group to the kernel's life."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest

from streaming_tutorial.client import notebook
from streaming_tutorial.client.metrics import metric
from streaming_tutorial.client.notebook import connect
from streaming_tutorial.processes.local_server import ServerStartError, free_port, poll_until_ok
from streaming_tutorial.processes.stopping import group_alive, stop_process_group

METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 2.0
vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 5.0
vllm:request_success_total{engine="0",finished_reason="abort",model_name="m"} 3.0
vllm:request_success_total{engine="1",finished_reason="abort",model_name="m"} 1.0
vllm:request_success_created{engine="0",finished_reason="abort",model_name="m"} 1.7e+09
"""


def test_metric_sums_matching_samples():
    assert metric(METRICS, "vllm:num_requests_running") == 2.0
    assert metric(METRICS, "vllm:request_success_total", finished_reason="abort") == 4.0
    assert metric(METRICS, "vllm:request_success_total") == 9.0
    assert metric(METRICS, "vllm:request_success_total", finished_reason="error") == 0.0
    assert metric(METRICS, "vllm:no_such_metric") == 0.0


def http_server(status: int) -> subprocess.Popen:
    """A real HTTP server on a free loopback port that answers every GET with `status`; `.url` is its address."""
    port = free_port()
    code = ("import http.server\n"
            "class H(http.server.BaseHTTPRequestHandler):\n"
            f"    def do_GET(self): self.send_response({status}); self.end_headers(); self.wfile.write(b'{{}}')\n"
            "    def log_message(self, *a): pass\n"
            f"http.server.HTTPServer(('127.0.0.1', {port}), H).serve_forever()")
    process = subprocess.Popen([sys.executable, "-c", code])
    process.url = f"http://127.0.0.1:{port}/ready"
    return process


def test_the_poll_returns_the_first_200_once_the_server_listens():
    server = http_server(200)  # the poll starts at once, whether or not the server listens yet
    try:
        assert poll_until_ok(server.url, 30, process=server, interval=0.1).json() == {}
    finally:
        server.kill()
        server.wait()


def test_the_poll_names_the_last_answer_when_time_runs_out():
    server = http_server(503)
    try:
        with pytest.raises(ServerStartError, match=r"the router at .* did not answer 200 in 2 s \(HTTP 503\)"):
            poll_until_ok(server.url, 2, what="the router", process=server, interval=0.1)
    finally:
        server.kill()
        server.wait()


def test_the_poll_fails_fast_with_the_log_when_the_process_exits(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("ValueError: no such model\n")
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    dead.wait()
    # The message is the exit's, not the deadline's: the poll stopped at its first check of the process.
    with pytest.raises(ServerStartError, match=r"(?s)JupyterLab exited with code 3 .*no such model"):
        poll_until_ok(f"http://127.0.0.1:{free_port()}/", 60, what="JupyterLab", process=dead, log_path=log)


def _wait_gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not group_alive(pgid):
            return True
        time.sleep(0.1)
    return False


def test_stopping_a_process_group_escalates_to_sigkill():
    code = ("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "print('ignoring SIGTERM', flush=True)\ntime.sleep(60)")
    stubborn = subprocess.Popen([sys.executable, "-c", code], start_new_session=True, stdout=subprocess.PIPE,
                                text=True)
    assert stubborn.stdout.readline().strip() == "ignoring SIGTERM"
    assert stop_process_group(stubborn.pid, grace=1) == {stubborn.pid: -9}
    assert not group_alive(stubborn.pid)


def test_server_group_dies_when_the_kernel_is_killed():
    """A stand-in 'kernel' starts a stand-in 'server' in its own group with stop_with_kernel, then is
    SIGKILLed (no atexit): the watchdog must take the server's whole group down."""
    kernel = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        "from streaming_tutorial.client.notebook import stop_with_kernel\n"
        "server = subprocess.Popen(['sleep', '120'], start_new_session=True)\n"
        "stop_with_kernel(server.pid)\n"
        "print(server.pid, flush=True)\n"
        "time.sleep(120)\n")], stdout=subprocess.PIPE, text=True)
    server_pid = int(kernel.stdout.readline())
    assert group_alive(server_pid)
    kernel.kill()
    kernel.wait()
    assert _wait_gone(server_pid, 10), "the server outlived its kernel"


def test_server_group_dies_at_normal_exit():
    kernel = subprocess.run([sys.executable, "-c", (
        "import subprocess\n"
        "from streaming_tutorial.client.notebook import stop_with_kernel\n"
        "server = subprocess.Popen(['sleep', '120'], start_new_session=True)\n"
        "stop_with_kernel(server.pid)\n"
        "print(server.pid)\n"
        "raise SystemExit(3)  # like a failed cell followed by kernel shutdown\n")],
        capture_output=True, text=True, timeout=60)
    assert kernel.returncode == 3, kernel.stderr
    assert _wait_gone(int(kernel.stdout.split()[0]), 5)


def test_connect_uses_the_given_server(server, monkeypatch):
    monkeypatch.setenv("TUTORIAL_SERVER_URL", server.url + "/")
    monkeypatch.delenv("TUTORIAL_API_KEY", raising=False)
    conn = connect()
    assert conn.url == server.url and conn.server is None
    assert conn.health["status"] == "healthy"
    assert conn.model() == "SmolLM2-135M-Instruct"
    conn.close()  # a given server is left running
    assert psutil.Process(server.process.pid).is_running()


def test_connect_prefers_the_given_url_and_never_probes_make_serve(server, monkeypatch):
    """With TUTORIAL_SERVER_URL set (as `make test` sets it for nbmake), a stray server on 8000 is not used."""
    probed = []
    monkeypatch.setattr(notebook, "running_health", lambda url: probed.append(url))
    monkeypatch.setenv("TUTORIAL_SERVER_URL", server.url)
    assert connect().url == server.url
    assert probed == []


def test_connect_uses_a_healthy_server_at_make_serves_address(server, monkeypatch, capsys):
    monkeypatch.delenv("TUTORIAL_SERVER_URL", raising=False)
    monkeypatch.setattr(notebook, "MAKE_SERVE_URL", server.url)
    conn = connect()
    assert conn.url == server.url and conn.server is None
    assert conn.health["status"] == "healthy"
    assert "`make serve`'s address answered /health" in capsys.readouterr().out


def test_running_health_is_none_where_nothing_listens():
    assert notebook.running_health(f"http://127.0.0.1:{free_port()}") is None
