"""One module per CLI command; each exposes one typed function that the CLI calls.

Modules that add sub-commands (study, results, ...) list a ``register(subparsers)`` function in
``REGISTERED`` so that ``cli.py`` stays a thin parser.
"""

import importlib

REGISTERED: tuple[str, ...] = ("results", "study", "ui", "worker")


def registry():
    return [importlib.import_module(f"lora_ablate.commands.{name}").register for name in REGISTERED]
