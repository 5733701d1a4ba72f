"""Statistics for published results: pure functions on arrays, no MLflow, no plotting.

Four questions are answered here:

* how precisely a configuration's score is known from its seeds: :func:`summarize` (mean, sample
  standard deviation, Student-t 95% confidence interval of the mean);
* whether two configurations differ: :func:`paired_bootstrap` over per-example scores and seeds;
* how large a difference the data could have seen, and how many seeds or examples a given difference
  would need: :func:`power` from the seed and example variance components of the paired differences;
* which of many comparisons survive their number: :func:`holm` (Holm-Bonferroni adjusted p-values).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as _sps


@dataclass(frozen=True)
class Summary:
    """Mean over seeds with its spread; ``std`` and the interval are NaN when ``n < 2``: one seed says
    nothing about seed variance, and a made-up interval would read as precision we do not have."""

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float

    @property
    def has_interval(self) -> bool:
        return self.n >= 2 and math.isfinite(self.ci_low)


def summarize(values, confidence: float = 0.95) -> Summary:
    """Mean, sample std (ddof=1) and the t-based CI ``mean ± t_{(1+c)/2, n-1} · std / sqrt(n)``.

    NaN entries are missing values (a trial that did not log the metric) and are dropped; infinities
    are kept, since a diverged run is a result, not a gap.
    """
    x = np.asarray(values, dtype=float).ravel()
    x = x[~np.isnan(x)]
    n = int(x.size)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n == 1:
        return Summary(1, mean, math.nan, math.nan, math.nan)
    std = float(x.std(ddof=1))
    half = float(_sps.t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


@dataclass(frozen=True)
class Bootstrap:
    """Result of :func:`paired_bootstrap`; ``delta`` is ``mean(b) - mean(a)``."""

    delta: float
    ci_low: float
    ci_high: float
    p_value: float
    n_seeds: int
    n_examples: int
    n_boot: int
    seed: int
    confidence: float

    @property
    def p_floor(self) -> float:
        """The smallest p-value ``n_boot`` replicates can resolve; p = 0 means "below this"."""
        return 1.0 / self.n_boot


def bootstrap_indices(n_seeds: int, n_examples: int, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The resampling plan, drawn from ``numpy.random.default_rng(seed)`` in this exact order:
    first all seed rows ``integers(0, n_seeds, (n_boot, n_seeds))``, then all example columns
    ``integers(0, n_examples, (n_boot, n_examples))``. Fixed so that a result can be reproduced by
    hand (and is, in the tests)."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    cols = rng.integers(0, n_examples, size=(n_boot, n_examples))
    return rows, cols


def _counts(idx: np.ndarray, n: int) -> np.ndarray:
    """Per replicate, how often each index was drawn: ``(B, k)`` indices -> ``(B, n)`` counts."""
    b = idx.shape[0]
    flat = (np.arange(b)[:, None] * n + idx).ravel()
    return np.bincount(flat, minlength=b * n).reshape(b, n).astype(float)


def paired_bootstrap(a, b, n_boot: int = 10_000, seed: int = 0, confidence: float = 0.95,
                     chunk: int = 1000, weights=None) -> Bootstrap:
    """Paired bootstrap of ``mean(b) - mean(a)`` over seeds and examples.

    ``a`` and ``b`` are ``(n_seeds, n_examples)`` score matrices (1-D means one seed) whose cell
    ``[s, i]`` is the score of seed ``s`` on example ``i``: the same seed and example on both sides,
    so pairing removes the example difficulty and the seed's data order from the difference.

    Each replicate resamples seed rows and example columns with replacement (a two-way bootstrap:
    the examples are the same for every seed, so they are crossed with seeds, not nested in them)
    and takes the mean of the differences ``d = b - a`` over the resampled rows x columns. With one
    seed the row draw is a no-op and this is the ordinary paired bootstrap over examples.

    * CI: percentiles ``(1-c)/2`` and ``(1+c)/2`` of the replicate deltas (numpy's default linear
      interpolation).
    * p-value, two-sided: ``min(1, 2 · min(P*(delta* <= 0), P*(delta* >= 0)))`` where P* is the
      share of replicates. Ties at exactly 0 count on both sides, which is conservative for scores
      like exact match whose differences are often exactly 0. Identical inputs give p = 1; a
      difference no replicate crosses gives p = 0, to be read as ``p < 1/n_boot``.
    * ``weights`` (one per example, e.g. its token count): the mean over examples is the weighted one
      ``sum(w d) / sum(w)`` in the estimate and in every replicate (a ratio estimator), so a set's
      token-weighted NLL is compared as the study logged it, not as an average of per-example means.
    """
    a = np.atleast_2d(np.asarray(a, dtype=float))
    b = np.atleast_2d(np.asarray(b, dtype=float))
    if a.shape != b.shape:
        raise ValueError(f"paired scores need equal shapes, got {a.shape} and {b.shape}")
    if a.size == 0:
        raise ValueError("paired bootstrap needs at least one seed and one example")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("paired scores contain NaN or infinity")
    d = b - a
    n_seeds, n_examples = d.shape
    w = np.ones(n_examples) if weights is None else np.asarray(weights, dtype=float).ravel()
    if w.shape != (n_examples,) or not (np.isfinite(w).all() and (w > 0).all()):
        raise ValueError(f"weights need one positive value per example ({n_examples}), got {w.shape}")
    rows, cols = bootstrap_indices(n_seeds, n_examples, n_boot, seed)
    deltas = np.empty(n_boot)
    # weighted mean of d over the resampled grid = (row counts) · d · (column counts · w) /
    # (n_seeds · sum(column counts · w)); counting avoids materialising n_boot x n_seeds x n_examples gathered values.
    for start in range(0, n_boot, chunk):
        stop = min(start + chunk, n_boot)
        cr, cc = _counts(rows[start:stop], n_seeds), _counts(cols[start:stop], n_examples)
        cw = cc * w
        deltas[start:stop] = ((cr @ d) * cw).sum(axis=1) / (n_seeds * cw.sum(axis=1))
    lo, hi = np.percentile(deltas, [100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2])
    p = min(1.0, 2.0 * min(float(np.mean(deltas <= 0)), float(np.mean(deltas >= 0))))
    return Bootstrap(weighted_mean(d, w), float(lo), float(hi), p, n_seeds, n_examples, n_boot, seed, confidence)


@dataclass(frozen=True)
class Components:
    """Variance components of paired differences ``d[s, i]`` (seeds x examples) under the crossed model
    ``d = mu + seed_s + example_i + residual_si``: ``seed`` (between seeds), ``example`` (between examples)
    and ``residual`` (seed x example interaction and noise). With one seed, ``seed`` cannot be told apart
    and is 0, and ``residual`` is folded into ``example`` (see :func:`components`)."""

    seed: float
    example: float
    residual: float
    n_seeds: int
    n_examples: int

    def variance(self, n_seeds: int | None = None, n_examples: int | None = None) -> float:
        """Variance of the mean difference over ``n_seeds`` x ``n_examples`` (default: the observed)."""
        s, e = n_seeds or self.n_seeds, n_examples or self.n_examples
        return self.seed / s + self.example / e + self.residual / (s * e)


def components(d) -> Components:
    """The two-way ANOVA (one value a cell) estimates of :class:`Components` from the matrix of differences:
    ``residual = MS_res``, ``seed = (MS_seeds - MS_res) / E`` and ``example = (MS_examples - MS_res) / S``,
    each floored at 0 (a negative estimate means "too small to see"). Then ``variance()`` at the observed
    size equals ``MS_seeds / (S E) + MS_examples / (S E) - MS_res / (S E)`` when nothing was floored, the
    usual standard error of a crossed design's grand mean."""
    d = np.atleast_2d(np.asarray(d, dtype=float))
    n_s, n_e = d.shape
    if n_e < 2:
        raise ValueError("variance components need at least two examples")
    grand = d.mean()
    rows, cols = d.mean(axis=1), d.mean(axis=0)
    ms_cols = n_s * float(((cols - grand) ** 2).sum()) / (n_e - 1)
    if n_s < 2:
        return Components(0.0, ms_cols, 0.0, 1, n_e)
    ms_rows = n_e * float(((rows - grand) ** 2).sum()) / (n_s - 1)
    resid = d - rows[:, None] - cols[None, :] + grand
    ms_res = float((resid ** 2).sum()) / ((n_s - 1) * (n_e - 1))
    return Components(max(0.0, (ms_rows - ms_res) / n_e), max(0.0, (ms_cols - ms_res) / n_s), ms_res, n_s, n_e)


@dataclass(frozen=True)
class Power:
    """What a paired comparison could detect (see :func:`power`). ``seeds_needed`` and ``examples_needed``
    are the least seeds (examples kept) and examples (seeds kept) whose standard error makes ``effect``
    detectable; None when the other source of noise alone is too large for any number of them, or there is
    no effect to detect."""

    effect: float
    se: float
    mde: float
    seeds_needed: int | None
    examples_needed: int | None
    power: float
    alpha: float
    parts: Components


def _z(power: float, alpha: float) -> float:
    return float(_sps.norm.ppf(1 - alpha / 2) + _sps.norm.ppf(power))


def _needed(fixed: float, per_unit: float, target_var: float) -> int | None:
    """Least n with ``fixed + per_unit / n <= target_var``."""
    room = target_var - fixed
    if room <= 0 or not math.isfinite(room):
        return None
    return max(1, math.ceil(per_unit / room - 1e-12))


def power(d, effect: float | None = None, power: float = 0.8, alpha: float = 0.05) -> Power:
    """Minimal detectable effect and the sizes a difference needs, for the paired differences ``d``.

    A two-sided level-``alpha`` z-test of the mean difference ``D`` with standard error ``SE`` detects a
    true difference ``delta`` with probability ``power`` when ``|delta| >= (z_{1-alpha/2} + z_power) SE``
    (2.80 SE at 80% power and alpha 0.05): that is ``mde`` at the observed size. ``SE^2 =
    seed/S + example/E + residual/(S E)`` (:func:`components`), so for ``effect`` (default: the observed
    mean difference) the seeds needed at ``E`` examples solve ``seed/S + (example + residual/S)/E <=
    (effect/z)^2`` for ``S``, and likewise the examples at ``S`` seeds. A normal approximation: with few
    seeds a t-test needs somewhat more.
    """
    d = np.atleast_2d(np.asarray(d, dtype=float))
    return detectable(components(d), float(d.mean()) if effect is None else float(effect), power, alpha)


def detectable(parts: Components, effect: float, power: float = 0.8, alpha: float = 0.05) -> Power:
    """:func:`power` from known (or estimated) variance components."""
    z = _z(power, alpha)
    se = math.sqrt(parts.variance())
    target = (effect / z) ** 2
    s, e = parts.n_seeds, parts.n_examples
    seeds = _needed(parts.example / e, parts.seed + parts.residual / e, target) if effect else None
    examples = _needed(parts.seed / s, parts.example + parts.residual / s, target) if effect else None
    return Power(effect, se, z * se, seeds, examples, power, alpha, parts)


def needed_text(n, unit: str, other: str) -> str:
    """``n`` seeds/examples a difference needs, in words; None (or NaN) means more of ``unit`` alone at the
    other's current size (``other``) never reaches it: the rest of the noise is already too large."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return f"out of reach of more {unit} at {other}"
    n = int(n)
    return f"{n} {unit if n != 1 else unit.removesuffix('s')} at {other}"


def holm(p_values) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input's order: sorted ascending, the k-th smallest (from
    0) becomes ``max over j <= k of min(1, (m - j) p_(j))``. Rejecting where the adjusted p <= alpha holds
    the family-wise error rate at alpha for any dependence between the tests."""
    p = [float(x) for x in p_values]
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    out, running = [0.0] * m, 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (m - k) * p[i]))
        out[i] = running
    return out


def weighted_mean(m, weights=None) -> float:
    """Mean over the rows (seeds) of each row's ``weights``-weighted mean over columns (examples)."""
    m = np.atleast_2d(np.asarray(m, dtype=float))
    w = np.ones(m.shape[1]) if weights is None else np.asarray(weights, dtype=float)
    return float((m @ w).mean() / w.sum())


def param_importances(params: dict[str, list], values, direction: str = "minimize",
                      seed: int = 0) -> tuple[dict[str, float], str]:
    """fANOVA importances of ``params`` (name -> one value per complete trial) for ``values``.

    Builds an in-memory Optuna study from the rows, so it works for any study read back from
    tracking, whatever sampler produced it. Distributions are inferred from the values: strings are
    categorical; integers and floats are numeric, on a log scale when all positive and spanning more
    than a factor of 10 (ranks, learning rates); ``seed`` is categorical because seed 3 is not "more"
    than seed 1. Returns ``(importances, note)``: empty importances and a reason when there is too
    little to fit (fewer than 3 trials or fewer than 2 varying parameters, where the answer would
    be trivially 1.0 for the one parameter).
    """
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    y = np.asarray(values, dtype=float)
    keep = np.isfinite(y)
    # Optuna accepts only plain Python values as choices
    varying = {k: [v.item() if isinstance(v, np.generic) else v for v, ok in zip(vs, keep) if ok]
               for k, vs in params.items()}
    varying = {k: vs for k, vs in varying.items() if len(set(vs)) > 1}
    n = int(keep.sum())
    if n < 3:
        return {}, f"parameter importances need at least 3 complete trials with a value; found {n}"
    if len(varying) < 2:
        return {}, (f"parameter importances need at least 2 varying parameters; found "
                    f"{', '.join(varying) or 'none'}")

    def distribution(name, vs):
        if name == "seed" or any(isinstance(v, str) for v in vs):
            return CategoricalDistribution(sorted(set(vs), key=str))
        lo, hi = min(vs), max(vs)
        log = lo > 0 and hi / lo > 10
        if all(float(v).is_integer() for v in vs) and not any(isinstance(v, float) for v in vs):
            return IntDistribution(int(lo), int(hi), log=log)
        return FloatDistribution(float(lo), float(hi), log=log)

    dists = {k: distribution(k, vs) for k, vs in varying.items()}
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "new study created" chatter on stderr
    try:
        study = optuna.create_study(direction=direction)
    finally:
        optuna.logging.set_verbosity(verbosity)
    for i, value in enumerate(y[keep]):
        trial_params = {k: (int(vs[i]) if isinstance(dists[k], IntDistribution) else vs[i])
                        for k, vs in varying.items()}
        study.add_trial(optuna.trial.create_trial(params=trial_params, distributions=dists, value=float(value)))
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
    importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
    return {k: float(v) for k, v in importances.items()}, ""
