"""The lessons on a plain vLLM server, as the README promises (issue 28): vLLM's own launcher on the bundled
model, its defaults plus an explicit KV cache size; no keys, no page, nothing of this project in the server.

One plain server for the module (a start takes 30-40 s once its compiled model is cached, a few minutes the
first time), given the model as a RELATIVE path from the repository root, `models/SmolLM2-135M-Instruct`: the
harder case, since /v1/models then reports the path as typed, and a client reading it from another folder (a
notebook's) does not find it. The absolute form needs no second server: the path reaches a notebook only
through /v1/models, whose `id` the notebook sends back as the model's name (the server matches it as a string,
whatever its form), and whose `root` only the benchmark client's tokenizer lookup reads: the unit tests below
give that lookup both forms.

The notebooks run as nbmake runs them (nbclient, the notebook's folder as the kernel's working directory, the
same per-cell timeout), with TUTORIAL_SERVER_URL set for their kernel alone: the rest of the session keeps its
own server."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import nbformat
import openai
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from streaming_tutorial.client.latency import (
    TokenizerNotFound,
    bench_tokenizer,
    find_tokenizer,
    vllm_bench,
    vllm_bench_argv,
)
from streaming_tutorial.client.notebook import KEY_VARIABLE, URL_VARIABLE, stop_with_kernel
from streaming_tutorial.model import DEFAULT_MODEL_DIR, PROJECT_ROOT
from streaming_tutorial.processes.local_server import LOG_DIR, TEST_KV_CACHE_BYTES, LocalServer

PLAIN_VLLM = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
RELATIVE_MODEL = str(DEFAULT_MODEL_DIR.relative_to(PROJECT_ROOT))  # models/SmolLM2-135M-Instruct
NOTEBOOKS_DIR = PROJECT_ROOT / "notebooks"
# Each notebook, and a line of its output that shows its plain-server-sensitive part ran (not just "no error").
NOTEBOOKS = {
    "02-stream-with-curl.ipynb": "end of stream",  # the SSE frames, labelled
    "03-stream-with-openai-client.ipynb": "tokens generated for the aborted request",  # /metrics read
    "04-measure-token-latency.ipynb": "Serving Benchmark Result",  # vLLM's benchmark client's table
}


# --- where vLLM's benchmark client finds the tokenizer (no server) ----------------------------------------

@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt from this process fails the test: a model hub must never be asked."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a network connection was attempted: {args}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_an_absolute_model_path_is_its_own_tokenizer_folder(no_network):
    assert find_tokenizer(str(DEFAULT_MODEL_DIR), cwd=NOTEBOOKS_DIR) == DEFAULT_MODEL_DIR


def test_a_relative_model_path_is_found_from_the_repository_root_when_read_from_a_notebooks_folder(no_network):
    assert not (NOTEBOOKS_DIR / RELATIVE_MODEL).exists()  # else this test would prove nothing
    assert find_tokenizer(RELATIVE_MODEL, cwd=NOTEBOOKS_DIR) == DEFAULT_MODEL_DIR
    assert find_tokenizer(RELATIVE_MODEL, cwd=PROJECT_ROOT) == DEFAULT_MODEL_DIR


def test_a_hub_id_is_found_in_the_local_hugging_face_cache_only(tmp_path, no_network):
    snapshot = tmp_path / "models--SomeOrg--some-model" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "tokenizer_config.json").write_text("{}")
    (tmp_path / "models--SomeOrg--some-model" / "refs").mkdir()
    (tmp_path / "models--SomeOrg--some-model" / "refs" / "main").write_text("abc123")
    assert find_tokenizer("SomeOrg/some-model", cwd=tmp_path, hub_cache=tmp_path) == snapshot


@pytest.mark.parametrize("root", ["OtherOrg/not-cached-here", "/srv/models/on-the-gpu-box", "models/not-here"])
def test_a_model_this_machine_does_not_have_is_refused_with_a_reason_not_downloaded(root, tmp_path, no_network):
    with pytest.raises(TokenizerNotFound, match="never downloads from a model hub") as refused:
        find_tokenizer(root, cwd=tmp_path, hub_cache=tmp_path)
    assert repr(root) in str(refused.value)


class ModelsOnly(BaseHTTPRequestHandler):
    """A stand-in server that serves a model this machine does not have, and records every request."""
    requests: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.requests.append(f"GET {self.path}")
        body = json.dumps({"data": [{"id": "big-model", "root": "OtherOrg/big-model"}]}).encode()
        self.send_response(200 if self.path == "/v1/models" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # noqa: N802
        self.requests.append(f"POST {self.path}")
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_vllm_bench_refuses_a_server_whose_tokenizer_is_not_here_before_sending_it_any_request(tmp_path,
                                                                                             monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))  # an empty Hugging Face cache
    stand_in = ThreadingHTTPServer(("127.0.0.1", 0), ModelsOnly)
    thread = threading.Thread(target=stand_in.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{stand_in.server_port}"
        with pytest.raises(TokenizerNotFound, match="OtherOrg/big-model"):
            asyncio.run(vllm_bench(vllm_bench_argv(url)))
    finally:
        stand_in.shutdown()
        stand_in.server_close()
    assert ModelsOnly.requests == ["GET /v1/models"]


# --- the plain server -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plain_server():
    """vLLM's own launcher on the bundled model as a RELATIVE path (resolved from the repository root, the
    server's working directory), its defaults plus the explicit KV cache size every test server gets."""
    server = LocalServer(["--model", RELATIVE_MODEL, "--kv-cache-memory-bytes", TEST_KV_CACHE_BYTES],
                         command=PLAIN_VLLM, log_path=LOG_DIR / "plain-vllm.log", env={"VLLM_LOGGING_COLOR": "0"})
    server.launch()
    stop_with_kernel(server.process.pid)  # stopped also if this pytest process is killed
    try:
        server.wait_until_healthy()
        yield server
    finally:
        server.stop()


@pytest.mark.server
def test_the_plain_server_is_vllms_own_launcher_without_this_projects_page(plain_server):
    command_line = " ".join(plain_server.process_tree()[0].cmdline())
    assert "vllm.entrypoints.openai.api_server" in command_line and "streaming_server" not in command_line
    assert httpx.get(plain_server.url_for("")).status_code == 404  # no classroom page at its root


@pytest.mark.server
def test_plain_vllm_health_is_an_empty_200(plain_server):
    """What our JSON /health replaces (and what notebooks must accept from a plain `vllm serve`)."""
    response = httpx.get(plain_server.url_for("health"))
    assert response.status_code == 200
    assert response.content == b""


@pytest.mark.server
def test_plain_vllm_names_the_model_by_its_relative_path_and_the_benchmark_still_finds_its_tokenizer(
        plain_server, monkeypatch):
    model = httpx.get(plain_server.url_for("v1", "models")).json()["data"][0]
    assert (model["id"], model["root"]) == (RELATIVE_MODEL, RELATIVE_MODEL)
    monkeypatch.chdir(NOTEBOOKS_DIR)  # where a notebook's kernel runs
    assert bench_tokenizer(plain_server.url) == DEFAULT_MODEL_DIR


@pytest.mark.server
def test_plain_vllm_streams_the_readme_example(plain_server):
    client = openai.OpenAI(base_url=plain_server.url_for("v1"), api_key="EMPTY", max_retries=0)
    model = client.models.list().data[0].id
    stream = client.chat.completions.create(
        model=model, stream=True, temperature=0, max_tokens=32,
        messages=[{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": "What is the capital of France?"}])
    pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2
    assert "".join(pieces).strip()


def outputs_text(nb: nbformat.NotebookNode) -> str:
    texts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            texts.append(output.get("text", "") or output.get("data", {}).get("text/plain", ""))
    return "\n".join(texts)


@pytest.mark.server
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_the_notebook_passes_against_plain_vllm(name, plain_server, request):
    nb = nbformat.read(NOTEBOOKS_DIR / name, as_version=4)
    env = {**os.environ, URL_VARIABLE: plain_server.url}
    env.pop(KEY_VARIABLE, None)  # the plain server has no key
    kernel = request.config.getoption("nbmake_kernel")  # as nbmake: the notebook's own kernel unless overridden
    client = NotebookClient(nb, timeout=request.config.getoption("nbmake_timeout"), record_timing=True,
                            **({"kernel_name": kernel} if kernel else {}))
    try:
        client.execute(cwd=str(NOTEBOOKS_DIR), env=env)
    except CellExecutionError as error:
        pytest.fail(f"{name} fails against plain vLLM ({plain_server.url}, log {plain_server.log_path}):\n{error}",
                    pytrace=False)
    printed = outputs_text(nb)
    assert f"using the server at {plain_server.url}" in printed, f"{name} did not use the plain server"
    assert NOTEBOOKS[name] in printed, f"{name} ran, but its output lacks {NOTEBOOKS[name]!r}"
