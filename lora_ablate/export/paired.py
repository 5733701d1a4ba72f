"""Per-example scores of two groups of trials, paired for :func:`lora_ablate.export.stats.paired_bootstrap`:
what ``compare`` reports and what the tables' "within the interval of the best" marks rest on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from lora_ablate.errors import UserError, choices

PER_EXAMPLE = ("nll", "exact_match", "rouge_l")


@dataclass
class Paired:
    """Score matrices (rows = seeds, columns = examples) of both sides, the examples' weights and how
    the rows were paired."""

    a: np.ndarray
    b: np.ndarray
    weights: np.ndarray | None  # token counts for nll (the set NLL the study logs is token-weighted)
    common: list
    pairing: str


def pair_scores(scores_a: pd.DataFrame, scores_b: pd.DataFrame, set_name: str, metric: str) -> Paired:
    """Rows pair by seed where both sides ran the same seeds (same data order and init stream); without a
    common seed each side is averaged over its own seeds per example and only examples pair.
    Columns are the examples present in every row of both sides.
    """
    mats = []
    for side in (scores_a, scores_b):
        rows = side[side["set"] == set_name]
        if metric not in rows or rows[metric].isna().all():
            have = [c for c in PER_EXAMPLE if c in side and side[c].notna().any()]
            raise UserError(f"no per-example {metric!r} in the scores.jsonl of {set_name!r}; per-example "
                            f"metrics there: {choices(have) or '(none)'}")
        mats.append(rows.pivot_table(index="seed", columns="idx", values=metric, aggfunc="mean"))
    a, b = mats
    common = sorted(set(a.index) & set(b.index))
    if common:
        a, b, pairing = a.loc[common], b.loc[common], f"paired by seed ({len(common)} common)"
    else:
        pairing = f"seeds unpaired: per-example means over {len(a)} and {len(b)} seeds"
        a, b = a.mean().to_frame().T, b.mean().to_frame().T
    cols = a.columns[a.notna().all()].intersection(b.columns[b.notna().all()])
    if len(cols) == 0:
        raise UserError(f"the two configurations share no scored example of {set_name!r}")
    return Paired(a[cols].to_numpy(float), b[cols].to_numpy(float),
                  _token_weights(scores_a, scores_b, set_name, cols) if metric == "nll" else None, common, pairing)


def differences(p: Paired) -> np.ndarray:
    """``b - a`` per seed and example, each example scaled by its weight over the mean weight, so that the
    plain mean of the matrix is the weighted mean difference the bootstrap reports (for the power analysis,
    whose variance components then describe the set metric as logged)."""
    d = p.b - p.a
    return d if p.weights is None else d * (p.weights / p.weights.mean())


def _token_weights(scores_a: pd.DataFrame, scores_b: pd.DataFrame, set_name: str, cols) -> np.ndarray | None:
    """Each example's scored token count (the same tokenizer on both sides, so one count per example);
    None for scores written without counts, which then weigh equally."""
    both = pd.concat([scores_a, scores_b])
    rows = both[both["set"] == set_name]
    if "tokens" not in rows or rows["tokens"].isna().any():
        return None
    w = rows.groupby("idx")["tokens"].mean().reindex(cols).to_numpy(float)
    return w if np.isfinite(w).all() and (w > 0).all() else None
