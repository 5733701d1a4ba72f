"""Steps to a training loss (export/steps_to_loss.py), on synthetic curves with known answers."""

import math

import numpy as np
import pandas as pd

from lora_ablate.export.axes import ResultAxis
from lora_ablate.export.steps_to_loss import first_step_at, smoothed, steps_to_loss_table
from lora_ablate.vocab import State


def test_smoothing_is_a_trailing_mean_and_levels_are_first_hits():
    steps, loss = smoothed(np.array([3, 1, 2, 4]), np.array([3.0, 1.0, 2.0, 4.0]), window=2)
    assert steps.tolist() == [1, 2, 3, 4]
    assert loss.tolist() == [1.0, 1.5, 2.5, 3.5]  # sorted by step first, then past points only
    assert first_step_at(np.array([1, 2, 3]), np.array([3.0, 2.0, 1.0]), 2.0) == 2.0
    assert math.isnan(first_step_at(np.array([1, 2]), np.array([3.0, 2.5]), 1.0))


class FakeStudy:
    """The slice of export.tracked.Study the table reads: two inits, two seeds each, exponential curves
    whose rates are known, so the steps to each level are known in closed form."""

    name = "fake"

    def __init__(self, rates):
        rows, curves = [], []
        for i, (init, rate) in enumerate(rates):
            run = f"run{i}"
            rows.append({"run_id": run, "init": init, "seed": i % 2, "state": State.COMPLETE,
                         "trial_number": i, "trainable_params": 10})
            for step in range(1, 101):
                curves.append({"run_id": run, "key": "train/loss", "step": step, "value": 2.0 * math.exp(-rate * step)})
        self.complete = self.trials = pd.DataFrame(rows)
        self._curves = pd.DataFrame(curves)
        self.axes = [ResultAxis("init", ("default", "pissa"))]

    def curves(self, run_ids, keys):
        c = self._curves
        return c[c["run_id"].isin(list(run_ids)) & c["key"].isin(keys)]


def test_a_faster_init_reaches_every_level_in_fewer_steps():
    t = steps_to_loss_table(FakeStudy([("default", 0.02), ("default", 0.02), ("pissa", 0.08), ("pissa", 0.08)]))
    assert t is not None and [row[0] for row in t.cells] == ["default", "pissa"]
    col = [c for c in t.data.columns if c.endswith("steps mean")]
    fast, slow = t.data.iloc[1][col].to_numpy(float), t.data.iloc[0][col].to_numpy(float)
    # the last level (mean final loss) is above the fast curve's end, below the slow one's: the slow init
    # never reaches it, the fast one does
    assert np.all(fast[:2] < slow[:2]) and math.isnan(slow[2]) and not math.isnan(fast[2])
    assert "not reached" in t.cells[0][-1]
    # smoothed level l is reached at the first step whose trailing mean of 5 points is <= l: check one exactly
    steps, loss = smoothed(np.arange(1, 101), 2.0 * np.exp(-0.08 * np.arange(1, 101)))
    level = float(t.data.columns[t.data.columns.str.endswith("steps mean")][0].split()[1])
    assert fast[0] == first_step_at(steps, loss, level)


def test_no_table_without_curves():
    s = FakeStudy([("default", 0.02)])
    s._curves = s._curves.iloc[:3]
    assert steps_to_loss_table(s) is None
