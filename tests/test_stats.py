"""Bootstrap intervals (stats.py) against cases computable by hand and the normal
approximation."""

from __future__ import annotations

import numpy as np
import pytest

from t2jax import stats


def test_constant_outcomes_have_a_zero_width_interval():
  assert stats.bootstrap_ci(np.ones(50)) == (1.0, 1.0, 1.0)
  assert stats.bootstrap_ci(np.zeros(7)) == (0.0, 0.0, 0.0)
  assert stats.bootstrap_ci([1.0]) == (1.0, 1.0, 1.0)  # one record: every resample is it


def test_interval_width_matches_the_normal_approximation():
  rng = np.random.default_rng(3)
  x = (rng.random(400) < 0.3).astype(float)
  p = x.mean()
  mean, lo, hi = stats.bootstrap_ci(x, n_boot=20000)
  assert mean == p and lo < p < hi
  normal = 2 * 1.959964 * np.sqrt(p * (1 - p) / x.size)
  assert hi - lo == pytest.approx(normal, rel=0.06)
  assert (lo + hi) / 2 == pytest.approx(p, abs=0.01)  # near symmetric at p = 0.3, N = 400
  _, lo90, hi90 = stats.bootstrap_ci(x, n_boot=20000, level=0.90)
  assert lo < lo90 < hi90 < hi
  assert hi90 - lo90 == pytest.approx(2 * 1.644854 * np.sqrt(p * (1 - p) / x.size), rel=0.06)


def test_same_seed_same_interval():
  x = (np.arange(64) % 3 == 0).astype(float)
  assert stats.bootstrap_ci(x, seed=5) == stats.bootstrap_ci(x, seed=5)
  assert stats.bootstrap_ci(x, seed=5) != stats.bootstrap_ci(x, seed=6)
  # chunked draws: more resamples extend the same stream
  np.testing.assert_array_equal(stats.bootstrap_means(x, 2500, seed=1)[:1000],
                                stats.bootstrap_means(x, 1000, seed=1))


def test_paired_difference():
  rng = np.random.default_rng(0)
  a = (rng.random(200) < 0.5).astype(float)
  assert stats.paired_diff_ci(a, a) == (0.0, 0.0, 0.0)
  # b = a with 20 of a's successes turned into failures: a − b ≥ 0 on every resample
  b = a.copy()
  b[np.flatnonzero(a)[:20]] = 0.0
  diff, lo, hi = stats.paired_diff_ci(a, b)
  assert diff == pytest.approx(0.1) and 0 < lo < diff < hi and stats.differs(lo, hi)
  assert stats.verdict(lo, hi) == "higher"
  assert stats.verdict(-hi, -lo) == "lower"
  # pairing: the same records for both, so the interval is far narrower than the one from
  # resampling a's and b's records independently
  unpaired = stats.bootstrap_means(a, seed=1) - stats.bootstrap_means(b, seed=2)
  ulo, uhi = np.quantile(unpaired, [0.025, 0.975])
  assert hi - lo < 0.6 * (uhi - ulo)
  # equal to bootstrapping the per-record differences
  assert stats.paired_diff_ci(a, b, seed=4) == stats.bootstrap_ci(a - b, seed=4)
  with pytest.raises(ValueError, match="same records"):
    stats.paired_diff_ci(a, b[:-1])


def test_no_difference_rule_and_format():
  assert not stats.differs(-0.01, 0.02) and stats.verdict(-0.01, 0.02) == "no difference"
  assert not stats.differs(0.0, 0.05)  # touching 0 is not excluding it
  assert stats.differs(0.01, 0.05) and stats.differs(-0.05, -0.01)
  assert stats.format_ci(0.34375, 0.28125, 0.40625) == "34.4 [28.1, 40.6]"
  assert stats.format_ci(0.031, -0.012, 0.075, signed=True) == "+3.1 [-1.2, 7.5]"
  assert stats.format_ci(-0.031, -0.075, 0.012, signed=True) == "-3.1 [-7.5, 1.2]"


def test_bad_inputs_are_refused():
  for bad in ([], [[1.0, 0.0]], [1.0, np.nan]):
    with pytest.raises(ValueError):
      stats.bootstrap_ci(bad)
  with pytest.raises(ValueError, match="level"):
    stats.bootstrap_ci([1.0, 0.0], level=95)
