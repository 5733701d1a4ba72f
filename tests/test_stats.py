"""Seed intervals, the paired bootstrap and importances against independent computations."""

import math

import numpy as np
import pytest
from scipy import stats

from lora_ablate.export.stats import bootstrap_indices, paired_bootstrap, param_importances, summarize


def test_summary_matches_scipy_t_interval():
    x = np.array([0.41, 0.37, 0.45, 0.40])
    s = summarize(x)
    lo, hi = stats.t.interval(0.95, df=len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    assert s.n == 4
    assert s.mean == pytest.approx(x.mean(), abs=1e-15)
    assert s.std == pytest.approx(np.std(x, ddof=1), abs=1e-15)
    assert (s.ci_low, s.ci_high) == (pytest.approx(lo, abs=1e-12), pytest.approx(hi, abs=1e-12))


def test_two_values_use_t_with_one_degree_of_freedom():
    s = summarize([1.0, 3.0])
    # t_{0.975, 1} = tan(0.475 pi) = 12.7062..., std = sqrt(2), half width = t * sqrt(2) / sqrt(2) = t
    # (scipy 1.13 computes the quantile 2e-11 off; the normal's 1.96 is what this guards against)
    assert s.ci_high - s.mean == pytest.approx(math.tan(0.475 * math.pi), rel=1e-9)


def test_one_seed_has_no_interval_and_missing_values_are_dropped():
    s = summarize([0.5, float("nan")])
    assert s.n == 1 and s.mean == 0.5
    assert math.isnan(s.std) and math.isnan(s.ci_low) and math.isnan(s.ci_high)
    assert not s.has_interval
    empty = summarize([])
    assert empty.n == 0 and math.isnan(empty.mean)


def _simple_bootstrap(a, b, n_boot, seed, confidence=0.95):
    """The textbook loop, sharing only the documented index plan with the implementation."""
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    d = b - a
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, d.shape[0], size=(n_boot, d.shape[0]))
    cols = rng.integers(0, d.shape[1], size=(n_boot, d.shape[1]))
    deltas = np.array([d[np.ix_(rows[k], cols[k])].mean() for k in range(n_boot)])
    lo, hi = np.percentile(deltas, [100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2])
    p = min(1.0, 2 * min(np.mean(deltas <= 0), np.mean(deltas >= 0)))
    return d.mean(), lo, hi, p


@pytest.mark.parametrize("shape", [(3, 40), (1, 25), (4, 7)])
def test_bootstrap_equals_the_simple_loop(shape):
    rng = np.random.default_rng(7)
    a = rng.normal(1.0, 0.3, size=shape)
    b = a + rng.normal(0.05, 0.2, size=shape)
    res = paired_bootstrap(a, b, n_boot=3000, seed=11, chunk=700)  # chunks must not change the stream
    delta, lo, hi, p = _simple_bootstrap(a, b, 3000, 11)
    assert res.delta == pytest.approx(delta, abs=1e-12)
    assert res.ci_low == pytest.approx(lo, abs=1e-12)
    assert res.ci_high == pytest.approx(hi, abs=1e-12)
    assert res.p_value == pytest.approx(p, abs=1e-12)
    assert (res.n_seeds, res.n_examples) == shape


def test_one_dimensional_scores_are_one_seed():
    a = np.arange(10) / 8
    b = a[::-1].copy()
    res = paired_bootstrap(a, b, n_boot=500, seed=3)
    assert res.n_seeds == 1 and res.n_examples == 10
    delta, lo, hi, p = _simple_bootstrap(a, b, 500, 3)
    assert (res.delta, res.ci_low, res.ci_high, res.p_value) == pytest.approx((delta, lo, hi, p), abs=1e-12)


def test_identical_configurations_differ_by_exactly_nothing():
    a = np.random.default_rng(0).random((3, 32))
    res = paired_bootstrap(a, a.copy(), n_boot=1000)
    assert (res.delta, res.ci_low, res.ci_high, res.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_constant_shift_is_recovered_exactly():
    a = np.random.default_rng(1).integers(0, 64, size=(2, 50)) / 64  # dyadic: the shift is exact
    res = paired_bootstrap(a, a + 0.25, n_boot=1000)
    assert (res.delta, res.ci_low, res.ci_high) == (0.25, 0.25, 0.25)
    assert res.p_value == 0.0  # no replicate reaches 0: read as p < 1/n_boot
    assert paired_bootstrap(a + 0.25, a, n_boot=1000).delta == -0.25


def test_p_value_counts_ties_on_both_sides():
    # one example differs: a replicate is 0 whenever it never draws that example, which is most
    a = np.zeros((1, 20))
    b = a.copy()
    b[0, 0] = 1.0
    res = paired_bootstrap(a, b, n_boot=2000, seed=5)
    _, cols = bootstrap_indices(1, 20, 2000, 5)
    share_zero = np.mean(~(cols == 0).any(axis=1))
    assert res.p_value == pytest.approx(min(1.0, 2 * share_zero))
    assert res.delta == 1 / 20 and res.ci_low == 0.0


def test_bootstrap_rejects_unpaired_or_missing_scores():
    with pytest.raises(ValueError, match="equal shapes"):
        paired_bootstrap(np.zeros((2, 3)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="NaN"):
        paired_bootstrap(np.array([0.0, np.nan]), np.zeros(2))


def test_importances_find_the_parameter_that_matters():
    rng = np.random.default_rng(0)
    r = rng.choice([4, 8, 16, 32, 64], size=40).tolist()
    lr = (10 ** rng.uniform(-5, -2, size=40)).tolist()
    y = [2.0 - 0.3 * math.log2(x) + 0.001 * rng.normal() for x in r]
    imp, note = param_importances({"r": r, "lr": lr, "seed": [0] * 40}, y, "minimize")
    assert note == ""
    assert set(imp) == {"r", "lr"}  # seed does not vary: not a parameter of this study
    assert imp["r"] > 0.9 and sum(imp.values()) == pytest.approx(1.0)


def test_importances_say_why_they_are_skipped():
    imp, note = param_importances({"r": [4, 8], "lr": [1e-3, 1e-4]}, [1.0, 2.0])
    assert imp == {} and "at least 3 complete trials" in note
    imp, note = param_importances({"r": [4, 8, 16], "seed": [0, 0, 0]}, [1.0, 2.0, 3.0])
    assert imp == {} and "at least 2 varying parameters" in note and "r" in note


# ----------------------------------------------------------------------------- power and Holm


def crossed(rng, n_seeds, n_examples, mu, seed_sd, example_sd, resid_sd):
    """Paired differences from the crossed model the power analysis assumes."""
    return (mu + seed_sd * rng.standard_normal((n_seeds, 1)) + example_sd * rng.standard_normal((1, n_examples))
            + resid_sd * rng.standard_normal((n_seeds, n_examples)))


def test_variance_components_recover_the_generating_ones():
    from lora_ablate.export.stats import components

    d = crossed(np.random.default_rng(0), 60, 800, 0.1, 0.3, 0.5, 0.2)
    c = components(d)
    assert c.seed == pytest.approx(0.09, rel=0.4) and c.example == pytest.approx(0.25, rel=0.15)
    assert c.residual == pytest.approx(0.04, rel=0.05)
    # at the observed size: the crossed design's standard error from the three mean squares
    n_s, n_e = d.shape
    rows, cols, g = d.mean(1), d.mean(0), d.mean()
    ms_r, ms_c = n_e * ((rows - g) ** 2).sum() / (n_s - 1), n_s * ((cols - g) ** 2).sum() / (n_e - 1)
    ms_e = ((d - rows[:, None] - cols[None, :] + g) ** 2).sum() / ((n_s - 1) * (n_e - 1))
    assert c.variance() == pytest.approx((ms_r + ms_c - ms_e) / (n_s * n_e))
    one = components(d[:1])  # one seed: the ordinary paired standard error over examples
    assert one.variance() == pytest.approx(d[0].var(ddof=1) / n_e) and one.seed == 0


def test_the_sizes_power_asks_for_detect_the_effect_80_percent_of_the_time():
    """Known variance components: the seeds (examples fixed) and the examples (seeds fixed) the formula
    gives are the least with >= 80% power in closed form, and a simulated z-test at that size rejects
    about 80% of the time."""
    from lora_ablate.export.stats import Components, detectable

    true = Components(seed=0.002, example=0.25, residual=0.5, n_seeds=3, n_examples=200)
    effect, z_a = 0.12, stats.norm.ppf(0.975)
    p = detectable(true, effect)
    assert p.mde == pytest.approx((z_a + stats.norm.ppf(0.8)) * math.sqrt(true.variance()))

    def exact(s, e):  # the two-sided z-test's power at s seeds x e examples
        se = math.sqrt(true.variance(s, e))
        return stats.norm.cdf(effect / se - z_a) + stats.norm.cdf(-effect / se - z_a)

    assert exact(p.seeds_needed, 200) >= 0.8 > exact(p.seeds_needed - 1, 200)
    assert exact(3, p.examples_needed) >= 0.8 > exact(3, p.examples_needed - 1)
    rng = np.random.default_rng(1)
    for s, e in ((p.seeds_needed, 200), (3, p.examples_needed)):
        se = math.sqrt(true.variance(s, e))
        draws = (crossed(rng, s, e, effect, math.sqrt(0.002), 0.5, math.sqrt(0.5)).mean() for _ in range(1000))
        hits = [abs(x) / se > z_a for x in draws]
        assert abs(np.mean(hits) - exact(s, e)) < 0.04, (s, e, np.mean(hits), exact(s, e))
    # by hand, z = 2.8016: seeds (0.002 + 0.5/200) / ((0.12/z)^2 - 0.25/200) = 7.70, examples
    # (0.25 + 0.5/3) / ((0.12/z)^2 - 0.002/3) = 356.7
    assert (p.seeds_needed, p.examples_needed) == (8, 357)
    # seed-level noise alone at 3 seeds exceeds what a tiny effect allows: no number of examples helps
    assert detectable(true, 0.05).examples_needed is None and detectable(true, 0.0).seeds_needed is None


def test_holm_matches_a_hand_computed_example():
    from lora_ablate.export.stats import holm

    # sorted 0.005, 0.01, 0.03, 0.04 -> 4 x 0.005, 3 x 0.01, 2 x 0.03, max(0.06, 1 x 0.04)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == [1.0, 1.0] and holm([0.02]) == [0.02] and holm([]) == []


def test_needed_text_reads_as_a_count_or_out_of_reach():
    from lora_ablate.export.stats import needed_text

    assert needed_text(1, "seeds", "100 examples") == "1 seed at 100 examples"
    assert needed_text(12.0, "examples", "3 seeds") == "12 examples at 3 seeds"
    assert needed_text(None, "seeds", "100 examples") == needed_text(float("nan"), "seeds", "100 examples") \
        == "out of reach of more seeds at 100 examples"
