"""ROUGE-L F-measure, implemented here (a local `evaluate` metric; no hub, no rouge_score)."""

import re

import datasets
import evaluate

_DESCRIPTION = """
ROUGE-L F1: tokens are the lower-cased runs of letters and digits (Unicode-aware), so whitespace and
punctuation only separate tokens; with L the length of the longest common subsequence of the token
lists, P = L / len(prediction), R = L / len(reference) and the score is 2PR / (P + R). Two empty token
lists score 1.0; exactly one empty scores 0.0.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): model outputs.
    references (list of str): expected answers, one per prediction.
Returns:
    rouge_l (float): mean score in [0, 1] (0.0 for no examples).
    rouge_l_scores (list of float): score per example.
Example:
    >>> m = evaluate.load("evals/metrics/rouge_l")
    >>> m.compute(predictions=["a c d"], references=["a b c d"])["rouge_l"]
    0.857142857142857
"""

_TOKEN = re.compile(r"[^\W_]+")


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def lcs_length(a: list[str], b: list[str]) -> int:
    # One row of the dynamic-programming table is enough.
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(prediction: str, reference: str) -> float:
    p, r = tokenize(prediction), tokenize(reference)
    if not p and not r:
        return 1.0
    lcs = lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RougeL(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Lin, C.-Y. (2004). ROUGE: A Package for Automatic Evaluation of Summaries.",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        scores = [rouge_l(p, r) for p, r in zip(predictions, references)]
        return {"rouge_l": sum(scores) / len(scores) if scores else 0.0, "rouge_l_scores": scores}
