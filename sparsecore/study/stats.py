"""Statistics over seeds: mean, sample standard deviation, standard error, and the rule by
which a difference between two conditions of the study counts.

The rule: two conditions are compared seed by seed (the pruned net of seed s against the
dense net of seed s, ...), and their difference counts when the mean of the per-seed
differences exceeds `z` standard errors of that mean (z = 2 by default). With one seed there
is no standard error and no difference can be shown: such checks are left undecided.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

Z = 2.0  # a difference counts when it exceeds this many standard errors


def finite(xs: Iterable[float | None]) -> list[float]:
    """The values that are numbers (None and NaN left out)."""
    return [float(x) for x in xs if x is not None and not math.isnan(x)]


def mean(xs: Iterable[float | None]) -> float:
    """Mean of the finite values; NaN when there are none."""
    v = finite(xs)
    return sum(v) / len(v) if v else float("nan")


def std(xs: Iterable[float | None]) -> float:
    """Sample standard deviation (n - 1 in the denominator) of the finite values; NaN with
    fewer than two."""
    v = finite(xs)
    if len(v) < 2:
        return float("nan")
    m = sum(v) / len(v)
    return math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))


def sem(xs: Iterable[float | None]) -> float:
    """Standard error of the mean, std / sqrt(n); NaN with fewer than two values."""
    v = finite(xs)
    return std(v) / math.sqrt(len(v)) if len(v) >= 2 else float("nan")


@dataclass(frozen=True)
class Diff:
    """The mean of per-seed differences a_s - b_s, its standard error and the number of
    seeds."""

    mean: float
    se: float
    n: int

    def lower(self, z: float = Z) -> bool | None:
        """a below b by more than z standard errors (None: no standard error)."""
        return None if math.isnan(self.se) else self.mean < -z * self.se

    def higher(self, z: float = Z) -> bool | None:
        """a above b by more than z standard errors (None: no standard error)."""
        return None if math.isnan(self.se) else self.mean > z * self.se

    def text(self, scale: float = 1.0, digits: int = 3, unit: str = "") -> str:
        """"+1.23 ± 0.45 pp (2 SE 0.90)"-style evidence: the mean difference, its standard
        error and the threshold of the rule, each times `scale`."""
        if math.isnan(self.mean):
            return "-"
        if math.isnan(self.se):
            return f"{scale * self.mean:+.{digits}f}{unit} (one seed: no standard error)"
        return (f"{scale * self.mean:+.{digits}f}{unit} ± {scale * self.se:.{digits}f} SE "
                f"(n = {self.n})")


def paired(a: Iterable[float | None], b: Iterable[float | None]) -> Diff:
    """The per-seed differences a_s - b_s (pairs with a missing value left out) as a Diff."""
    d = [x - y for x, y in zip(a, b) if x is not None and y is not None
         and not math.isnan(x) and not math.isnan(y)]
    return Diff(mean(d), sem(d), len(d))


def seed_values(model: dict[str, Any], get: Callable[[dict[str, Any]], float | None]
                ) -> list[float | None]:
    """get(analysis of seed s) for every seed of one model of results.json, in seed order
    (None where it raises KeyError: a value that seed does not have)."""
    out: list[float | None] = []
    for _, a in sorted(model["seeds"].items(), key=lambda kv: int(kv[0])):
        try:
            out.append(get(a))
        except KeyError:
            out.append(None)
    return out


def mean_std(xs: Iterable[float | None], scale: float = 1.0, digits: int = 3) -> str:
    """"mean ± std" of the finite values times `scale` ("-" when there are none, the mean
    alone with one value)."""
    v = finite(xs)
    if not v:
        return "-"
    m = f"{scale * mean(v):.{digits}f}"
    return m if len(v) < 2 else f"{m} ± {scale * std(v):.{digits}f}"


def verdict(oks: list[bool | None]) -> str:
    """"yes" when every decided check holds, "no" when none does, "partly" in between;
    "undecided" when no check could be decided (one seed)."""
    decided = [ok for ok in oks if ok is not None]
    if not decided:
        return "undecided"
    if all(decided):
        return "yes" if len(decided) == len(oks) else "partly"
    return "no" if not any(decided) else "partly"


def rule_text(z: float = Z) -> str:
    """The rule of `Diff.lower` / `Diff.higher`, in words for a report."""
    return (f"a difference between two conditions counts when the mean of its per-seed "
            f"differences exceeds {z:g} standard errors of that mean (standard error = sample "
            "standard deviation of the per-seed differences / sqrt(number of seeds)); with one "
            "seed nothing counts and the check is undecided")
