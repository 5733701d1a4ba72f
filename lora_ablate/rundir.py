"""Self-describing run folders, written atomically: everything goes to a hidden sibling first and is renamed
into place only when the run succeeded, so a failed run leaves nothing half-written.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import uuid
from importlib import metadata
from pathlib import Path

import yaml

from lora_ablate.errors import UserError
from lora_ablate.workspace import check_writable, redact

PACKAGES = ("lora_ablate", "torch", "transformers", "peft", "accelerate", "datasets", "evaluate", "optuna",
            "mlflow", "bitsandbytes", "gguf", "tokenizers", "numpy")


def git_sha() -> str:
    """The project's commit, with ``-dirty`` when the working tree has uncommitted changes; '' outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not sha:
            return ""
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def environment() -> dict:
    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "packages": versions,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "git_sha": git_sha(),
        "argv": [redact(a) for a in sys.argv],  # a store URL on the command line may hold a password
    }


def check_free(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output folder {str(out)!r} already exists and is not empty; choose another --out")
    check_writable(out, "--out")


class RunDir:
    """``with RunDir(out) as d: (d.path / "x").write_text(...)`` -> ``out`` exists only if the block succeeded."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        check_free(self.out)
        self.path = self.out.parent / f".{self.out.name}.partial-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> "RunDir":
        # parents this run creates (deepest first): a failed run removes them again if still empty
        self._made = [p for p in (self.out.parent, *self.out.parent.parents) if not p.exists()]
        self.path.mkdir(parents=True)
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            for parent in self._made:
                try:
                    parent.rmdir()
                except OSError:
                    break
            return False
        if self.out.exists():
            self.out.rmdir()  # empty, checked above
        self.path.rename(self.out)
        return False

    def json(self, name: str, obj) -> None:
        (self.path / name).write_text(json.dumps(obj, indent=2, default=str) + "\n")

    def yaml(self, name: str, obj) -> None:
        (self.path / name).write_text(yaml.safe_dump(obj, sort_keys=False))

    def jsonl(self, name: str, rows) -> None:
        with open(self.path / name, "w") as f:
            for row in rows:
                f.write(json.dumps(row, default=str) + "\n")
