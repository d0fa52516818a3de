"""What `make bench` (scripts/bench.py) and `make study` (scripts/study_defaults.py) share: the workload, the
flags both compared servers get, and where results go.

Every request gets a prompt no request before it had (a repeated prompt would hit the prefix cache and flatter
TTFT); seeded, so every run sends the same prompts in the same order. The bodies are those of notebooks 04 and
05 (`latency.random_token_bodies`), which is what vLLM's `random` dataset sends, so its client can cross-check.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import random
from datetime import UTC, datetime
from pathlib import Path

from streaming_tutorial.client import latency
from streaming_tutorial.model import DEFAULT_MODEL_DIR, DEFAULT_MODEL_NAME
from streaming_tutorial.processes.local_server import PROJECT_ROOT, TEST_KV_CACHE_BYTES, LocalServer
from streaming_tutorial.server.args import parse_args
from streaming_tutorial.server.cpu_defaults import (
    CPU_FLAG_DEFAULTS,
    cpu_dtype,
    cpu_env_defaults,
    engine_core_env_defaults,
    running_on_cpu,
)

RESULTS_DIR = PROJECT_ROOT / "bench-results"
INPUT_LEN = 32  # prompt tokens per request
_prompt_seeds = itertools.count()


def effective_config() -> tuple[list[str], dict[str, str]]:
    """The flags and environment both servers get: ours would add these by default on a CPU; here both get
    them explicitly, so the comparison cannot depend on how ours sets them."""
    flags = ["--model", str(DEFAULT_MODEL_DIR), "--served-model-name", DEFAULT_MODEL_NAME,
             "--kv-cache-memory-bytes", TEST_KV_CACHE_BYTES]
    env: dict[str, str] = {}
    if running_on_cpu():
        for name, value in CPU_FLAG_DEFAULTS.items():
            if name != "kv_cache_memory_bytes":  # two servers side by side: the small test cache for both
                flags += [f"--{name.replace('_', '-')}", str(value)]
        flags += ["--dtype", cpu_dtype()]
        env.update(cpu_env_defaults())
        ours = parse_args([])
        if ours.max_num_batched_tokens is not None:  # our prefill budget on a small CPU
            flags += ["--max-num-batched-tokens", str(ours.max_num_batched_tokens)]
        if ours.long_prefill_token_threshold:  # a long prompt's chunk beside other streams (an fp32 CPU)
            flags += ["--long-prefill-token-threshold", str(ours.long_prefill_token_threshold)]
        if ours.distributed_executor_backend == "uni":  # the model inside the EngineCore process
            flags += ["--distributed-executor-backend", "uni"]
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # without it vLLM's CPU platform replaces uni with mp
            env.update(engine_core_env_defaults())  # Intel's OpenMP
    return flags, env


def compile_caches_in(directory: str | Path) -> dict[str, str]:
    """Environment that gives a server compile caches of its own under `directory` (vLLM's saved compiled model
    and inductor's kernels): empty at first, as on a fresh machine, so its first start compiles afresh."""
    return {"VLLM_CACHE_ROOT": f"{directory}/vllm", "TORCHINDUCTOR_CACHE_DIR": f"{directory}/inductor"}


def bodies(count: int, output_len: int) -> list[dict]:
    """`count` requests of INPUT_LEN random token ids, each prompt new, exactly `output_len` tokens out, greedy."""
    return [latency.random_token_bodies(DEFAULT_MODEL_NAME, 1, INPUT_LEN, output_len,
                                        random.Random(next(_prompt_seeds)))[0] for _ in range(count)]


def requests_per_round(concurrency: int) -> int:
    return max(8, 2 * concurrency)


def measure(server: LocalServer, concurrency: int, requests: list[dict]) -> latency.RunResult:
    return latency.run(server.url, "/v1/completions", requests, concurrency)


def write_report(kind: str, report: dict) -> Path:
    """bench-results/<kind>-<UTC time>.json, with the date and the machine added; returns its path."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H%M%SZ")
    machine = {"cpus": os.cpu_count(), "platform": platform.platform()}
    path = RESULTS_DIR / f"{kind}-{stamp}.json"
    path.write_text(json.dumps({"date": stamp, "machine": machine, **report}, indent=2))
    return path


def median_interval(values: list[float], confidence: float = 0.95, resamples: int = 4000,
                    seed: int = 0) -> tuple[float, float, float]:
    """The median of `values` and a bootstrap interval for it (percentile bootstrap: the median of `resamples`
    draws of len(values) values with replacement, and the quantiles that hold `confidence` of them).

    `make bench` gives it one ours/plain ratio per round, each from the same requests sent to both servers
    back to back, so slow drift of the machine cancels within a round and shows as spread between rounds."""
    import numpy as np

    data = np.asarray(values, dtype=float)
    draws = np.random.default_rng(seed).choice(data, size=(resamples, len(data)), replace=True)
    low, high = np.quantile(np.median(draws, axis=1), [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(np.median(data)), float(low), float(high)


def server_itl(before: str | dict, after: str | dict) -> float:
    """Mean time between tokens as the server measured it (vLLM's `vllm:inter_token_latency_seconds`) over the
    requests that finished between two reads of its /metrics; NaN when none did."""
    from streaming_tutorial.client.metrics import metric, samples

    b, a = (samples(x) if isinstance(x, str) else x for x in (before, after))
    name = "vllm:inter_token_latency_seconds"
    count = metric(a, f"{name}_count") - metric(b, f"{name}_count")
    return (metric(a, f"{name}_sum") - metric(b, f"{name}_sum")) / count if count else float("nan")
