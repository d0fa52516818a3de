"""Side-by-side benchmark: streaming_server.py against plain vLLM, same flags, same environment.

    make bench                       # or: .venv/bin/python scripts/bench.py [--rounds 12] [--against fresh]
    make bench ARGS="--distributed-executor-backend mp"      # any vLLM flag, for both servers

Starts both servers itself with identical explicit flags and environment (so nothing depends on the
defaults streaming_server.py would add), warms both up, then measures them alternately in short rounds
(the same new prompts to both, back to back, the order swapped every round) at 1, 4 and 16 concurrent
streams: 32 seeded random prompt tokens, a fixed output length (`ignore_eos`). Prints medians and p90/p99 of
TTFT, ITL and TPOT and output tokens/s for each server; then, per concurrency, the ours/plain ratio of
tokens/s, of median TTFT and of the server's own mean time between tokens (vLLM's /metrics), each the
median of the per-round ratios with a 95 % bootstrap interval. Writes JSON and a plot under bench-results/.
Also times the client's own per-chunk cost on a recorded stream, and runs vLLM's benchmark client on our
server as a cross-check. The measurement code is the notebooks' (`streaming_tutorial.client.latency`).

Start-up differs by design: on a CPU ours loads vLLM's saved compiled model (streaming_tutorial/
compile_cache.py), which plain vLLM 0.32 fails to load and compiles again. `--against fresh` compares ours
with ours compiling afresh (empty compile caches of its own), which isolates what loading changes.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import httpx

from streaming_tutorial.client import latency
from streaming_tutorial.client.benchmark import (
    INPUT_LEN,
    RESULTS_DIR,
    bodies,
    compile_caches_in,
    effective_config,
    measure,
    median_interval,
    server_itl,
    write_report,
)
from streaming_tutorial.model import DEFAULT_MODEL_DIR, DEFAULT_MODEL_NAME
from streaming_tutorial.processes.local_server import LocalServer

PLAIN_VLLM = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
CONCURRENCY_LEVELS = (1, 4, 16)
METRICS = (("ttft", "TTFT"), ("itl", "ITL"), ("tpot", "TPOT"))


def client_cost_per_chunk(server: LocalServer, output_len: int) -> float:
    """Seconds the client spends per chunk (parse + clock), timed on a recorded stream without the network."""
    body = latency.streaming_body(bodies(1, output_len)[0])
    with httpx.Client(base_url=server.url, timeout=120) as client:
        with client.stream("POST", "/v1/completions", json=body) as response:
            lines = list(response.iter_lines())
    repeats = 200
    start = time.perf_counter()
    for _ in range(repeats):
        result = latency.consume(lines, time.perf_counter(), latency.RequestResult())
    return (time.perf_counter() - start) / (repeats * len(result.chunk_times))


def fmt_ratio(ours: float, plain: float) -> str:
    return f"{ours / plain:6.3f}" if plain else "   n/a"


def print_table(summaries: dict[str, dict[int, latency.RunSummary]], other: str) -> None:
    header = f"{'streams':>7} {'metric':<16} {'ours':>10} {other:>10} {'ours/' + other:>10}"
    print("\n" + header + "\n" + "-" * len(header))
    for c in CONCURRENCY_LEVELS:
        ours, plain = summaries["ours"][c], summaries[other][c]
        for key, label in METRICS:
            for stat in ("median", "p90", "p99"):
                a, b = getattr(getattr(ours, key), stat) * 1e3, getattr(getattr(plain, key), stat) * 1e3
                print(f"{c:>7} {label + ' ' + stat + ' ms':<16} {a:>10.2f} {b:>10.2f} {fmt_ratio(a, b):>10}")
        a, b = ours.output_throughput, plain.output_throughput
        print(f"{c:>7} {'output tok/s':<16} {a:>10.1f} {b:>10.1f} {fmt_ratio(a, b):>10}")


def plot(summaries: dict[str, dict[int, latency.RunSummary]], path: Path, other: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for name, by_level in summaries.items():
        levels = list(by_level)
        axes[0].plot(levels, [by_level[c].ttft.median * 1e3 for c in levels], "o-", label=name)
        axes[1].plot(levels, [by_level[c].itl.median * 1e3 for c in levels], "o-", label=name)
        axes[2].plot(levels, [by_level[c].output_throughput for c in levels], "o-", label=name)
    for ax, title in zip(axes, ("median TTFT (ms)", "median ITL (ms)", "output tokens/s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"streaming_server.py (ours) vs {'plain vLLM' if other == 'plain' else 'ours, compiled afresh'}, "
                 "same flags and environment")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# Requests per round at each concurrency: short rounds (a few seconds each), so that many fit, alternated.
ROUND_REQUESTS = {1: 8, 4: 8, 16: 32}


def start_servers(against: str, flags: list[str], env: dict[str, str], caches: Path) -> dict[str, LocalServer]:
    """Ours, and what it is compared with: plain vLLM (same flags and environment), or ours again compiling
    the model afresh (its own empty compile caches), which isolates loading the saved compiled model."""
    other = (LocalServer(flags, env=env, log_path=RESULTS_DIR / "plain.log", command=PLAIN_VLLM)
             if against == "plain" else
             LocalServer(flags, env={**env, **compile_caches_in(caches)}, log_path=RESULTS_DIR / "fresh.log"))
    return {"ours": LocalServer(flags, env=env, log_path=RESULTS_DIR / "ours.log"), against: other}


def measure_round(server: LocalServer, c: int, requests: list[dict]) -> tuple[latency.RunResult, float]:
    """One round on one server: the client's results, and the server's own mean time between tokens."""
    before = httpx.get(f"{server.url}/metrics", timeout=30).text
    run = measure(server, c, requests)
    return run, server_itl(before, httpx.get(f"{server.url}/metrics", timeout=30).text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12, help="alternating rounds per concurrency level")
    parser.add_argument("--output-len", type=int, default=64, help="tokens per request (ignore_eos)")
    parser.add_argument("--against", choices=("plain", "fresh"), default="plain",
                        help="plain vLLM (default), or ours compiling the model afresh instead of loading it")
    args, extra = parser.parse_known_args()
    flags, env = effective_config()
    flags += extra  # any other argument: a vLLM flag for both servers (the last of a repeated flag wins)
    RESULTS_DIR.mkdir(exist_ok=True)
    print(f"flags for both servers: {' '.join(flags)}\nenvironment for both: {env}", flush=True)
    print("starting both servers (a few minutes on 2 cores)...", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-caches-") as caches:
        servers = start_servers(args.against, flags, env, Path(caches))
        other = args.against
        try:
            ready = {}
            for name, server in servers.items():
                started = time.perf_counter()
                server.start()
                ready[name] = time.perf_counter() - started
                print(f"  {name} ready in {ready[name]:.0f} s at {server.url}", flush=True)
            warm_up = bodies(16, 32)
            for server in servers.values():  # excluded from the figures
                measure(server, 4, warm_up)
                measure(server, 16, warm_up)
            runs: dict[str, dict[int, list[latency.RequestResult]]] = {n: {c: [] for c in CONCURRENCY_LEVELS}
                                                                      for n in servers}
            durations = {n: {c: 0.0 for c in CONCURRENCY_LEVELS} for n in servers}
            # Per round, ours/other: output tok/s, median TTFT, and the server's own mean time between tokens.
            ratios: dict[str, dict[int, list[float]]] = {k: {c: [] for c in CONCURRENCY_LEVELS}
                                                         for k in ("tok/s", "TTFT", "server ITL")}
            for c in CONCURRENCY_LEVELS:
                for round_index in range(args.rounds):
                    requests = bodies(ROUND_REQUESTS[c], args.output_len)  # the same new prompts for both
                    order = list(servers) if round_index % 2 == 0 else list(reversed(servers))
                    this_round = {}
                    for name in order:
                        run, itl = measure_round(servers[name], c, requests)
                        summary = latency.summarize_run(run)
                        this_round[name] = (summary.output_throughput, summary.ttft.median, itl)
                        runs[name][c] += run.results
                        durations[name][c] += run.duration
                        if failed := sum(not r.ok for r in run.results):
                            print(f"  {c:>2} streams, round {round_index + 1}, {name}: {failed} FAILED", flush=True)
                    for i, key in enumerate(ratios):
                        ratios[key][c].append(this_round["ours"][i] / this_round[other][i])
                    print(f"  {c:>2} streams, round {round_index + 1:>2}/{args.rounds}: ours/{other} tok/s "
                          f"{ratios['tok/s'][c][-1]:.3f}, TTFT {ratios['TTFT'][c][-1]:.3f}, server ITL "
                          f"{ratios['server ITL'][c][-1]:.3f}", flush=True)
            summaries = {n: {c: latency.summarize_run(latency.RunResult(c, runs[n][c], durations[n][c]))
                             for c in CONCURRENCY_LEVELS} for n in servers}
            print_table(summaries, other)
            intervals = {key: {c: median_interval(by_c[c]) for c in CONCURRENCY_LEVELS}
                         for key, by_c in ratios.items()}
            print(f"\nours/{other}, the median of {args.rounds} rounds and its 95 % bootstrap interval "
                  f"(1.000 inside: no difference this run can see):")
            for c in CONCURRENCY_LEVELS:
                print(f"  {c:>2} streams: " + "; ".join(
                    f"{key} {m:.3f} [{lo:.3f}, {hi:.3f}]" for key, (m, lo, hi) in
                    ((key, intervals[key][c]) for key in ratios)))
            per_chunk = client_cost_per_chunk(servers["ours"], args.output_len)
            print(f"\nclient cost per chunk (parse + clock, recorded stream): {per_chunk * 1e6:.1f} µs")
            print(f"\ncross-check: vLLM's benchmark client on our server, same workload as the 4-stream rows "
                  f"({INPUT_LEN} random prompt tokens, {args.output_len} out, ignore_eos, greedy)")
            vllm_result = asyncio.run(latency.vllm_bench(latency.vllm_bench_argv(
                servers["ours"].url, input_len=INPUT_LEN, output_len=args.output_len,
                num_prompts=ROUND_REQUESTS[4] * 4, max_concurrency=4, seed=args.rounds,
                extra=["--model", DEFAULT_MODEL_NAME, "--tokenizer", str(DEFAULT_MODEL_DIR)])))
            ours4 = summaries["ours"][4]
            for label, mine, theirs in (("median TTFT ms", ours4.ttft.median * 1e3, vllm_result["median_ttft_ms"]),
                                        ("median ITL ms", ours4.itl.median * 1e3, vllm_result["median_itl_ms"]),
                                        ("median TPOT ms", ours4.tpot.median * 1e3, vllm_result["median_tpot_ms"]),
                                        ("output tok/s", ours4.output_throughput, vllm_result["output_throughput"])):
                print(f"  {label:<15} this benchmark {mine:9.2f}   vLLM's client {theirs:9.2f}")
        finally:
            for server in servers.values():
                server.stop()
    report = {"against": other, "flags": flags, "env": env, "rounds": args.rounds, "input_len": INPUT_LEN,
              "output_len": args.output_len, "ready_s": ready, "client_seconds_per_chunk": per_chunk,
              "round_ratios": {k: {str(c): r for c, r in by_c.items()} for k, by_c in ratios.items()},
              "ratio_intervals": {k: {str(c): iv for c, iv in by_c.items()} for k, by_c in intervals.items()},
              "summaries": {n: {str(c): asdict(s) for c, s in by.items()} for n, by in summaries.items()},
              "vllm_bench_client_ours_4_streams": {k: v for k, v in vllm_result.items()
                                                   if isinstance(v, (int, float))}}
    json_path = write_report("bench", report)
    plot(summaries, json_path.with_suffix(".png"), other)
    print(f"\nwrote {json_path} and {json_path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
