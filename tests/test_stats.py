"""aft_jax.study.stats against values computed by hand (t quantiles from tables, the closed-form t
distribution with 2 degrees of freedom, the normal approximation of a Bernoulli mean)."""

import math

import numpy as np
import pytest

from aft_jax.study.stats import paired_bootstrap, paired_t, t_interval

T_975_DF4 = 2.7764451051977987  # Student t, 97.5% quantile, 4 degrees of freedom


def test_t_interval_over_seeds():
    r = t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    half = T_975_DF4 * math.sqrt(2.5) / math.sqrt(5)
    assert (r.mean, r.n) == (3.0, 5)
    assert r.std == pytest.approx(math.sqrt(2.5))
    assert (r.low, r.high) == pytest.approx((3.0 - half, 3.0 + half))
    one = t_interval([0.4])
    assert one.mean == 0.4 and math.isnan(one.low) and math.isnan(one.high)


def test_paired_t_difference_and_p_value():
    r = paired_t([0.30, 0.32, 0.35], [0.25, 0.30, 0.31])  # d = 0.05, 0.02, 0.04
    sd = math.sqrt(((0.05 - 0.11 / 3) ** 2 + (0.02 - 0.11 / 3) ** 2 + (0.04 - 0.11 / 3) ** 2) / 2)
    t = (0.11 / 3) / (sd / math.sqrt(3))
    assert r.mean == pytest.approx(0.11 / 3) and r.std == pytest.approx(sd)
    assert r.p_value == pytest.approx(1 - t / math.sqrt(t * t + 2))  # two-sided, df = 2 in closed form
    assert paired_t([0.3, 0.4], [0.3, 0.4]).p_value == 1.0
    assert paired_t([0.5, 0.75], [0.25, 0.5]).p_value == 0.0  # the same difference in every seed


def test_paired_bootstrap_known_difference():
    a_q = np.zeros(200)
    a_q[:120] = 1  # a solves the first 120 questions, b the first 100 of them
    b_q = np.zeros(200)
    b_q[:100] = 1
    r = paired_bootstrap(a_q, b_q, resamples=4000)
    se = math.sqrt(0.1 * 0.9 / 200)  # d is 1 on 20 of 200 questions
    assert r.mean == pytest.approx(0.1) and r.std == pytest.approx(se, rel=0.1)
    assert r.low == pytest.approx(0.1 - 1.96 * se, abs=0.01) and r.high == pytest.approx(0.1 + 1.96 * se, abs=0.01)
    assert r.p_value < 0.001


def test_paired_bootstrap_without_a_difference():
    same = paired_bootstrap(np.ones((2, 50)), np.ones((2, 50)), resamples=500)
    assert (same.mean, same.low, same.high, same.p_value) == (0.0, 0.0, 0.0, 1.0)
    a_q = np.r_[np.ones(10), np.zeros(10), np.ones(30)]
    b_q = np.r_[np.zeros(10), np.ones(10), np.ones(30)]  # as many wins as losses
    even = paired_bootstrap(a_q, b_q, resamples=2000)
    assert even.mean == 0.0 and even.low < 0 < even.high and even.p_value > 0.5
