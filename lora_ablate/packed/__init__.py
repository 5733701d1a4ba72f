"""Packed trials: K LoRA trials trained together in one pass over the shared frozen base.

The K trials' batches are stacked along the batch dimension (trial-major: rows ``k*b .. (k+1)*b`` belong to
trial k). The frozen base runs once per micro-batch over the whole stack; every adapted projection is
replaced for the pack's lifetime by a :class:`PackedLoraLinear` that adds each trial's own low-rank update
to that trial's rows with two batched matrix products over stacked A [K, r, in] and B [K, out, r].

What a trial keeps to itself, exactly as on the single path (``reference.train_one``):
  rank (zero-padded to the pack's largest per module, padding provably stays zero: its gradients are exactly 0;
  on a part-adapted fused q/k/v matrix r per role, B's rows of the roles left out held at zero by a gradient mask),
  alpha rule and scale, targets (a projection the trial does not adapt has scale 0 and zero weights),
  learning rate and schedule, weight decay, seed (LoRA A init reproduces peft's RNG calls), init, data
  order (``batch_order`` with its seed), batch size (short trials get all-masked filler rows), gradient
  accumulation, token-mean loss per micro-batch, gradient clipping and AdamW state, dropout rate.
  PiSSA/OLoRA, which peft trains as W0 - s B0 A0 + s B A (a residual base per trial), train here as
  W0 + s (B A - B0 A0) over the shared W0: the same function, with the trial's A0, B0 kept frozen in a
  fifth flat tensor (``Pack.initial``, only while such a trial is in the pack).

All trainable state of the pack lives in four flat fp32 tensors of shape [K, numel] (weights, gradients,
AdamW's two moments; trial-major, so each module's block is a view with contiguous inner dimensions and
autograd accumulates its gradient in place, coalesced); each module's A and B are leaf views into
them. So the optimiser, the per-trial gradient norm and the clipping are a dozen whole-pack tensor
operations whatever K and the number of modules, and no per-step value ever leaves the device
(schedules and data order are precomputed on it).

A trial that diverges, is pruned or finishes leaves the pack: its row is dropped and the surviving
rows are copied, bit for bit, into a re-laid-out pack (a new trial may take the slot, see ``refill``).

K = 1 is the fast single trial: the same code with peft's own operations for the adapter product and
``clip_grad_norm_``, so on CPU in fp32 its losses and weights equal ``train_one``'s bit for bit on
unpadded batches. (On right-padded batches the pack attends causally without a padding mask, which is
exact in arithmetic but not the same SDPA kernel: differences in the last bits.)

On a GPU, by default, each step is replayed as one CUDA graph (``graphs``) and the loss comes from the final
hidden states in chunks (``loss``); both keep the arithmetic and are tested against the eager step
(tests/test_packed_gpu.py), but are not bit for bit the eager path (docs/benchmarks.md says where).

The package, one module a part:
  ``layers``       PackedLoraLinear, the batched LoRA projection installed on each adapted module
  ``layout``       where each trial's A and B sit in the flat [K, numel] tensors; carrying survivors over
  ``slot``         Slot, one trial: spec, result, precomputed data order, token counts and learning rates
  ``init``         peft-identical LoRA init: A by peft's RNG calls; PiSSA/OLoRA A0, B0 by peft's own layer code
  ``device_data``  the training set on the device
  ``optim``        per-trial gradient clipping and AdamW on the flat state
  ``attention``    causal SDPA without a padding mask for training forwards; flex or flash varlen for packed rows
  ``compiled``     torch.compile'd repeated blocks for training steps
  ``loss``         next-token NLL from the final hidden states, LM head and cross-entropy in chunks
  ``graphs``       the training step as CUDA graphs: capture, replay, width buckets
  ``step``         Steps: the step plan until the next membership change and one optimizer step
  ``pack``         Pack: trials joining, install, bind, relayout, close; the public way to step a pack by hand
  ``heldout``      packed held-out NLL and generation, per-trial EvalReports
  ``adapter_dir``  a trial as a stock peft adapter directory
  ``train``        train_packed and PackedTrainer: joining, the step loop, logging, evaluation, leaving, refill
  ``sizing``       auto_pack_size / fit_pack
"""

from lora_ablate.packed.adapter_dir import export_adapter
from lora_ablate.packed.heldout import GENERATE_ROWS, packed_generate, packed_nll, packed_reports
from lora_ablate.packed.init import initial_A
from lora_ablate.packed.layers import PackedLoraLinear
from lora_ablate.packed.optim import BETA1, BETA2, CLIP_EPS, EPS
from lora_ablate.packed.pack import Pack
from lora_ablate.packed.sizing import CPU_PACK, MAX_PACK, auto_pack_size, fit_pack
from lora_ablate.packed.slot import Slot
from lora_ablate.packed.train import PackedTrainer, train_packed

__all__ = ["BETA1", "BETA2", "CLIP_EPS", "CPU_PACK", "EPS", "GENERATE_ROWS", "MAX_PACK", "Pack", "PackedLoraLinear",
           "PackedTrainer", "Slot", "auto_pack_size", "export_adapter", "fit_pack", "initial_A", "packed_generate",
           "packed_nll", "packed_reports", "train_packed"]
