"""How long does one long prompt stall everyone else? The prefill budget per engine step, measured.

    make budget                                # or: .venv/bin/python scripts/long_prompt.py
    .venv/bin/python scripts/long_prompt.py --budgets 2048,128 --trials 5

vLLM prefills a long prompt in chunks of at most `--max-num-batched-tokens` tokens per engine step (chunked
prefill), and every other stream on the server waits for each such step: that is the stall. A small budget
cuts a long prefill into many short steps with the other streams' tokens between them (Sarathi-Serve's
stall-free batching, OSDI 2024), and costs the long prompt some time to first token.

For each budget: one server (one at a time), a warm-up trial, then `--trials` times: a neighbour streams 300
greedy tokens; once it is going, a prompt of 4,050 random tokens arrives (streaming_tutorial/client/stall.py).
Printed per budget (medians over the trials): the neighbour's usual gap between tokens, its worst gap while
the long prompt is prefilled, and the long prompt's TTFT. Writes JSON under bench-results/ (the neighbour's
token arrival times included, for plots).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys

from streaming_tutorial.client import benchmark as bench
from streaming_tutorial.client.stall import long_prompt_beside_a_stream
from streaming_tutorial.model import DEFAULT_MODEL_NAME
from streaming_tutorial.processes.local_server import TEST_KV_CACHE_BYTES, LocalServer

BUDGETS = (2048, 1024, 512, 256, 128)  # 2048: vLLM's own default for an API server on a CPU


def measure_budget(budget: int, trials: int) -> dict:
    rng = random.Random(budget)
    flags = ["--kv-cache-memory-bytes", TEST_KV_CACHE_BYTES, "--max-num-batched-tokens", str(budget)]
    with LocalServer(flags, log_path=bench.RESULTS_DIR / f"budget-{budget}.log") as server:
        asyncio.run(long_prompt_beside_a_stream(server.url, DEFAULT_MODEL_NAME, rng=rng))  # warm-up
        runs = [asyncio.run(long_prompt_beside_a_stream(server.url, DEFAULT_MODEL_NAME, rng=rng))
                for _ in range(trials)]
    return {"budget": budget,
            "neighbour_usual_gap_s": statistics.median(t.neighbour_usual_gap for t in runs),
            "neighbour_worst_gap_s": statistics.median(t.neighbour_worst_gap for t in runs),
            "long_ttft_s": statistics.median(t.long_ttft for t in runs),
            "trials": [{"long_sent_s": t.long_sent, "long_ttft_s": t.long_ttft,
                        "neighbour_arrivals_s": t.neighbour.chunk_times} for t in runs]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)),
                        help="comma-separated --max-num-batched-tokens values")
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    bench.RESULTS_DIR.mkdir(exist_ok=True)
    rows = []
    print("| budget (tokens per step) | neighbour's usual gap (ms) | neighbour's worst gap (ms) | "
          "long prompt's TTFT (s) |\n|---|---|---|---|", flush=True)
    for budget in (int(b) for b in args.budgets.split(",")):
        rows.append(row := measure_budget(budget, args.trials))
        print(f"| {budget} | {row['neighbour_usual_gap_s'] * 1e3:.0f} | {row['neighbour_worst_gap_s'] * 1e3:.0f} | "
              f"{row['long_ttft_s']:.2f} |", flush=True)
    print(f"\nwrote {bench.write_report('budget', {'rows': rows})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
