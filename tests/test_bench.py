"""Latency verdict on synthetic timing samples: zero overhead, real overhead, too noisy to say."""

import numpy as np
import pytest

from lora_export.latency import ratio_stats, verdict


def _samples(ratio: float, noise: float, n: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    base = 10 + rng.normal(0, 0.2, n)
    merged = base * ratio * (1 + rng.normal(0, noise, n))
    return list(merged), list(base)


@pytest.mark.parametrize("ratio, noise, expected", [
    (1.00, 0.005, "zero overhead"),
    (0.95, 0.005, "zero overhead"),  # merged faster: no overhead either
    (1.30, 0.005, "overhead"),  # an unmerged adapter's typical cost
    (1.06, 0.01, "overhead"),
    (1.00, 0.30, "inconclusive"),
])
def test_verdict(ratio, noise, expected):
    r = ratio_stats(*_samples(ratio, noise))
    assert verdict([r, r]) == expected, r


def test_one_bad_axis_decides_overhead():
    good = ratio_stats(*_samples(1.0, 0.005))
    bad = ratio_stats(*_samples(1.3, 0.005))
    assert verdict([good, bad]) == "overhead"


def test_ratio_ci_contains_median():
    r = ratio_stats(*_samples(1.1, 0.02))
    assert r.ci_low <= r.median <= r.ci_high
    assert 1.05 < r.median < 1.15
