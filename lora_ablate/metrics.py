"""Local ``evaluate`` metrics from ``evals/metrics/<name>/<name>.py``, loaded offline by path."""

from __future__ import annotations

import functools

from lora_ablate.errors import UserError, choices
from lora_ablate.suite import evals_dir


def available_metrics() -> list[str]:
    root = evals_dir() / "metrics"
    if not root.is_dir():
        return []
    return sorted(d.name for d in root.iterdir() if (d / f"{d.name}.py").is_file())


@functools.lru_cache(maxsize=None)
def load_metric(name: str):
    """The ``evaluate`` module for ``name``; loaded once, by local path, so nothing touches the hub."""
    available = available_metrics()
    if name not in available:
        raise UserError(f"unknown metric {name!r}; choose one of: {choices(available) or '(none found)'}")
    import evaluate  # deferred: importing evaluate costs about a second

    return evaluate.load(str(evals_dir() / "metrics" / name))


def score(name: str, predictions, references) -> tuple[float, list[float]]:
    """``(mean, per-example scores)`` of metric ``name``."""
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise UserError(f"metric {name}: {len(predictions)} predictions but {len(references)} references")
    if not predictions:
        return 0.0, []  # evaluate refuses an empty batch
    result = load_metric(name).compute(predictions=predictions, references=references)
    return float(result[name]), [float(s) for s in result[f"{name}_scores"]]
