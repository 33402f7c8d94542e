"""The study's statistics over seeds, against values computed by hand."""

from __future__ import annotations

import math

import pytest

from sparsecore.study import stats


def test_mean_std_sem_by_hand() -> None:
    # [1, 2, 4]: mean 7/3; squared deviations 16/9 + 1/9 + 25/9 = 42/9; / (n - 1) = 7/3
    xs = [1.0, 2.0, 4.0]
    assert stats.mean(xs) == pytest.approx(7 / 3)
    assert stats.std(xs) == pytest.approx(math.sqrt(7 / 3))  # 1.5275
    assert stats.sem(xs) == pytest.approx(math.sqrt(7 / 3) / math.sqrt(3))  # 0.8819
    assert stats.mean([1.0, None, float("nan"), 3.0]) == 2.0  # missing values left out
    assert math.isnan(stats.mean([])) and math.isnan(stats.std([5.0]))
    assert math.isnan(stats.sem([5.0]))
    assert stats.std([2.0, 2.0]) == 0.0


def test_paired_difference_and_the_rule_by_hand() -> None:
    # per-seed differences 0.2, 0.05, 0.15: mean 0.4/3 = 0.13333; squared deviations
    # (1/15)^2 + (1/12)^2 + (1/60)^2 = 0.011667; / 2 -> 0.0058333; std 0.076376;
    # SE = 0.076376 / sqrt(3) = 0.044096; 2 SE = 0.088192 < 0.13333: the difference counts
    d = stats.paired([0.9, 0.8, 0.85], [0.7, 0.75, 0.7])
    assert d.n == 3
    assert d.mean == pytest.approx(0.4 / 3)
    assert d.se == pytest.approx(0.044096, abs=1e-6)
    assert d.higher() is True and d.lower() is False
    assert d.higher(z=3.1) is False  # 3.1 SE = 0.1367 > 0.1333
    flipped = stats.paired([0.7, 0.75, 0.7], [0.9, 0.8, 0.85])
    assert flipped.lower() is True and flipped.higher() is False
    # differences 0.1 and -0.1: mean 0, SE 0.1: nothing counts either way
    even = stats.paired([0.6, 0.4], [0.5, 0.5])
    assert even.mean == pytest.approx(0.0) and even.se == pytest.approx(0.1)
    assert even.lower() is False and even.higher() is False
    one = stats.paired([0.9], [0.1])  # one seed: no standard error, nothing decided
    assert one.n == 1 and one.lower() is None and one.higher() is None
    assert "one seed" in one.text()
    assert stats.paired([0.9, None], [0.1, 0.2]).n == 1  # incomplete pairs left out


def test_text_verdict_and_formatting() -> None:
    d = stats.Diff(mean=0.0123, se=0.0045, n=3)
    assert d.text(100, 2, " pp") == "+1.23 pp ± 0.45 SE (n = 3)"
    assert stats.mean_std([0.5, 0.7], 100, 1) == "60.0 ± 14.1"  # std sqrt(0.02) = 0.1414
    assert stats.mean_std([0.5], 100, 1) == "50.0" and stats.mean_std([None]) == "-"
    assert stats.verdict([True, True]) == "yes"
    assert stats.verdict([False, False]) == "no"
    assert stats.verdict([True, False]) == "partly"
    assert stats.verdict([True, None]) == "partly"
    assert stats.verdict([None, None]) == "undecided"
    assert "2 standard errors" in stats.rule_text(2.0)


def test_seed_values_in_seed_order_with_missing() -> None:
    model = {"seeds": {"10": {"acc": 0.3}, "2": {"acc": 0.1}, "5": {}}}
    assert stats.seed_values(model, lambda a: a["acc"]) == [0.1, None, 0.3]
