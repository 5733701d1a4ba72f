"""One module per CLI command; each exposes one typed function that the CLI calls.

Modules that add sub-commands (study, export, ...) list a ``register(subparsers)`` function in
``REGISTERED`` so that ``cli.py`` stays a thin parser.
"""

import importlib

REGISTERED: tuple[str, ...] = ("export", "study")


def registry():
    return [importlib.import_module(f"lora_ablate.commands.{name}").register for name in REGISTERED]
