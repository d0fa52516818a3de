"""How long does one long prompt stall everyone else? The prefill chunk per engine step, measured.

    make budget                                # or: .venv/bin/python scripts/long_prompt.py
    .venv/bin/python scripts/long_prompt.py --settings default,chunk=64 --trials 5

vLLM prefills a long prompt in chunks (chunked prefill), and every other stream on the server waits for each
chunk's engine step: that is the stall. A step holds at most `--max-num-batched-tokens` tokens (the budget), and
a long prompt at most `--long-prefill-token-threshold` of them while other requests run (vLLM lifts that cap when
the prompt is alone). Small chunks cut a long prefill into many short steps with the other streams' tokens between
them (Sarathi-Serve's stall-free batching, OSDI 2024), and cost the long prompt some time to first token.

Settings (`--settings`, comma-separated), one server each, one at a time:
- `default`: this server's own defaults on this machine (server/cpu_defaults.py picks the chunk by dtype);
- `budget=N`: a budget of N tokens and no cap on a long prompt (`budget=2048` is vLLM's own CPU default);
- `chunk=N`: this server's budget, with a long prompt capped at N tokens a step beside other requests.

For each: a warm-up trial, then `--trials` times: a neighbour streams 300 greedy tokens; once it is going, a prompt
of 4,050 random tokens arrives (streaming_tutorial/client/stall.py); and `--trials` times the long prompt alone.
Printed per setting (medians): the neighbour's usual gap between tokens, its worst gap while the long prompt is
prefilled, the long prompt's TTFT beside the neighbour and alone. Writes JSON under bench-results/ (the
neighbour's token arrival times included, for plots). Say which CPU it ran on: `lscpu | grep -o 'avx[^ ]*'`.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys

from openai import AsyncOpenAI

from streaming_tutorial.client import benchmark as bench
from streaming_tutorial.client.stall import LONG_PROMPT_TOKENS, long_prompt_beside_a_stream
from streaming_tutorial.client.streams import completion_requests, stream_and_time
from streaming_tutorial.model import DEFAULT_MODEL_NAME
from streaming_tutorial.processes.local_server import TEST_KV_CACHE_BYTES, LocalServer
from streaming_tutorial.server.args import parse_args

SETTINGS = ("budget=2048", "default", "chunk=128", "chunk=64", "chunk=32")  # budget=2048: vLLM's CPU default


def setting_flags(setting: str) -> list[str]:
    """The server flags of one `--settings` entry."""
    name, _, value = setting.partition("=")
    if name == "default":
        return []
    if name == "budget":
        return ["--max-num-batched-tokens", value, "--long-prefill-token-threshold", "0"]
    if name == "chunk":
        return ["--long-prefill-token-threshold", value]
    raise SystemExit(f"error: --settings: unknown setting {setting!r}; use default, budget=N or chunk=N")


async def long_prompt_alone(url: str, rng: random.Random) -> float:
    """The long prompt's TTFT with nothing else running (new random tokens: no prefix cache hit)."""
    async with AsyncOpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0) as client:
        request = completion_requests(DEFAULT_MODEL_NAME, 1, LONG_PROMPT_TOKENS, 4, rng)[0]
        return (await stream_and_time(client, request)).ttft


def measure(setting: str, trials: int) -> dict:
    rng = random.Random(setting)
    flags = ["--kv-cache-memory-bytes", TEST_KV_CACHE_BYTES, *setting_flags(setting)]
    chosen = parse_args(flags)  # as the server will parse them, on this machine
    with LocalServer(flags, log_path=bench.RESULTS_DIR / f"budget-{setting.replace('=', '-')}.log") as server:
        asyncio.run(long_prompt_beside_a_stream(server.url, DEFAULT_MODEL_NAME, rng=rng))  # warm-up
        runs = [asyncio.run(long_prompt_beside_a_stream(server.url, DEFAULT_MODEL_NAME, rng=rng))
                for _ in range(trials)]
        alone = [asyncio.run(long_prompt_alone(server.url, rng)) for _ in range(trials)]
    return {"setting": setting, "dtype": chosen.dtype, "budget": chosen.max_num_batched_tokens,
            "long_prompt_chunk": chosen.long_prefill_token_threshold or chosen.max_num_batched_tokens,
            "neighbour_usual_gap_s": statistics.median(t.neighbour_usual_gap for t in runs),
            "neighbour_worst_gap_s": statistics.median(t.neighbour_worst_gap for t in runs),
            "long_ttft_s": statistics.median(t.long_ttft for t in runs),
            "long_ttft_alone_s": statistics.median(alone),
            "trials": [{"long_sent_s": t.long_sent, "long_ttft_s": t.long_ttft,
                        "neighbour_arrivals_s": t.neighbour.chunk_times} for t in runs]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help="comma-separated: default, budget=N (no cap on a long prompt), chunk=N")
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    for setting in args.settings.split(","):
        setting_flags(setting)  # a typo stops here, before any server starts
    bench.RESULTS_DIR.mkdir(exist_ok=True)
    rows = []
    print("| setting | dtype | budget | long prompt's chunk beside others | neighbour's usual gap (ms) | "
          "neighbour's worst gap (ms) | long prompt's TTFT beside it (s) | alone (s) |\n"
          "|---|---|---|---|---|---|---|---|", flush=True)
    for setting in args.settings.split(","):
        rows.append(row := measure(setting, args.trials))
        print(f"| {setting} | {row['dtype']} | {row['budget']} | {row['long_prompt_chunk']} | "
              f"{row['neighbour_usual_gap_s'] * 1e3:.0f} | {row['neighbour_worst_gap_s'] * 1e3:.0f} | "
              f"{row['long_ttft_s']:.2f} | {row['long_ttft_alone_s']:.2f} |", flush=True)
    print(f"\nwrote {bench.write_report('budget', {'rows': rows})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
