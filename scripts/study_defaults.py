"""The CPU defaults study: how long each candidate setting takes to start, and how fast it then streams.

    make study                       # or: .venv/bin/python scripts/study_defaults.py [--only eager,bf16]

Starts `streaming_server.py` once per variant below (its own defaults, plus the variant's flags and
environment), one server at a time so that variants never share the 2 cores, and measures: seconds from
launch to a healthy /health, then output tokens/s and median TTFT/ITL at 1 stream (8 requests) and at
16 streams (32 requests), each request `OUTPUT_LEN` tokens (`ignore_eos`), warm-up excluded. The shipped
defaults run first and last, so drift of the machine during the study shows. Prints a Markdown table (the
one in docs/benchmarks.md) and writes JSON under bench-results/. The workload and measurement code are `make bench`'s.
"""

from __future__ import annotations

import argparse
import ctypes.util
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from streaming_tutorial.client import benchmark as bench
from streaming_tutorial.client import latency
from streaming_tutorial.processes.local_server import LocalServer, ServerStartError

OUTPUT_LEN = 64
STREAMS = (1, 16)


def shared_library(name: str) -> str | None:
    """What to put in LD_PRELOAD for lib<name>: the virtualenv's copy (pip's intel-openmp puts libiomp5
    there), else the system's soname, which the dynamic loader finds by itself."""
    in_venv = Path(sys.prefix) / "lib" / f"lib{name}.so"
    return str(in_venv) if in_venv.exists() else ctypes.util.find_library(name)


@dataclass
class Variant:
    name: str
    flags: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    starts: int = 1  # starts > 1: the later starts show whether a compile cache is reused
    cold: bool = False  # the first start on empty compile caches of its own (a fresh machine), the next reuse them
    needs: str | None = None  # a shared library the variant preloads, when missing: skipped, and said so


def variants() -> list[Variant]:
    iomp, tcmalloc = shared_library("iomp5"), shared_library("tcmalloc_minimal") or shared_library("tcmalloc")
    return [
        Variant("shipped defaults", starts=2, cold=True),
        Variant("--enforce-eager", ["--enforce-eager"]),
        Variant("vLLM's AOT compile cache off (VLLM_USE_AOT_COMPILE=0): torch.compile's own caches only",
                env={"VLLM_USE_AOT_COMPILE": "0"}, starts=2),
        Variant("one core kept back for the API server (VLLM_CPU_NUM_OF_RESERVED_CPU=1, vLLM's default)",
                env={"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}),
        Variant("no binding, 2 threads (VLLM_CPU_OMP_THREADS_BIND=nobind OMP_NUM_THREADS=2)",
                env={"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "2"}),
        Variant("Intel OpenMP preloaded (LD_PRELOAD=libiomp5.so)", env={"LD_PRELOAD": iomp or ""},
                needs=None if iomp else "libiomp5.so (pip install intel-openmp)"),
        Variant("tcmalloc preloaded (LD_PRELOAD=libtcmalloc)", env={"LD_PRELOAD": tcmalloc or ""},
                needs=None if tcmalloc else "libtcmalloc (Debian: apt install libtcmalloc-minimal4)"),
        Variant("--max-num-seqs 16", ["--max-num-seqs", "16"]),
        Variant("--kv-cache-memory-bytes 256 MiB", ["--kv-cache-memory-bytes", str(256 << 20)]),
        Variant("--kv-cache-memory-bytes 4 GiB", ["--kv-cache-memory-bytes", str(4 << 30)]),
        Variant("--dtype bfloat16", ["--dtype", "bfloat16"]),
        # vLLM's own layout on a CPU: a Worker process beside the EngineCore (the shipped default on 2 cores
        # runs the model inside the EngineCore: server/cpu_defaults.py, worker_inside_engine_core).
        Variant("a Worker process beside the engine core (vLLM's CPU default: --distributed-executor-backend mp)",
                ["--distributed-executor-backend", "mp"], starts=2, cold=True),
        Variant("shipped defaults, again (drift check)"),
    ]


# Where a start spends its time: the first log line of each phase, as vLLM logs it (seconds resolution).
PHASES = {"API server imported": "non-default args", "engine core up": "Initializing a V1 LLM engine",
          "model loading": "Starting to load model", "compiled or loaded": "Warming up done",
          "HTTP routes": "Starting vLLM server on"}
LOG_TIME = re.compile(r" (\d\d-\d\d \d\d:\d\d:\d\d) ")


def phases(log: Path, launched: datetime) -> dict[str, float]:
    """Seconds from launch to the first log line of each of PHASES (those found)."""
    found: dict[str, float] = {}
    for line in log.read_text(errors="replace").splitlines():
        for name, marker in PHASES.items():
            if name not in found and marker in line and (stamp := LOG_TIME.search(line)):
                when = datetime.strptime(f"{launched.year}-{stamp[1]}", "%Y-%m-%d %H:%M:%S")
                found[name] = max(0.0, (when - launched.replace(microsecond=0)).total_seconds())
    return dict(sorted(found.items(), key=lambda item: item[1]))


def study(variant: Variant, index: int) -> dict:
    log = bench.RESULTS_DIR / f"study-{index:02d}.log"
    row: dict = {"variant": variant.name, "flags": variant.flags, "env": variant.env, "ready_s": [],
                 "cold": variant.cold}
    server = None
    caches = tempfile.TemporaryDirectory(prefix="study-caches-") if variant.cold else None
    env = {**variant.env, **(bench.compile_caches_in(caches.name) if caches else {})}
    try:
        for start in range(variant.starts):
            if server:
                server.stop()
            server = LocalServer(variant.flags, env=env, log_path=log)
            began, launched = time.perf_counter(), datetime.now()
            server.start()
            row["ready_s"].append(round(time.perf_counter() - began, 1))
            row.setdefault("phases_s", []).append(phases(log, launched))
            print(f"    start {start + 1}: ready in {row['ready_s'][-1]:.0f} s; "
                  + ", ".join(f"{name} at {t:.0f} s" for name, t in row["phases_s"][-1].items()), flush=True)
        bench.measure(server, 4, bench.bodies(4, 16))  # warm-up
        for streams in STREAMS:
            requests = bench.bodies(bench.requests_per_round(streams), OUTPUT_LEN)
            summary = latency.summarize_run(bench.measure(server, streams, requests))
            row[str(streams)] = {"tokens_per_s": summary.output_throughput, "ttft_median_s": summary.ttft.median,
                                 "itl_median_s": summary.itl.median, "failed": summary.failed}
            print(f"    {streams:>2} streams: {summary.output_throughput:6.1f} tok/s, TTFT "
                  f"{summary.ttft.median * 1e3:5.0f} ms, ITL {summary.itl.median * 1e3:5.1f} ms"
                  f"{f', {summary.failed} FAILED' if summary.failed else ''}", flush=True)
    except ServerStartError as error:
        row["error"] = str(error).splitlines()[0]
        print(f"    did not start: {row['error']} (log: {log})", flush=True)
    finally:
        if server:
            server.stop()
        if caches:
            caches.cleanup()
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| variant | ready (s; cold: on empty compile caches) | 1 stream tok/s | 1 stream ITL ms | "
             "16 streams tok/s | 16 streams TTFT ms | "
             "last start: s from launch to each phase |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        if "1" not in row:
            lines.append(f"| {row['variant']} | {row.get('error') or row.get('skipped')} | | | | | |")
            continue
        one, many = row["1"], row["16"]
        ready = [f"{s:.0f}" for s in row["ready_s"]]
        if row.get("cold"):
            ready[0] = f"{ready[0]} cold"
        lines.append(f"| {row['variant']} | {' / '.join(ready)} | "
                     f"{one['tokens_per_s']:.1f} | {one['itl_median_s'] * 1e3:.1f} | {many['tokens_per_s']:.1f} | "
                     f"{many['ttft_median_s'] * 1e3:.0f} | "
                     + ", ".join(f"{name} {t:.0f}" for name, t in row["phases_s"][-1].items()) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated words; run only the variants whose name contains one")
    args = parser.parse_args()
    chosen = [v for v in variants()
              if not args.only or any(word in v.name for word in args.only.split(","))]
    bench.RESULTS_DIR.mkdir(exist_ok=True)
    rows = []
    for index, variant in enumerate(chosen, 1):
        print(f"[{index}/{len(chosen)}] {variant.name}", flush=True)
        if variant.needs:
            print(f"    skipped: {variant.needs} is not installed", flush=True)
            rows.append({"variant": variant.name, "skipped": f"not measured: needs {variant.needs}"})
            continue
        rows.append(study(variant, index))
    print("\n" + markdown(rows))
    path = bench.write_report("study", {"output_len": OUTPUT_LEN, "rows": rows})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
