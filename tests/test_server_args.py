"""streaming_server.py's command line: vLLM's own flags, with this server's defaults. No server needed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from streaming_tutorial.model import DEFAULT_MODEL_DIR, DEFAULT_MODEL_NAME
from streaming_tutorial.processes.local_server import PROJECT_ROOT
from streaming_tutorial.server import cpu_defaults
from streaming_tutorial.server.app import ready_banner
from streaming_tutorial.server.args import BUNDLED_MODEL_TOOL_CALL_PARSER, parse_args


def test_no_flags_serve_the_bundled_model_on_loopback():
    args = parse_args([])
    assert args.model == str(DEFAULT_MODEL_DIR)
    assert args.served_model_name == [DEFAULT_MODEL_NAME]
    assert (args.host, args.port) == ("127.0.0.1", 8000)


def test_cpu_defaults_apply_only_on_a_cpu():
    args = parse_args([])
    if cpu_defaults.running_on_cpu():
        for name, value in cpu_defaults.CPU_FLAG_DEFAULTS.items():
            assert getattr(args, name) == value
        assert args.dtype == cpu_defaults.cpu_dtype() in ("bfloat16", "float32")
        assert args.kv_cache_memory_bytes > 0  # unset, a second server beside the first cannot start
    else:  # a GPU keeps vLLM's own defaults
        assert (args.dtype, args.kv_cache_memory_bytes) == ("auto", None)


def test_cpu_environment_defaults_fill_gaps_and_never_override_the_user(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})  # a 2-core machine
    monkeypatch.setattr(cpu_defaults.psutil, "cpu_count", lambda logical=True: 2)
    unset: dict[str, str] = {}
    monkeypatch.setattr(os, "environ", unset)
    cpu_defaults.apply_cpu_env_defaults()
    assert unset == {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}  # the engine gets both cores

    exported = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}
    monkeypatch.setattr(os, "environ", exported)
    cpu_defaults.apply_cpu_env_defaults()
    assert exported == {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}


@pytest.mark.parametrize("argv, environ, cores, on_cpu, backend", [
    ([], {}, 2, True, "uni"),  # 2 cores: the model runs inside the EngineCore
    ([], {}, 1, True, "uni"),
    ([], {}, 8, True, None),  # a bigger machine: vLLM's choice (a Worker process, threads bound)
    ([], {}, 2, False, None),  # a GPU: vLLM's choice (uni already, for one GPU)
    (["--distributed-executor-backend", "mp"], {}, 2, True, "mp"),  # the user's choice wins
    (["--tensor-parallel-size", "2"], {}, 2, True, None),  # several workers need vLLM's processes
    ([], {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}, 2, True, None),
    ([], {"VLLM_CPU_OMP_THREADS_BIND": "0-1"}, 2, True, None),
])
def test_the_model_runs_inside_the_engine_core_only_on_a_small_cpu_and_only_unless_told_otherwise(
        monkeypatch, argv, environ, cores, on_cpu, backend):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr(cpu_defaults.psutil, "cpu_count", lambda logical=True: cores)
    monkeypatch.setattr(cpu_defaults, "running_on_cpu", lambda: on_cpu)
    for name in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_OMP_THREADS_BIND"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert parse_args(argv).distributed_executor_backend == backend


@pytest.mark.parametrize("argv, cores, on_cpu, expected", [
    ([], 2, True, cpu_defaults.CPU_PREFILL_BUDGET),  # a small CPU: a long prompt is read in short steps
    (["--max-num-seqs", "256"], 2, True, 256),  # vLLM needs a budget of at least --max-num-seqs
    (["--max-num-batched-tokens", "4096"], 2, True, 4096),  # the user's budget wins
    (["--no-enable-chunked-prefill"], 2, True, None),  # whole prompts in one step: vLLM's budget for that
    ([], 8, True, None),  # a bigger CPU, and a GPU: vLLM's own budget
    ([], 2, False, None),
])
def test_a_small_cpu_prefills_a_long_prompt_in_short_steps_unless_told_otherwise(
        monkeypatch, argv, cores, on_cpu, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr(cpu_defaults.psutil, "cpu_count", lambda logical=True: cores)
    monkeypatch.setattr(cpu_defaults, "running_on_cpu", lambda: on_cpu)
    assert parse_args(argv).max_num_batched_tokens == expected


@pytest.mark.parametrize("argv, cpu_computes, cores, on_cpu, expected", [
    ([], "float32", 2, True, 32),  # an AVX2-only laptop: fp32, a long prompt in 32-token chunks beside others
    ([], "bfloat16", 2, True, 0),  # native bf16 (AVX-512): the 128-token budget is chunk enough
    (["--dtype", "float"], "bfloat16", 2, True, 32),  # fp32 asked for on any CPU
    (["--dtype", "auto"], "float32", 2, True, 32),  # auto: what this server picks for the CPU
    (["--long-prefill-token-threshold", "64"], "float32", 2, True, 64),  # the user's cap wins
    (["--long-prefill-token-threshold", "0"], "float32", 2, True, 0),  # and so does the user's "no cap"
    (["--max-num-batched-tokens", "16", "--max-num-seqs", "16"], "float32", 2, True, 0),  # budget under the chunk
    (["--no-enable-chunked-prefill"], "float32", 2, True, 0),  # whole prompts in one step
    ([], "float32", 8, True, 0),  # a bigger CPU, and a GPU: vLLM's own
    ([], "float32", 2, False, 0),
])
def test_a_long_prompt_beside_other_streams_is_read_in_chunks_the_cpu_computes_quickly(
        monkeypatch, argv, cpu_computes, cores, on_cpu, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr(cpu_defaults.psutil, "cpu_count", lambda logical=True: cores)
    monkeypatch.setattr(cpu_defaults, "running_on_cpu", lambda: on_cpu)
    monkeypatch.setattr(cpu_defaults, "cpu_dtype", lambda: cpu_computes)
    assert parse_args(argv).long_prefill_token_threshold == expected


def test_the_engine_gets_intel_openmp_unless_the_user_preloads_a_library(monkeypatch):
    """cpu_defaults.engine_core_env_defaults: what keeps the engine streaming beside a busy core."""
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
    defaults = cpu_defaults.engine_core_env_defaults()
    monkeypatch.delenv("KMP_BLOCKTIME", raising=False)
    defaults = cpu_defaults.engine_core_env_defaults()
    assert defaults == ({"LD_PRELOAD": str(iomp), "KMP_BLOCKTIME": "1"} if iomp.exists() else {})  # x86 only
    assert "OMP_DYNAMIC" not in defaults  # dynamic teams hang vLLM's CPU attention (docs/benchmarks.md)
    monkeypatch.setenv("LD_PRELOAD", "libtcmalloc.so")
    assert cpu_defaults.engine_core_env_defaults() == {}


def test_bigger_machines_keep_vllms_own_thread_binding(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(cpu_defaults.psutil, "cpu_count", lambda logical=True: 8)
    assert cpu_defaults.cpu_env_defaults() == {}


def test_user_flags_win_over_our_defaults():
    args = parse_args(["--host", "0.0.0.0", "--port", "9001", "--dtype", "float16",
                                        "--max-model-len", "1024", "--kv-cache-memory-bytes", "123456789",
                                        "--api-key", "secret"])
    assert (args.host, args.port, args.dtype, args.max_model_len) == ("0.0.0.0", 9001, "float16", 1024)
    assert args.kv_cache_memory_bytes == 123456789
    assert args.api_key == ["secret"]


@pytest.mark.parametrize("argv", [["--model", "some/model"], ["some/model"]])
def test_another_model_keeps_its_own_name(argv):
    args = parse_args(argv)
    assert args.model == "some/model"
    assert args.served_model_name is None  # vLLM then serves it under its own path


def test_unknown_flag_is_a_one_line_cli_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--no-such-flag"])
    assert exit_info.value.code == 2
    assert "--no-such-flag" in capsys.readouterr().err


def test_help_lists_vllm_flags_with_our_defaults():
    result = subprocess.run([sys.executable, "streaming_server.py", "--help=all"], capture_output=True, text=True,
                            cwd=PROJECT_ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for flag in ("--api-key", "--root-path", "--uds", "--ssl-keyfile", "--middleware", "--max-model-len",
                 "--kv-cache-memory-bytes", "--enforce-eager"):
        assert flag in result.stdout
    assert "Host name. (default: 127.0.0.1)" in result.stdout


def test_the_ready_banner_gives_the_url_the_page_a_curl_line_and_the_notebook_setting():
    banner = ready_banner(parse_args([]))
    assert "Ready: http://127.0.0.1:8000\n" in banner
    assert "page:      http://127.0.0.1:8000/" in banner
    assert "curl -N http://127.0.0.1:8000/v1/chat/completions" in banner and DEFAULT_MODEL_NAME in banner
    assert "TUTORIAL_SERVER_URL=http://127.0.0.1:8000" in banner and "Authorization" not in banner


def test_the_ready_banner_of_a_keyed_network_server_asks_for_the_key_and_never_shows_it():
    banner = ready_banner(parse_args(["--host", "0.0.0.0",
                                                                        "--api-key", "s3cret"]))
    assert "listening on 0.0.0.0" in banner
    assert "Authorization: Bearer <key>" in banner and "TUTORIAL_API_KEY=<key>" in banner
    assert "s3cret" not in banner


def test_the_bundled_model_gets_a_tool_call_parser_so_named_and_required_tool_choice_work():
    args = parse_args([])
    assert (args.tool_call_parser, args.enable_auto_tool_choice) == (BUNDLED_MODEL_TOOL_CALL_PARSER,
                                                                     True)


@pytest.mark.parametrize(("argv", "expected"), [
    (["--tool-call-parser", "hermes"], ("hermes", False)),  # the user's parser, and vLLM's default for auto
    (["--tool-call-parser", "hermes", "--enable-auto-tool-choice"], ("hermes", True)),
    (["--no-enable-auto-tool-choice"], (None, False)),       # the way to serve the bundled model without one
    (["--model", "some/model"], (None, False)),              # another model keeps vLLM's defaults
])
def test_tool_flags_the_user_gives_win_over_the_bundled_default(argv, expected):
    args = parse_args(argv)
    assert (args.tool_call_parser, args.enable_auto_tool_choice) == expected


def test_the_session_server_prefills_in_steps_of_its_budget(server):
    budget = parse_args([]).max_num_batched_tokens
    log = server.log_path.read_text(errors="replace")
    if budget is None:  # a GPU or a bigger CPU: vLLM's own budget, whatever it is
        assert "max_num_batched_tokens=" in log
    else:
        assert f"Chunked prefill is enabled with max_num_batched_tokens={budget}." in log
