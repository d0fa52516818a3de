"""The notebooks' helpers in the client wing: the scaling table's noise checks (client/scaling.py), waiting with a
deadline (client/waiting.py) and the charts (client/plots.py). No server."""

from __future__ import annotations

import math
import time

import matplotlib
import pytest

matplotlib.use("Agg")

from streaming_tutorial.client import plots  # noqa: E402
from streaming_tutorial.client.latency import RunSummary, Stats  # noqa: E402
from streaming_tutorial.client.scaling import Cell, ScalingTable  # noqa: E402
from streaming_tutorial.client.waiting import wait_until  # noqa: E402

QUIET = 0.02  # other programs' CPU share on a quiet machine


def table(one: dict[int, list[float]], two: dict[int, list[float]], load: float = QUIET) -> ScalingTable:
    runs = {("1 replica", c): [(t, load) for t in ts] for c, ts in one.items()}
    runs |= {("2 replicas", c): [(t, load) for t in ts] for c, ts in two.items()}
    return ScalingTable(runs, baseline="1 replica")


# --- the scaling table ---------------------------------------------------------------------------------------

def test_agreeing_rounds_on_a_quiet_machine_give_median_ratios():
    t = table({1: [40, 42, 41], 16: [160, 170, 165]}, {1: [40, 41, 39], 16: [110, 120, 115]})
    assert t.trustworthy
    assert t.ratio("2 replicas", 1) == pytest.approx(40 / 41)
    assert t.ratio("2 replicas", 16) == pytest.approx(115 / 165)
    report = t.report()
    assert "0.98x" in report and "0.70x" in report and "NOISY" not in report


def test_rounds_that_disagree_get_no_ratio():
    t = table({1: [40, 42, 41], 4: [100, 30, 105]}, {1: [40, 41, 39], 4: [90, 92, 95]})
    assert t.problems("1 replica", 4) == [f"rounds {(105 - 30) / 100:.0%} apart"]
    assert t.ratio("2 replicas", 4) is None  # the baseline is noisy: no ratio either way
    assert t.ratio("2 replicas", 1) is not None
    report = t.report()
    assert "C= 4: no ratio" in report and "NOISY" in report and not t.trustworthy


def test_other_programs_on_the_cpu_make_every_cell_noisy():
    t = table({1: [40, 42, 41], 16: [160, 170, 165]}, {1: [40, 41, 39], 16: [110, 120, 115]}, load=0.35)
    assert all("other programs used 35% of the CPU" in t.problems(label, c) for label, c in t.cells)
    assert t.ratios() == [f"C={c:>2}: no ratio: too noisy to compare (see the table)" for c in (1, 16)]


def test_a_crowd_faster_than_one_stream_allows_flags_both_and_gives_no_ratio():
    """The nonsense of a busy machine: one stream slowed to 1 tok/s in every round (so the rounds agree, and the
    load went unseen), 342 at 16 streams: more than 16 streams at 1 tok/s can give."""
    t = table({1: [1.0, 1.0, 1.1], 16: [342, 340, 345]}, {1: [40, 41, 39], 16: [110, 120, 115]})
    assert "slower than its own 16 streams allow" in t.problems("1 replica", 1)[0]
    assert "more than 16x the 1.0" in t.problems("1 replica", 16)[0]
    assert t.problems("2 replicas", 1) == [] and t.problems("2 replicas", 16) == []
    assert t.ratio("2 replicas", 1) is None and t.ratio("2 replicas", 16) is None
    assert not t.trustworthy and "40.00x" not in t.report()


def test_a_ratio_beyond_what_the_hardware_can_give_is_refused():
    runs = {("1 replica", 1): [(30.0, QUIET)] * 3, ("2 replicas", 1): [(100.0, QUIET)] * 3,
            ("1 replica", 4): [(90.0, QUIET)] * 3, ("2 replicas", 4): [(150.0, QUIET)] * 3}
    t = ScalingTable(runs, baseline="1 replica", max_ratio=2)
    assert t.ratio("2 replicas", 1) is None and t.ratio("2 replicas", 4) == pytest.approx(150 / 90)
    assert "which this hardware cannot give" in t.report() and not t.trustworthy
    assert ScalingTable(runs, baseline="1 replica").ratio("2 replicas", 1) == pytest.approx(100 / 30)


def test_a_cell_without_tokens_is_noise_not_a_division_by_zero():
    assert Cell.of([(0.0, 0.0), (0.0, 0.0)]).noise() == "no tokens"
    t = table({1: [0.0, 0.0, 0.0]}, {1: [40, 41, 39]})
    assert t.ratio("2 replicas", 1) is None and "no ratio" in t.report()


def test_one_round_has_no_spread_to_judge():
    assert Cell.of([(40.0, 0.0)]).noise() is None
    with pytest.raises(ValueError):
        Cell.of([])
    with pytest.raises(ValueError):
        ScalingTable({("a", 1): [(1.0, 0.0)]}, baseline="b")


# --- waiting -------------------------------------------------------------------------------------------------

def test_wait_until_returns_once_the_check_holds():
    calls = []
    assert wait_until(lambda: calls.append(1) or len(calls) >= 3 and "done", timeout=5, interval=0.01) == "done"
    assert len(calls) == 3


def test_wait_until_gives_up_at_its_deadline_and_says_what_it_waited_for():
    began = time.monotonic()
    with pytest.raises(TimeoutError, match="the moon"):
        wait_until(lambda: False, timeout=0.2, interval=0.05, what="the moon")
    assert 0.2 <= time.monotonic() - began < 2


# --- charts --------------------------------------------------------------------------------------------------

def test_grouped_bars_draws_one_bar_per_series_and_x():
    fig = plots.grouped_bars({"a": {"alone": 40, "busy": 20}, "b": {"alone": 38, "busy": 2}}, ylabel="tok/s")
    ax = fig.axes[0]
    heights = [p.get_height() for p in ax.patches]
    assert heights == [40, 20, 38, 2]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["alone", "busy"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b"]
    matplotlib.pyplot.close(fig)


def summary(c: int, tps: float, tpot: float, ttft: float) -> RunSummary:
    def s(v: float) -> Stats:
        return Stats(1, v, v, v, v)
    return RunSummary(c, 2 * c, 0, 1.0, int(tps), s(ttft), s(ttft), s(tpot), s(tpot), s(1.0), tps, 2.0 * c)


def test_throughput_and_latency_plots_the_summaries():
    fig = plots.throughput_and_latency({1: summary(1, 40, 0.025, 0.05), 4: summary(4, 120, 0.033, 0.08)})
    left, right = fig.axes
    assert list(left.lines[0].get_ydata()) == [40, 120]
    assert list(left.lines[1].get_ydata()) == pytest.approx([40, 1 / 0.033])
    assert list(right.lines[0].get_ydata()) == pytest.approx([25, 33])
    matplotlib.pyplot.close(fig)


def test_token_probabilities_draws_a_box_per_token():
    fig = plots.token_probabilities([("Paris", 0.9, []), (" is", 0.4, [])])
    assert len(fig.axes[0].patches) == 2
    assert [t.get_text() for t in fig.axes[0].texts] == ["Paris", "·is"]
    matplotlib.pyplot.close(fig)


def test_medians_with_range_plots_medians_and_ranges():
    fig = plots.medians_with_range({("x", 1): [(1.0, 0), (3.0, 0), (2.0, 0)], ("x", 4): [(5.0, 0), (9.0, 0)]},
                                   ylabel="tok/s", title="t")
    line = fig.axes[0].lines[0]
    assert list(line.get_ydata()) == [2.0, 7.0]
    matplotlib.pyplot.close(fig)


def test_requests_during_a_failure_marks_the_kill_and_the_unhealthy_moment():
    fig = plots.requests_during_a_failure([(0.5, 0.01, 200), (1.0, 0.2, "ConnectError")], {"unhealthy": 3.0})
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.texts] == ["kill", "router marks it unhealthy"]
    assert not math.isnan(ax.lines[1].get_xdata()[0]) and ax.lines[1].get_xdata()[0] == 3.0
    matplotlib.pyplot.close(fig)


def test_wait_until_pauses_with_the_function_it_is_given():
    pauses = []
    with pytest.raises(TimeoutError):
        wait_until(lambda: False, timeout=0.05, interval=0.01, pause=lambda seconds: pauses.append(seconds))
    assert pauses and set(pauses) == {0.01}
