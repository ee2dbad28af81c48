"""Bootstrap confidence intervals over records, for every accuracy and paired difference a
table reports. Percentile bootstrap (Efron): resample the N records with replacement, take the
statistic's (1 − level)/2 and (1 + level)/2 quantiles over the resamples. A paired difference
resamples the SAME records for both strategies, so what the records share (an easy or a hard
question) cancels and the interval is narrower than two separate ones suggest.

Rule used in the tables: a difference whose interval excludes 0 is a difference; one whose
interval holds 0 is reported as "no difference", whatever its sign.
"""

from __future__ import annotations

import numpy as np

_CHUNK = 1000  # resamples drawn at once: bounds memory at N·_CHUNK indices


def _outcomes(x, what: str) -> np.ndarray:
  x_N = np.asarray(x, np.float64)
  if x_N.ndim != 1 or x_N.size == 0:
    raise ValueError(f"{what} must be a non-empty 1-D array of per-record outcomes; got "
                     f"shape {x_N.shape}.")
  if not np.all(np.isfinite(x_N)):
    raise ValueError(f"{what} holds NaN or infinite outcomes.")
  return x_N


def bootstrap_means(x_N, n_boot: int = 10000, seed: int = 0) -> np.ndarray:
  """The means [n_boot] of n_boot resamples (with replacement) of the N records; the same
  seed draws the same resamples for any x of the same N (what pairs two strategies)."""
  x_N = _outcomes(x_N, "outcomes")
  if n_boot < 1:
    raise ValueError(f"n_boot must be >= 1; got {n_boot}.")
  n = x_N.size
  rng = np.random.default_rng(seed)
  out = []
  for start in range(0, n_boot, _CHUNK):
    idx_BxN = rng.integers(0, n, (min(_CHUNK, n_boot - start), n))
    out.append(x_N[idx_BxN].mean(axis=1))
  return np.concatenate(out)


def _percentile_ci(x_N: np.ndarray, n_boot: int, level: float, seed: int):
  if not 0 < level < 1:
    raise ValueError(f"level must be in (0, 1); got {level}.")
  means_B = bootstrap_means(x_N, n_boot, seed)
  lo, hi = np.quantile(means_B, [(1 - level) / 2, (1 + level) / 2])
  mean = float(x_N.mean())
  # quantile interpolation can land a few ulps outside a degenerate (all-equal) sample
  return mean, float(min(lo, mean)), float(max(hi, mean))


def bootstrap_ci(outcomes_N, n_boot: int = 10000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float, float]:
  """(mean, lo, hi): the mean of per-record outcomes (1/0 for accuracy, or rewards) and its
  percentile-bootstrap interval over records."""
  return _percentile_ci(_outcomes(outcomes_N, "outcomes"), n_boot, level, seed)


def paired_diff_ci(a_N, b_N, n_boot: int = 10000, level: float = 0.95,
                   seed: int = 0) -> tuple[float, float, float]:
  """(mean(a) − mean(b), lo, hi) for two strategies scored on the same N records (row i of
  both is the same record): each resample takes the same records for a and b."""
  a_N, b_N = _outcomes(a_N, "a"), _outcomes(b_N, "b")
  if a_N.shape != b_N.shape:
    raise ValueError(f"paired outcomes need the same records: a has {a_N.size}, b has "
                     f"{b_N.size}.")
  # resampling the pairs and differencing their means = resampling the differences
  return _percentile_ci(a_N - b_N, n_boot, level, seed)


def differs(lo: float, hi: float) -> bool:
  """True when the interval [lo, hi] excludes 0: a difference, not noise."""
  return lo > 0 or hi < 0


def verdict(lo: float, hi: float) -> str:
  """"higher" / "lower" when the difference's interval excludes 0, else "no difference"."""
  if lo > 0:
    return "higher"
  if hi < 0:
    return "lower"
  return "no difference"


def format_ci(mean: float, lo: float, hi: float, *, digits: int = 1,
              signed: bool = False) -> str:
  """A fraction and its interval in percent: "34.4 [28.1, 40.6]"; signed: "+3.1 [-1.2, 7.5]"
  (for differences)."""
  sign = "+" if signed else ""
  return f"{100 * mean:{sign}.{digits}f} [{100 * lo:.{digits}f}, {100 * hi:.{digits}f}]"
