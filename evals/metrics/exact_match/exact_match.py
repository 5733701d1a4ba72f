"""Exact match after light, case-sensitive normalisation (a local `evaluate` metric; needs no hub)."""

import re

import datasets
import evaluate

_DESCRIPTION = """
Exact match of a prediction and a reference after normalisation: surrounding whitespace stripped,
one trailing period dropped, one pair of matching surrounding quotes (" ' `) dropped, inner runs of
whitespace collapsed to one space. The comparison stays case-sensitive because the suite has tasks
whose whole point is case (uppercase, title_case).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): model outputs.
    references (list of str): expected answers, one per prediction.
Returns:
    exact_match (float): mean score in [0, 1] (0.0 for no examples).
    exact_match_scores (list of float): 1.0 or 0.0 per example.
Example:
    >>> m = evaluate.load("evals/metrics/exact_match")
    >>> m.compute(predictions=['"2021-03-05".'], references=["2021-03-05"])
    {'exact_match': 1.0, 'exact_match_scores': [1.0]}
"""

_QUOTES = ('"', "'", "`")


def normalize(text: str) -> str:
    text = text.strip()
    if text.endswith("."):
        text = text[:-1].rstrip()
    # Only a matching pair: a lone apostrophe may belong to the answer.
    if len(text) >= 2 and text[0] == text[-1] and text[0] in _QUOTES:
        text = text[1:-1].strip()
    return re.sub(r"\s+", " ", text)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        scores = [float(normalize(p) == normalize(r)) for p, r in zip(predictions, references)]
        return {"exact_match": sum(scores) / len(scores) if scores else 0.0, "exact_match_scores": scores}
