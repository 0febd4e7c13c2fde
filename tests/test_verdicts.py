"""The study's statistics against scipy's t-tests and brute force."""

import math

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from warp_jax import verdicts
from warp_jax.verdicts import Effect


def test_p_values_are_scipys_one_sided_t_tests():
    x = np.array([0.3, 0.1, 0.25, -0.05, 0.2, 0.15])
    support, refute = verdicts.p_values(Effect("e", x, sesoi=0.4))
    assert support == pytest.approx(scipy.stats.ttest_1samp(x, 0.0, alternative="greater").pvalue)
    assert refute == pytest.approx(scipy.stats.ttest_1samp(x, 0.4, alternative="less").pvalue)
    tost, beyond = verdicts.p_values(Effect("e", x, sesoi=0.4, kind="equivalent"))
    assert tost == pytest.approx(max(
        scipy.stats.ttest_1samp(x, -0.4, alternative="greater").pvalue,
        scipy.stats.ttest_1samp(x, 0.4, alternative="less").pvalue))
    assert beyond == pytest.approx(min(1.0, 2 * min(
        scipy.stats.ttest_1samp(x, 0.4, alternative="greater").pvalue,
        scipy.stats.ttest_1samp(x, -0.4, alternative="less").pvalue)))


def test_holm_steps_down_and_stays_monotone():
    got = verdicts.holm([0.01, 0.04, 0.03, 0.005, float("nan")])
    np.testing.assert_allclose(got[:4], [0.03, 0.06, 0.06, 0.02])
    assert math.isnan(got[4])


def _with(mean: float, sd: float, n: int) -> np.ndarray:
    """n values with exactly this mean and sample standard deviation."""
    z = np.random.default_rng(n).normal(size=n)
    z = (z - z.mean()) / z.std(ddof=1)
    return mean + sd * z


@settings(max_examples=40, deadline=None)
@given(st.floats(-1, 1), st.floats(0.05, 1), st.sampled_from(["positive", "equivalent"]))
def test_seeds_needed_is_where_the_observed_effect_first_decides(mean, sd, kind):
    effect = Effect("e", _with(mean, sd, 6), sesoi=0.3, kind=kind)
    n = verdicts.seeds_needed(effect, level=0.05)
    if n is None:
        return

    def decided(k):
        return min(verdicts.p_values(Effect("e", _with(mean, sd, k), 0.3, kind)))

    assert decided(n) < 0.05 * (2 if kind == "equivalent" else 1) + 1e-9
    if n > 2:
        assert decided(n - 1) >= 0.05 - 1e-9


def test_a_clear_effect_is_supported_an_absent_one_refuted_a_noisy_one_needs_seeds():
    rng = np.random.default_rng(0)
    effects = [Effect("clear", 1.0 + 0.1 * rng.normal(size=6), sesoi=0.2),
               Effect("absent", 0.01 * rng.normal(size=6), sesoi=0.2),
               Effect("reversed", -1.0 + 0.1 * rng.normal(size=6), sesoi=0.2),
               Effect("noisy", 0.3 + 1.0 * rng.normal(size=6), sesoi=0.2),
               Effect("saturated", 0.01 * rng.normal(size=6), sesoi=0.2, kind="equivalent")]
    out = {v["effect"]: v for v in verdicts.judge(effects, alpha=0.05)}
    assert [out[k]["verdict"] for k in ("clear", "absent", "reversed", "noisy", "saturated")] \
        == ["supported", "refuted", "refuted", "inconclusive", "supported"]
    assert out["noisy"]["seeds_needed"] > 6
    assert out["clear"]["lower"] > 0 and out["absent"]["upper"] < 0.2
    assert all(v["p_support_holm"] >= v["p_support"] for v in out.values())
    both, one_off, undecided = verdicts.judge_claims(
        [[effects[0], effects[4]], [effects[0], effects[2]], [effects[0], effects[3]]], 0.05)
    assert (both["verdict"], one_off["verdict"], undecided["verdict"]) == (
        "supported", "refuted", "inconclusive")
    # intersection-union: a claim is as strong as its weakest effect, then Holm over claims
    assert both["p_support"] == max(out["clear"]["p_support"], out["saturated"]["p_support"])
    assert both["p_support_holm"] == pytest.approx(min(1.0, 3 * both["p_support"]))
    assert undecided["seeds_needed"] == undecided["effects"][1]["seeds_needed"] > 6


def test_a_bad_effect_is_one_clear_error():
    with pytest.raises(ValueError, match="kind"):
        Effect("e", [1.0, 2.0], sesoi=0.1, kind="bigger")
    with pytest.raises(ValueError, match="smallest effect"):
        Effect("e", [1.0, 2.0], sesoi=0.0)
