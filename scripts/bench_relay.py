"""What the relay and nginx cost a stream: vLLM directly, through relay/relay.py, and through nginx and the relay.

    make bench-relay                 # or: .venv/bin/python scripts/bench_relay.py [--rounds 8] [--output-len 64]

Starts one server (default flags), the relay in front of it (`ignore_eos` added to every request, so each answer
is exactly --output-len tokens) and nginx in front of the relay (the lesson's config: proxy_buffering off). Then,
at 1 and 16 concurrent streams, alternating rounds: the same new chat prompts to the three paths back to back,
the order rotated every round. Per stream it records the time to the first piece of text, and how many separate
reads the stream arrived in; per round and path, the output tokens/s of the whole round. Prints, per concurrency,
each path against the direct one: the TTFT difference in ms and the tokens/s ratio, each the median of the
per-round values with a 95 % bootstrap interval, and the median reads per stream. Writes JSON under
bench-results/. Not run in CI: the figures are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import sys
import time

import httpx

from streaming_tutorial.client.benchmark import RESULTS_DIR, median_interval, write_report
from streaming_tutorial.processes.local_server import LOG_DIR, TEST_KV_CACHE_BYTES, LocalServer
from streaming_tutorial.processes.proxy import Proxy
from streaming_tutorial.processes.relay import Relay

LEVELS = (1, 16)
ROUND_REQUESTS = {1: 4, 16: 32}
WORDS = ["river", "stone", "cloud", "lamp", "field", "bread", "window", "song"]
FIRST_TEXT = {"direct": rb'"content":"[^"]', "relay": rb"event: token", "nginx + relay": rb"event: token"}


def prompts(count: int, rng: random.Random) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(24)) for _ in range(count)]


async def one_stream(http: httpx.AsyncClient, path: str, body: dict, first_text: bytes) -> tuple[float, int]:
    """(seconds to the first read that holds text, reads the stream arrived in)."""
    started, seen, reads, first = time.perf_counter(), b"", 0, None
    async with http.stream("POST", path, json=body) as response:
        response.raise_for_status()
        async for data in response.aiter_bytes():
            reads += 1
            seen += data
            if first is None and re.search(first_text, seen):
                first = time.perf_counter() - started
    if first is None:
        raise RuntimeError(f"no text in the stream from {path}: {seen[-300:]!r}")
    return first, reads


async def one_round(http: httpx.AsyncClient, path: str, bodies: list[dict], concurrency: int,
                    first_text: bytes, output_len: int) -> tuple[list[float], list[int], float]:
    """Every body through one path, `concurrency` at a time: TTFTs, reads per stream, output tokens/s."""
    gate = asyncio.Semaphore(concurrency)

    async def gated(body):
        async with gate:
            return await one_stream(http, path, body, first_text)

    started = time.perf_counter()
    results = await asyncio.gather(*(gated(body) for body in bodies))
    elapsed = time.perf_counter() - started
    return [r[0] for r in results], [r[1] for r in results], len(bodies) * output_len / elapsed


async def measure(paths: dict[str, tuple[str, dict, str]], model: str, rounds: int, output_len: int) -> dict:
    rng = random.Random(0)
    clients = {name: httpx.AsyncClient(base_url=url, headers=headers, timeout=300,
                                       limits=httpx.Limits(max_connections=64)) for name, (url, headers, _) in
               paths.items()}
    results = {c: {name: {"ttft": [], "reads": [], "tok/s": []} for name in paths} for c in LEVELS}
    try:
        for c in LEVELS:
            for round_index in range(-1, rounds):  # round -1 warms every path up and is not counted
                texts = prompts(ROUND_REQUESTS[c], rng)
                order = list(paths)[round_index % len(paths):] + list(paths)[:round_index % len(paths)]
                for name in order:
                    _, _, kind = paths[name]
                    bodies = [{"messages": [{"role": "user", "content": text}], "max_tokens": output_len,
                               "temperature": 0} for text in texts]
                    if kind == "vllm":
                        bodies = [{**body, "model": model, "stream": True, "ignore_eos": True} for body in bodies]
                    path = "/v1/chat/completions" if kind == "vllm" else "/chat"
                    ttfts, reads, rate = await one_round(clients[name], path, bodies, c, FIRST_TEXT[name],
                                                         output_len)
                    if round_index >= 0:
                        results[c][name]["ttft"].append(statistics.median(ttfts))
                        results[c][name]["reads"] += reads
                        results[c][name]["tok/s"].append(rate)
                if round_index >= 0:
                    row = results[c]
                    print(f"  {c:>2} streams, round {round_index + 1}/{rounds}: " + "; ".join(
                        f"{name} TTFT {row[name]['ttft'][-1] * 1e3:.0f} ms, {row[name]['tok/s'][-1]:.0f} tok/s"
                        for name in paths), flush=True)
    finally:
        for client in clients.values():
            await client.aclose()
    return results


def report(results: dict, rounds: int) -> dict:
    summary = {}
    print(f"\nagainst vLLM directly: the median of {rounds} rounds and its 95 % bootstrap interval")
    for c in LEVELS:
        direct = results[c]["direct"]
        for name in ("relay", "nginx + relay"):
            mine = results[c][name]
            ttft = median_interval([(a - b) * 1e3 for a, b in zip(mine["ttft"], direct["ttft"])])
            rate = median_interval([a / b for a, b in zip(mine["tok/s"], direct["tok/s"])])
            reads = (statistics.median(mine["reads"]), statistics.median(direct["reads"]))
            summary[f"{c} streams, {name}"] = {"ttft_ms_more": ttft, "tok_s_ratio": rate, "reads_median": reads}
            print(f"  {c:>2} streams, {name:<13}: TTFT {ttft[0]:+.1f} ms [{ttft[1]:+.1f}, {ttft[2]:+.1f}]; "
                  f"tokens/s x{rate[0]:.3f} [{rate[1]:.3f}, {rate[2]:.3f}]; reads per stream {reads[0]:.0f} "
                  f"(direct {reads[1]:.0f})")
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8, help="alternating rounds per concurrency level")
    parser.add_argument("--output-len", type=int, default=64, help="tokens per answer (ignore_eos)")
    args = parser.parse_args()
    RESULTS_DIR.mkdir(exist_ok=True)
    server = LocalServer(["--kv-cache-memory-bytes", TEST_KV_CACHE_BYTES], log_path=LOG_DIR / "bench-relay.log")
    relay = Relay(server.url, ["bench"], ["--extra-body", json.dumps({"ignore_eos": True})], name="bench-relay")
    proxy = Proxy(relay)
    try:
        print("starting the server (a few minutes on 2 cores), the relay and nginx...", flush=True)
        server.start()
        relay.start()
        proxy.start()
        model = httpx.get(server.url_for("v1", "models"), timeout=30).json()["data"][0]["id"]
        paths = {"direct": (server.url, {}, "vllm"), "relay": (relay.url, relay.headers, "relay"),
                 "nginx + relay": (proxy.url, relay.headers, "relay")}
        results = asyncio.run(measure(paths, model, args.rounds, args.output_len))
    finally:
        proxy.stop()
        relay.stop()
        server.stop()
    summary = report(results, args.rounds)
    path = write_report("bench-relay", {"rounds": args.rounds, "output_len": args.output_len, "summary": summary,
                                        "results": {str(c): r for c, r in results.items()}})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
