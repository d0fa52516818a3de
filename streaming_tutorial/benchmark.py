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
from datetime import datetime, timezone
from pathlib import Path

from streaming_server import CPU_FLAG_DEFAULTS, cpu_dtype, cpu_env_defaults, running_on_cpu
from streaming_tutorial import latency
from streaming_tutorial.model import DEFAULT_MODEL_DIR, DEFAULT_MODEL_NAME
from streaming_tutorial.server import PROJECT_ROOT, TEST_KV_CACHE_BYTES, LocalServer

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
    return flags, env


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
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
    machine = {"cpus": os.cpu_count(), "platform": platform.platform()}
    path = RESULTS_DIR / f"{kind}-{stamp}.json"
    path.write_text(json.dumps({"date": stamp, "machine": machine, **report}, indent=2))
    return path
