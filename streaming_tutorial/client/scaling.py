"""Judge a scaling table before quoting it: medians over repeated rounds, and a plain "too noisy" where the
rounds, the machine or the numbers themselves say the measurement cannot be trusted.

On a shared 2-core machine one busy moment turns a throughput into nonsense (one replica "going" from 1 token/s
at one stream to 342 at sixteen; two replicas "scoring" 0.05x of one). Each setup at each concurrency is
measured in several rounds, each run with the share of the CPU that other programs used meanwhile
(client/machine_load.py `OtherLoad`); `ScalingTable` then refuses a ratio it cannot back:

    runs = {("1 replica", 1): [(tok_s, other_share), ...], ("2 replicas", 1): [...], ...}
    table = ScalingTable(runs, baseline="1 replica")
    print(table.report())      # the medians, their range, the other load, and a ratio only where all is clean
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

# Rounds whose range exceeds this share of their median disagree too much to report one number.
MAX_SPREAD = 0.25
# Other programs above this share of all cores during any round: the machine was not ours.
MAX_OTHER_LOAD = 0.10
# A stream never goes faster in a crowd than alone: C streams above C times one stream's tokens/s (with this
# margin for the run's ramp-up and tail) means the one-stream runs were slowed by something we did not see.
CROWD_MARGIN = 1.25


@dataclass(frozen=True)
class Cell:
    """One setup at one concurrency: output tokens/s and the other programs' CPU share, one pair per round."""

    tokens_per_s: tuple[float, ...]
    other_load: tuple[float, ...]

    @classmethod
    def of(cls, rounds: list[tuple[float, float]]) -> Cell:
        if not rounds:
            raise ValueError("a cell needs at least one round")
        return cls(tuple(t for t, _ in rounds), tuple(o for _, o in rounds))

    @property
    def median(self) -> float:
        return statistics.median(self.tokens_per_s)

    @property
    def spread(self) -> float:
        """The rounds' range as a share of their median (inf when the median is not positive)."""
        median = self.median
        return (max(self.tokens_per_s) - min(self.tokens_per_s)) / median if median > 0 else float("inf")

    def noise(self, max_spread: float = MAX_SPREAD, max_load: float = MAX_OTHER_LOAD) -> str | None:
        """Why this cell cannot be trusted, or None."""
        if self.median <= 0:
            return "no tokens"
        reasons = []
        if len(self.tokens_per_s) > 1 and self.spread > max_spread:
            reasons.append(f"rounds {self.spread:.0%} apart")
        if max(self.other_load) > max_load:
            reasons.append(f"other programs used {max(self.other_load):.0%} of the CPU")
        return ", ".join(reasons) or None


class ScalingTable:
    """`runs`: {(setup label, concurrency): [(output tokens/s, other programs' CPU share), ...]}, one pair per
    round. `baseline` is the setup the others are compared with; `max_ratio`, if given, the most any setup can
    give over it (the number of replicas, say): a ratio far above it is refused as nonsense."""

    def __init__(self, runs: dict[tuple[str, int], list[tuple[float, float]]], baseline: str,
                 max_spread: float = MAX_SPREAD, max_load: float = MAX_OTHER_LOAD,
                 max_ratio: float | None = None) -> None:
        self.cells = {key: Cell.of(rounds) for key, rounds in runs.items()}
        self.labels = list(dict.fromkeys(label for label, _ in runs))
        self.levels = sorted({c for _, c in runs})
        if baseline not in self.labels:
            raise ValueError(f"no runs of the baseline {baseline!r}")
        self.baseline, self.max_spread, self.max_load = baseline, max_spread, max_load
        self.max_ratio = max_ratio

    def problems(self, label: str, concurrency: int) -> list[str]:
        """Everything that makes (label, concurrency) untrustworthy: its own noise, and a crowd faster than the
        setup's single stream allows (which throws doubt on both: the crowd, and the slowed single stream)."""
        cell = self.cells[label, concurrency]
        found = [noise] if (noise := cell.noise(self.max_spread, self.max_load)) else []
        lowest = self.levels[0]
        alone = self.cells.get((label, lowest))
        if alone is None or alone.median <= 0:
            return found
        too_fast = [c for c in self.levels if c > lowest and (label, c) in self.cells
                    and self.cells[label, c].median > CROWD_MARGIN * alone.median * c / lowest]
        if concurrency in too_fast:
            found.append(f"{cell.median:.0f} tok/s is more than {concurrency // lowest}x the {alone.median:.1f} "
                         f"at {lowest} stream{'s' if lowest > 1 else ''}: one of the two ran on a busy machine")
        elif concurrency == lowest and too_fast:
            found.append(f"slower than its own {too_fast[0]} streams allow: slowed by something unseen")
        return found

    def ratio(self, label: str, concurrency: int) -> float | None:
        """`label`'s median over the baseline's at `concurrency`; None where either side has a problem, or where
        the ratio is above `max_ratio` (e.g. 2 replicas cannot give 30x one)."""
        if self.problems(label, concurrency) or self.problems(self.baseline, concurrency):
            return None
        ratio = self.cells[label, concurrency].median / self.cells[self.baseline, concurrency].median
        return None if self.max_ratio is not None and ratio > CROWD_MARGIN * self.max_ratio else ratio

    @property
    def trustworthy(self) -> bool:
        return not any(self.problems(label, c) for label, c in self.cells) and all(
            self.ratio(label, c) is not None for label, c in self.cells if label != self.baseline
            and (self.baseline, c) in self.cells)

    def rows(self) -> list[str]:
        rounds = max(len(cell.tokens_per_s) for cell in self.cells.values())
        width = max(len(label) for label in self.labels)
        lines = [f"{'':<{width}} {'C':>3} {'tok/s (median)':>14} {f'range of {rounds} rounds':>18} "
                 f"{'CPU used by others':>19}"]
        for label in self.labels:
            for c in self.levels:
                if (label, c) not in self.cells:
                    continue
                cell, problems = self.cells[label, c], self.problems(label, c)
                lines.append(f"{label:<{width}} {c:>3} {cell.median:14.1f} {min(cell.tokens_per_s):9.1f} – "
                             f"{max(cell.tokens_per_s):<6.1f} {max(cell.other_load):18.0%}"
                             + (f"  ← NOISY: {'; '.join(problems)}" if problems else ""))
        return lines

    def ratios(self) -> list[str]:
        lines = []
        for label in self.labels:
            if label == self.baseline:
                continue
            for c in self.levels:
                if (label, c) not in self.cells or (self.baseline, c) not in self.cells:
                    continue
                ratio = self.ratio(label, c)
                if ratio is not None:
                    lines.append(f"C={c:>2}: {label} give {ratio:.2f}x the tokens/s of {self.baseline} (medians)")
                elif self.problems(label, c) or self.problems(self.baseline, c):
                    lines.append(f"C={c:>2}: no ratio: too noisy to compare (see the table)")
                else:
                    lines.append(f"C={c:>2}: no ratio: {label} measured more than {self.max_ratio:g}x "
                                 f"{self.baseline}, which this hardware cannot give")
        return lines

    def report(self) -> str:
        verdict = ("The rounds agree, nothing else used the CPU, and the numbers are plausible: these are this "
                   "machine's numbers." if self.trustworthy else
                   f"NOISY: rounds more than {self.max_spread:.0%} apart, other programs above {self.max_load:.0%} of "
                   "the CPU, or numbers that cannot be (a crowd\nfaster than one stream allows, a ratio beyond what "
                   "the hardware could give). No ratio is given where that\nhappened: close other programs and run "
                   "this section again.")
        return "\n".join([*self.rows(), "", *self.ratios(), "", verdict])
