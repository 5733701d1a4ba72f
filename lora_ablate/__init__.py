"""lora_ablate: LoRA ablation studies you can trust (seeds, matched budgets, confidence intervals)."""

__version__ = "0.1.0"
