"""The notebooks' larger charts, so that a lesson's cell shows the measurement and not the matplotlib.

Each function draws one figure and returns it; the notebook cell ends with `plt.show()`.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter, ScalarFormatter

from streaming_tutorial.client.latency import RunSummary


def grouped_bars(values: Mapping[str, Mapping[str, float]], ylabel: str, title: str = "",
                 label_bars: str | None = "%.1f", ylim: tuple[float, float] | None = None,
                 ax: plt.Axes | None = None) -> Figure:
    """One group of bars per x position, one bar per series: `values[series][x] = height` (every series has
    the same x keys, in the order of the first). `label_bars`: a format for the value on each bar, or None."""
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.5))
    series = list(values)
    xs = list(next(iter(values.values()))) if values else []
    width = 0.8 / max(1, len(series))
    for i, name in enumerate(series):
        bars = ax.bar([x + width * i for x in range(len(xs))], [values[name][x] for x in xs], width * 0.95,
                      label=name)
        if label_bars:
            ax.bar_label(bars, fmt=label_bars)
    ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(xs))], xs)
    ax.set(ylabel=ylabel, title=title, **({"ylim": ylim} if ylim else {}))
    ax.legend()
    ax.figure.tight_layout()
    return ax.figure


def throughput_and_latency(summaries: Mapping[int, RunSummary]) -> Figure:
    """Notebook 05's two panels over the concurrency levels: output tokens/s (all streams, and one stream as
    1 / median TPOT), and median TPOT and TTFT on a log scale."""
    levels = sorted(summaries)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    left.plot(levels, [summaries[c].output_throughput for c in levels], "o-", label="all streams together")
    left.plot(levels, [1 / summaries[c].tpot.median for c in levels], "s--", label="one stream (1 / median TPOT)")
    left.set(ylabel="output tokens / s", title="throughput")
    right.plot(levels, [summaries[c].tpot.median * 1e3 for c in levels], "o-", label="median TPOT")
    right.plot(levels, [summaries[c].ttft.median * 1e3 for c in levels], "s--", label="median TTFT")
    right.set(yscale="log", ylabel="ms (log scale)", title="latency")
    right.yaxis.set_major_formatter(ScalarFormatter())  # plain numbers on the log axis, not 4x10^2
    right.yaxis.set_minor_formatter(NullFormatter())
    for ax in (left, right):
        ax.set(xscale="log", xticks=levels, xticklabels=levels, xlabel="concurrent streams")
        ax.legend()
    fig.tight_layout()
    return fig


def token_probabilities(tokens: Sequence[tuple[str, float, object]]) -> Figure:
    """Notebook 06's strip: one box per streamed token, as wide as its text, colored by the probability the
    model gave it (red: unsure, green: sure). `tokens`: (token, probability, anything) per token."""
    fig, ax = plt.subplots(figsize=(12, 1.8))
    x = 0.0
    for token, p, *_ in tokens:
        width = max(0.6, 0.13 * len(token))
        ax.add_patch(plt.Rectangle((x, 0), width, 1, color=plt.cm.RdYlGn(p), ec="white"))
        ax.text(x + width / 2, 0.5, token.replace(" ", "·"), ha="center", va="center", fontsize=8)
        x += width
    ax.set(xlim=(0, max(x, 1.0)), ylim=(0, 1))
    ax.axis("off")
    ax.set_title("probability of each streamed token (red = unsure, green = sure; · = space)", fontsize=9)
    fig.colorbar(plt.cm.ScalarMappable(cmap="RdYlGn"), ax=ax, orientation="vertical", fraction=0.02, pad=0.01)
    return fig


def requests_during_a_failure(probes: Sequence[tuple[float, float, object]], marks: Mapping[str, float]) -> Figure:
    """Notebook 07's probes around a replica's death: (seconds after the kill, latency in s, outcome) per
    request, green for a 200, red otherwise; `marks["unhealthy"]`, if present, when the router gave up on it."""
    fig, ax = plt.subplots(figsize=(9, 3))
    ax.scatter([t for t, _, _ in probes], [d * 1e3 for _, d, _ in probes],
               c=["tab:green" if outcome == 200 else "tab:red" for *_, outcome in probes])
    top = ax.get_ylim()[1] * 0.9
    ax.axvline(0, color="black", lw=1)
    ax.text(0.1, top, "kill", va="top")
    if "unhealthy" in marks:
        ax.axvline(marks["unhealthy"], color="tab:orange", ls="--")
        ax.text(marks["unhealthy"] + 0.1, top, "router marks it unhealthy", va="top")
    ax.set(xlabel="seconds after the kill", ylabel="latency of a new request (ms)",
           title="new requests during the failure (green: 200)")
    fig.tight_layout()
    return fig


def medians_with_range(runs: Mapping[tuple[str, int], Sequence[tuple[float, float]]], ylabel: str,
                       title: str) -> Figure:
    """Notebook 07's scaling chart: per setup, the median over rounds at each concurrency, with the rounds'
    range as error bars. `runs`: {(setup, concurrency): [(value, anything), ...]}."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    levels = sorted({c for _, c in runs})
    for label in dict.fromkeys(label for label, _ in runs):
        values = [sorted(v for v, _ in runs[label, c]) for c in levels]
        medians = [statistics.median(v) for v in values]
        ax.errorbar(levels, medians, yerr=[[m - v[0] for m, v in zip(medians, values)],
                                           [v[-1] - m for m, v in zip(medians, values)]],
                    fmt="o-", capsize=4, label=label)
    ax.set(xscale="log", xticks=levels, xticklabels=levels, xlabel="concurrent streams", ylabel=ylabel, title=title)
    ax.legend()
    fig.tight_layout()
    return fig


def arrivals(streams: Mapping[str, Sequence[tuple[float, bytes]]], title: str = "") -> Figure:
    """Notebook 09: when each piece of a stream arrived, one line per way it came (`streams[name]` is a list of
    (seconds after sending, bytes)): the share of the stream received so far, a dot per read. A proxy that holds
    the stream back shows as a late cliff instead of a slope."""
    fig, ax = plt.subplots(figsize=(9, 4))
    for name, reads in streams.items():
        total = sum(len(data) for _, data in reads) or 1
        times, shares, received = [0.0], [0.0], 0
        for at, data in reads:
            received += len(data)
            times.append(at)
            shares.append(received / total)
        ax.step(times, shares, where="post", marker=".", label=f"{name} ({len(reads)} reads)")
    ax.set(xlabel="seconds after sending", ylabel="share of the stream received", title=title, ylim=(0, 1.05))
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig
