"""Statistics for the evidence rules of benchmarks/PROTOCOL.md: means with sample standard
deviations, and paired differences with seeded bootstrap confidence intervals.

* `mean_sd(values)`: mean and standard deviation with ddof = 1 (the sample SD, as
  ``numpy.std(ddof=1)``), the spread a reader expects next to a mean over seeds.
* `paired_difference(a, b)`: per-seed differences ``a - b`` (the same seeds, zoos and budgets on
  both sides), their mean and SD, and a 95% **percentile** bootstrap interval for the mean
  difference: 10,000 resamples of the seeds with replacement, from ``numpy.random.default_rng(seed)``,
  the interval's ends at the 2.5th and 97.5th percentiles of the resampled means (linear
  interpolation, as ``scipy.stats.bootstrap(method="percentile")``; Efron & Tibshirani 1993, ch. 13).
  Percentile, not BCa: with 10 seeds BCa's acceleration is itself estimated from 10 jackknife
  values, and its interval is often wider than the percentile one for no gain; the percentile
  interval is the one a reader can recompute by hand (tests/test_protocol.py does, on a
  two-valued example whose bootstrap distribution is binomial). Like every bootstrap interval it
  is too narrow for very few seeds: report n beside it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np

__all__ = ["MeanSD", "PairedDifference", "bootstrap_interval", "mean_sd", "paired_difference"]

RESAMPLES = 10_000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class MeanSD:
    mean: float
    sd: float  # ddof = 1; nan for a single value
    n: int

    def format(self, scale: float = 1.0, digits: int = 1) -> str:
        """'mean (sd)', e.g. '71.3 (2.1)' with scale=100 for accuracies in points."""
        return f"{scale * self.mean:.{digits}f} ({scale * self.sd:.{digits}f})"

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PairedDifference:
    """Mean of the paired differences a - b, their SD (ddof = 1) and a percentile bootstrap interval."""

    mean: float
    sd: float
    n: int
    low: float
    high: float
    confidence: float
    resamples: int
    seed: int
    method: str = "percentile"

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def format(self, scale: float = 1.0, digits: int = 1) -> str:
        """'+2.3 [+0.4, +4.1]': the mean difference and its interval."""
        return (f"{scale * self.mean:+.{digits}f} [{scale * self.low:+.{digits}f}, "
                f"{scale * self.high:+.{digits}f}]")

    def to_json(self) -> dict:
        return asdict(self)


def _values(values: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{what}: expected a non-empty 1-D sequence of numbers, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{what}: values must be finite, got {array.tolist()}")
    return array


def mean_sd(values: Sequence[float] | np.ndarray) -> MeanSD:
    """Mean and sample standard deviation (ddof = 1; nan for one value)."""
    array = _values(values, "mean_sd")
    sd = float(array.std(ddof=1)) if array.size > 1 else float("nan")
    return MeanSD(float(array.mean()), sd, int(array.size))


def bootstrap_interval(values: Sequence[float] | np.ndarray, statistic: Callable[..., np.ndarray] = np.mean, *,
                       confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic` over `values` (resampled with replacement).

    `statistic(samples, axis=-1)` must reduce the last axis, as numpy's reductions do."""
    array = _values(values, "bootstrap_interval")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    rng = np.random.default_rng(seed)
    index = rng.integers(0, array.size, size=(resamples, array.size))  # (resamples, n)
    estimates = statistic(array[index], axis=-1)  # (resamples,)
    alpha = (1 - confidence) / 2
    low, high = np.percentile(estimates, [100 * alpha, 100 * (1 - alpha)])
    return float(low), float(high)


def paired_difference(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, *,
                      confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = 0) -> PairedDifference:
    """The paired differences ``a[i] - b[i]`` (one pair per seed): mean, SD and bootstrap interval."""
    a, b = _values(a, "paired_difference: a"), _values(b, "paired_difference: b")
    if a.shape != b.shape:
        raise ValueError(f"paired_difference: a and b must pair up, got {a.size} and {b.size} values")
    diff = a - b
    summary = mean_sd(diff)
    low, high = bootstrap_interval(diff, confidence=confidence, resamples=resamples, seed=seed)
    return PairedDifference(summary.mean, summary.sd, summary.n, low, high, confidence, resamples, seed)
