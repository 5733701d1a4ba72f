"""Match after SQuAD-style normalisation, for free-form answers (a local `evaluate` metric; needs no hub)."""

import re
import string

import datasets
import evaluate

_DESCRIPTION = """
Exact match of a prediction and a reference after the SQuAD v1.1 answer normalisation: lower case,
punctuation removed, the articles a/an/the removed, whitespace collapsed. Unlike exact_match it is
case-insensitive, so it suits free-form answers ("The Eiffel Tower." vs "eiffel tower") and not the
suite's case tasks. lora_ablate's leakage check normalises texts the same way.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): model outputs.
    references (list of str): expected answers, one per prediction.
Returns:
    squad_match (float): mean score in [0, 1] (0.0 for no examples).
    squad_match_scores (list of float): 1.0 or 0.0 per example.
Example:
    >>> m = evaluate.load("evals/metrics/squad_match")
    >>> m.compute(predictions=["The Eiffel  Tower!"], references=["eiffel tower"])
    {'squad_match': 1.0, 'squad_match_scores': [1.0]}
"""

# kept standalone (evaluate copies this file into its cache); lora_ablate/leakage.py's normalize is the same
_PUNCT = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> str:
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class SquadMatch(evaluate.Metric):
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
        return {"squad_match": sum(scores) / len(scores) if scores else 0.0, "squad_match_scores": scores}
