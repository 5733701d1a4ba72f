"""``python -m lora_ablate <command>``: argument parsing only; each command is one typed function."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from lora_ablate.errors import UserError
from lora_ablate.workspace import redact


def _experiment(args):
    from lora_ablate.config import load_experiment

    return load_experiment(args.config, args.overrides)


def cmd_train(args) -> int:
    from lora_ablate.commands.train import train

    train(_experiment(args), out=args.out, merge=args.merge, progress=not args.quiet)
    return 0


def cmd_eval(args) -> int:
    from lora_ablate.commands.eval_adapter import evaluate_adapter

    evaluate_adapter(args.adapter, args.config, args.overrides, args.out)
    return 0


def cmd_config(args) -> int:
    import yaml

    from lora_ablate.config import describe, to_plain

    if args.config or args.overrides:
        print(yaml.safe_dump(to_plain(_experiment(args)), sort_keys=False), end="")
        return 0
    for key, default, doc in describe():
        print(f"{key:<32} {str(default):<28} {doc}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse's errors in the project's form: one ``error:`` line and status 2 (its usage block is what
    ``--help`` is for)."""

    def error(self, message: str):
        command = self.prog.removeprefix("python -m lora_ablate").strip()
        hint = f"python -m lora_ablate {command} --help".replace("  ", " ")
        self.exit(2, f"error: {UserError(message)} (see {hint})\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m lora_ablate", description="LoRA ablation studies you can trust.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(sp):
        sp.add_argument("--config", type=Path, help="experiment YAML (sections model, data, lora, train, eval, ...)")
        sp.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. lora.r=16 lora.targets=[q,v]")

    t = sub.add_parser("train", help="train and evaluate one LoRA adapter into a run folder")
    with_config(t)
    t.add_argument("--out", type=Path, help="run folder to create (default runs/train-<time>)")
    t.add_argument("--merge", action="store_true", help="also save the base with the adapter merged in")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="evaluate a saved adapter (or run folder) on held-out sets")
    e.add_argument("--adapter", type=Path, required=True, help="adapter folder or run folder")
    with_config(e)
    e.add_argument("--out", type=Path, help="write metrics and per-example scores to this JSON file")
    e.set_defaults(fn=cmd_eval)

    c = sub.add_parser("config", help="list every config field with its default and doc, or print a resolved config")
    with_config(c)
    c.set_defaults(fn=cmd_config)

    for register in _extra_commands():
        register(sub)
    return p


def _extra_commands():
    """Commands that live in their own modules register their sub-parsers here."""
    from lora_ablate.commands import registry

    return registry()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # packs allocate large, varying logits tensors; without this the CUDA cache fragments
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # keep the terminal (and one-line errors) free of import-time noise from dependencies
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except UserError as e:
        # messages quote the user's values, and a store URL may carry a password
        print(f"error: {redact(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `... | head`: the reader left; no traceback
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not fail again
        return 141
