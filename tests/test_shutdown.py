"""Stopping: SIGINT/SIGTERM stop the server and every child within seconds, whether it serves or is still
starting, and an engine that dies under in-flight streams stops the whole server with an error for the streams,
not a hang. Each test starts its own server (--enforce-eager) and signals only the server process (not its
group, which would hide a child the server failed to stop); LocalServer still cleans up whatever is left if a
test fails."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import httpx
import psutil
import pytest
from server_checks import own_server, wait_for

from streaming_tutorial.processes.local_server import PROJECT_ROOT, tail

STOP_DEADLINE = 15.0  # seconds from the signal (or the engine's death) until no process of the tree is left
STREAMS = 3


def start_streams(server, n: int) -> tuple[list[threading.Thread], dict]:
    """n long completions streaming in threads; returns once each has received a token."""
    outcomes: dict[int, dict] = {}
    started = threading.Barrier(n + 1, timeout=120)

    def run(i):
        outcome = outcomes[i] = {"events": [], "error": None}
        try:
            with httpx.stream("POST", server.url_for("v1", "completions"), timeout=httpx.Timeout(60, read=30),
                              json={"model": "SmolLM2-135M-Instruct", "prompt": f"Story {i}:", "stream": True,
                                    "max_tokens": 1000, "ignore_eos": True}) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        outcome["events"].append(line[5:].strip())
                        if len(outcome["events"]) == 1:
                            started.wait()
        except Exception as error:  # a closed connection: what a user may see
            outcome["error"] = repr(error)
        finally:
            outcome["ended"] = time.monotonic()
            if not outcome["events"]:
                started.abort()

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for thread in threads:
        thread.start()
    started.wait()
    return threads, outcomes


def assert_streams_ended(threads, outcomes, since: float) -> list[str]:
    """Every stream ended (no hang): with an error event, a [DONE], or a closed connection."""
    endings = []
    for thread in threads:
        thread.join(STOP_DEADLINE + 30)
        assert not thread.is_alive(), "a stream hung after the server stopped"
    for _, outcome in sorted(outcomes.items()):
        assert outcome["ended"] - since < STOP_DEADLINE + 30
        events = outcome["events"]
        if any('"error"' in e for e in events):
            endings.append("error event")
        elif outcome["error"]:
            endings.append(f"connection closed ({outcome['error'][:60]})")
        else:
            assert events[-1] == "[DONE]", events[-3:]
            endings.append("[DONE]")
    return endings


def assert_tree_gone(tree: list[psutil.Process], since: float) -> float:
    gone, alive = psutil.wait_procs(tree, timeout=max(0.1, since + STOP_DEADLINE - time.monotonic()))
    assert not alive, f"still running {STOP_DEADLINE} s later: {[(p.pid, p.name()) for p in alive]}"
    return time.monotonic() - since


@pytest.mark.server  # starts its own server
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_the_server_and_every_child(signum):
    with own_server(f"shutdown-{signum.name}") as server:
        threads, outcomes = start_streams(server, 1)
        tree = server.process_tree()
        names = [p.name() for p in tree]
        assert "VLLM::EngineCore" in names and len(tree) >= 2, names
        sent = time.monotonic()
        server.process.send_signal(signum)
        code = server.process.wait(STOP_DEADLINE)
        elapsed = assert_tree_gone(tree, sent)
        endings = assert_streams_ended(threads, outcomes, sent)
        print(f"\n{signum.name}: exit code {code}, whole tree ({len(tree)} processes: {names}) gone after "
              f"{elapsed:.1f} s; in-flight stream: {endings}")
        assert code in (0, -signum, 128 + signum), code
        assert "nanobind: leaked" not in server.log_path.read_text(errors="replace")  # a clean screen on Ctrl-C


# ---- a signal while the server starts (streaming_tutorial/server/startup_signals.py) ----

def names(tree: list[psutil.Process]) -> list[str]:
    found = []
    for proc in tree:
        try:
            found.append(proc.name())
        except psutil.NoSuchProcess:
            pass
    return found


# Points of start-up, each recognised from the outside: (what the server's log shows, whether the engine
# process exists). "early": the API server builds the engine's configuration, no engine yet; "mid": the engine
# process loads the model (on an empty compile cache it would then compile for minutes); "late": the engine is
# ready and vLLM builds the app, before uvicorn takes over the signals.
START_PHASES = {
    "early": lambda log, tree: "Resolved architecture" in log and "VLLM::EngineCore" not in names(tree),
    "mid": lambda log, tree: "VLLM::EngineCore" in names(tree) and "Supported tasks" not in log,
    "late": lambda log, tree: "Supported tasks" in log and "Starting vLLM server" not in log,
}


@pytest.mark.server  # starts its own server
@pytest.mark.parametrize("phase", list(START_PHASES))
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_while_starting_stops_every_process(phase, signum):
    server = own_server(f"startup-{phase}-{signum.name}")
    try:
        server.launch()

        def at_phase():
            assert server.process.poll() is None, tail(server.log_path)
            tree = server.process_tree()
            return tree if START_PHASES[phase](server.log_path.read_text(errors="replace"), tree) else None

        tree = wait_for(at_phase, timeout=300, interval=0.02, what=f"the {phase} phase of start-up")
        running = names(tree)
        sent = time.monotonic()
        server.process.send_signal(signum)
        code = server.process.wait(STOP_DEADLINE)
        elapsed = assert_tree_gone(tree, sent)
        log = server.log_path.read_text(errors="replace")
        print(f"\n{signum.name} {phase}: exit code {code}, tree {running} gone after {elapsed:.1f} s")
        assert f"Received {signum.name} while starting" in log, tail(server.log_path)
        assert code == -signum, code  # ended by the signal, as a shell expects (it shows 128 + signum)
        assert "Ready:" not in log
    finally:
        server.stop()


GUARDED_START = textwrap.dedent("""
    import subprocess, sys, zmq
    from streaming_tutorial.server.startup_signals import StartupGuard
    StartupGuard(grace=1.0).install()
    # An engine under construction: it only records SIGTERM and SIGINT (vllm/v1/engine/core.py).
    engine = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                               "[signal.signal(s, lambda *a: None) for s in (signal.SIGTERM, signal.SIGINT)]; "
                               "print('up', flush=True); time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    engine.stdout.readline()
    print(engine.pid, flush=True)
    zmq.Context().socket(zmq.PULL).poll(600_000)  # waiting for the engine's handshake, as vLLM's client does
""")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_startup_guard_stops_an_engine_that_ignores_the_signal(signum):
    """The guard alone, on a stand-in for vLLM's start-up: a main thread blocked in a zmq poll, a child that
    ignores the signal. (No vLLM: seconds, and no server lock needed.)"""
    process = subprocess.Popen([sys.executable, "-c", GUARDED_START], cwd=PROJECT_ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ,
                                                                                    "PYTHONPATH": str(PROJECT_ROOT)})
    try:
        engine = psutil.Process(int(process.stdout.readline()))
        process.send_signal(signum)
        code = process.wait(STOP_DEADLINE)
        psutil.wait_procs([engine], timeout=STOP_DEADLINE)
        stderr = process.stderr.read()
        assert not engine.is_running() or engine.status() == psutil.STATUS_ZOMBIE
        assert code == -signum, (code, stderr)
        assert f"Received {signum.name} while starting" in stderr and "Stopped: python" in stderr, stderr
    finally:
        if process.poll() is None:
            process.kill()


def engine_core(server) -> psutil.Process:
    return next(p for p in server.process_tree() if p.name() == "VLLM::EngineCore")


@pytest.mark.server  # starts its own server
def test_engine_death_stops_the_server_and_ends_the_streams():
    with own_server("engine-kill") as server:
        threads, outcomes = start_streams(server, STREAMS)
        tree = server.process_tree()
        killed = time.monotonic()
        engine_core(server).kill()
        code = server.process.wait(STOP_DEADLINE)
        elapsed = assert_tree_gone(tree, killed)
        endings = assert_streams_ended(threads, outcomes, killed)
        log = server.log_path.read_text(errors="replace")
        our_line = [line for line in log.splitlines() if "engine process died" in line]
        print(f"\nengine killed: server exit code {code}, tree gone after {elapsed:.1f} s; streams: {endings}; "
              f"our last line: {our_line[-1:]}")
        assert code == 1, tail(server.log_path)
        assert len(our_line) == 1 and "ERROR" in our_line[0]
        # The last line our server logs says why (interpreter-exit noise from third-party bindings may follow).
        logged = [line for line in log.splitlines() if line.startswith("(APIServer")]
        assert logged[-1] == our_line[0], logged[-3:]
        assert "EngineDeadError" in log or "EngineCore" in log
        assert all(e == "error event" or e.startswith("connection closed") for e in endings), endings
