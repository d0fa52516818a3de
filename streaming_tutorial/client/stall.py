"""What one long prompt does to another user's stream: the prefill stall, measured from the client.

vLLM prefills a long prompt in chunks of at most `--max-num-batched-tokens` tokens per engine step (chunked
prefill), and every other stream on the server waits for each of those steps. `make budget`
(scripts/long_prompt.py) and notebook 05 measure it:

    trial = await long_prompt_beside_a_stream(url, model)
    print(trial.neighbour_usual_gap, trial.neighbour_worst_gap, trial.long.ttft)
"""

from __future__ import annotations

import asyncio
import random
import statistics
from dataclasses import dataclass

from openai import AsyncOpenAI

from streaming_tutorial.client.latency import RequestResult
from streaming_tutorial.client.streams import completion_requests, stream_and_time

NEIGHBOUR_TOKENS = 300
LONG_PROMPT_TOKENS = 4050  # inside the CPU default context of 4,096 tokens
HEAD_START = 40  # tokens the neighbour has streamed when the long prompt arrives
VLLM_CPU_PREFILL_BUDGET = 2048  # vLLM's own --max-num-batched-tokens for an API server on a CPU


@dataclass
class StallTrial:
    """One neighbour stream and one long prompt sent while it runs; times in seconds from the neighbour's send."""

    neighbour: RequestResult
    long: RequestResult
    long_sent: float

    @property
    def gaps(self) -> list[tuple[float, float]]:
        """(arrival, gap before it) for each of the neighbour's tokens after its first."""
        times = self.neighbour.chunk_times
        return [(b, b - a) for a, b in zip(times, times[1:])]

    @property
    def neighbour_usual_gap(self) -> float:
        """The neighbour's median gap between tokens before the long prompt arrived."""
        return statistics.median(gap for at, gap in self.gaps if at <= self.long_sent)

    @property
    def neighbour_worst_gap(self) -> float:
        """The neighbour's longest wait for a token after the long prompt arrived: the stall."""
        return max(gap for at, gap in self.gaps if at > self.long_sent)

    @property
    def long_ttft(self) -> float:
        """The long prompt's own time to first token (its prefill, in chunks)."""
        return self.long.ttft


async def long_prompt_beside_a_stream(url: str, model: str, api_key: str | None = None,
                                      rng: random.Random | None = None, long_tokens: int = LONG_PROMPT_TOKENS,
                                      neighbour_tokens: int = NEIGHBOUR_TOKENS) -> StallTrial:
    """A neighbour streams `neighbour_tokens` tokens; once it has HEAD_START of them, a prompt of `long_tokens`
    new random tokens arrives (new each call: the prefix cache cannot shorten it)."""
    rng = rng or random.Random()
    neighbour_request = completion_requests(model, 1, 32, neighbour_tokens, rng)[0]
    long_request = completion_requests(model, 1, long_tokens, 4, rng)[0]
    async with AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key or "EMPTY", max_retries=0) as client:
        neighbour = RequestResult()  # filled while it streams
        running = asyncio.create_task(stream_and_time(client, neighbour_request, neighbour))
        while len(neighbour.chunk_times) < HEAD_START and not running.done():
            await asyncio.sleep(0.005)
        long = await stream_and_time(client, long_request)
        await running
    return StallTrial(neighbour, long, long.start - neighbour.start)
