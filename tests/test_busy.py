"""The measuring tools of `make busy`, `make budget` and notebook 05: a busy loop, a windowed token rate, and a
long prompt beside a stream (streaming_tutorial/client/busy.py, stall.py). Figures they measure are in
docs/benchmarks.md; these tests check the tools, not the figures."""

from __future__ import annotations

import asyncio
import ctypes
import random
from pathlib import Path

import psutil

from streaming_tutorial.client.busy import busy_loop, gnu_openmp_env, tokens_per_s
from streaming_tutorial.client.stall import long_prompt_beside_a_stream


def test_a_busy_loop_burns_a_core_in_a_process_of_its_own_and_stops_with_the_block():
    with busy_loop() as process:
        assert psutil.Process(process.pid).cpu_percent(interval=1.0) > 20
    assert process.poll() is not None


def test_gnu_openmp_is_torchs_own_libgomp_and_loads():
    """Notebook 05 and `make busy` race GNU OpenMP against Intel's: the locked torch ships its libgomp, and what
    the environment preloads is that library, a real OpenMP runtime."""
    env = gnu_openmp_env()
    assert set(env) == {"LD_PRELOAD"}, env
    library = Path(env["LD_PRELOAD"])
    assert library.name.startswith("libgomp") and "torch" in library.parts, library
    assert ctypes.CDLL(str(library)).omp_get_max_threads() >= 1


def test_a_window_counts_the_tokens_streamed_in_it(server, model_name):
    rate = asyncio.run(tokens_per_s(server.url, 2, 3, model_name, output_len=8))
    assert rate > 0


def test_a_long_prompt_beside_a_stream_is_timed_from_the_neighbours_side(server, model_name):
    trial = asyncio.run(long_prompt_beside_a_stream(server.url, model_name, rng=random.Random(0), long_tokens=600,
                                                    neighbour_tokens=80))
    assert trial.neighbour.output_tokens == 80 and trial.long.prompt_tokens == 600
    assert 0 < trial.long_sent < trial.neighbour.chunk_times[-1]  # it arrived while the neighbour streamed
    assert trial.neighbour_worst_gap >= trial.neighbour_usual_gap > 0
    assert trial.long_ttft > 0
