"""Which training path trains a study's or a command's trials: ``make_trainer`` picks the ``Trainer``.

Pack 1 is the plain peft reference loop (``reference``) unless ``fast``; a pack of K > 1 is the packed engine
(``lora_ablate.packed``), imported only then.
"""

from __future__ import annotations

from lora_ablate.data import Encoded
from lora_ablate.evaluation import Evaluator
from lora_ablate.models import LoadedModel
from lora_ablate.reference import ReferenceTrainer
from lora_ablate.trial import Trainer, TrialHooks


def make_trainer(base: LoadedModel, data: Encoded, evaluator: Evaluator | None, hooks: TrialHooks | None = None, *,
                 pack: int = 1, compile: bool = False, progress: bool = True, fast: bool = False,
                 attention: str = "auto") -> Trainer:
    """A trainer of trials on ``base``: the reference for ``pack`` 1, else the packed engine, which trains
    the specs it is handed (the caller hands up to ``pack``) in one pack; ``fast`` takes the packed engine
    for a pack of 1 too (the fast single trial); ``compile`` and ``attention`` (``study.attention``) are
    for the packed engine only, and ``attention`` flex or varlen where it cannot work is a UserError here."""
    if pack <= 1 and not fast:
        # the reference loop is what flex and varlen are checked against: it stays as it is
        if attention not in ("auto", "sdpa"):
            from lora_ablate.packed.attention import attention_error

            raise attention_error(attention, "it is for the packed engine's sequence packing, and study.pack=1 "
                                  "(or a CPU) trains on the reference loop")
        return ReferenceTrainer(base, data, evaluator, hooks, progress)
    from lora_ablate.packed import PackedTrainer

    return PackedTrainer(base, data, evaluator, hooks, progress, compile=compile, attention=attention)
