"""The workspace: the folder of a study's embedded stores (``optuna.db``, ``mlflow.db``, ``artifacts/``),
the store URLs that default to it, and how a URL is shown.

Study, tracking, export and the commands all find the stores through here, so the layout is written once.
Imports nothing heavy (``status`` and ``export`` run without torch or MLflow loaded up front).
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlparse

from lora_ablate.errors import UserError

DEFAULT_WORKSPACE = "lora_ablate_runs"
OPTUNA_DB = "optuna.db"
MLFLOW_DB = "mlflow.db"
ARTIFACTS = "artifacts"
# tracking stores that keep artifacts where they choose, not in the workspace
REMOTE_SCHEMES = ("http", "https", "databricks")


def redact(url: str) -> str:
    """``postgresql://user:secret@host/db`` -> ``postgresql://user:***@host/db``: URLs end up in tags,
    errors and shared reports."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", str(url))


def optuna_db(workspace: str | Path) -> Path:
    return Path(workspace).resolve() / OPTUNA_DB


def mlflow_db(workspace: str | Path) -> Path:
    return Path(workspace).resolve() / MLFLOW_DB


def optuna_url(workspace: str | Path) -> str:
    """The Optuna storage of a workspace."""
    return f"sqlite:///{optuna_db(workspace)}"


def mlflow_uri(workspace: str | Path) -> str:
    """The MLflow tracking store of a workspace."""
    return f"sqlite:///{mlflow_db(workspace)}"


def artifact_root(workspace: str | Path, tracking_uri: str = "") -> Path | None:
    """Where artifacts go when the store is a database or a folder: the workspace's ``artifacts/``
    (MLflow's own default for a database store is ``./mlruns`` in whatever the current directory is). A
    tracking server (``http(s)://``, ``databricks``) decides for itself."""
    if tracking_uri and tracking_uri.split(":", 1)[0] in REMOTE_SCHEMES:
        return None
    return Path(workspace).resolve() / ARTIFACTS


def local_path(uri: str) -> Path | None:
    """The file or folder of a local store URI (``sqlite:///x.db``, ``file:``, a bare path); None for a server."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):])
    if uri.startswith("file:"):
        return Path(urlparse(uri).path)
    if "://" not in uri:
        return Path(uri)
    return None


def existing_tracking_uri(workspace: str | Path | None = None, tracking_uri: str | None = None) -> str:
    """The store to read: ``tracking_uri`` if given, else the workspace's. A local store that does not exist
    is an error here, because MLflow would silently create an empty one."""
    uri = tracking_uri or mlflow_uri(workspace or DEFAULT_WORKSPACE)
    local = local_path(uri)
    if local is not None and not local.exists():
        raise UserError(f"no MLflow store at {str(local)!r}; pass the study's --workspace or --tracking-uri")
    return uri


def relocate(db: Path, root: Path) -> int:
    """Re-point the artifact locations of a workspace's MLflow store at ``root`` (its ``artifacts/``) when
    the workspace was copied or moved; returns how many experiments were re-pointed.

    MLflow keeps an absolute location per experiment and per run, so a copied workspace would read and write
    the original's artifacts. Only locations laid out as this module lays them out (``<ws>/artifacts/<exp>``)
    move; an experiment that put its artifacts elsewhere on purpose keeps them there. Writes only when
    something moved, so a read-only store that did not move still opens."""
    import sqlite3

    if not db.exists():
        return 0
    new_root = root.resolve().as_uri()
    con = sqlite3.connect(db, timeout=60)
    try:
        moved = []
        for exp_id, location in con.execute("SELECT experiment_id, artifact_location FROM experiments"):
            head, _, leaf = str(location or "").rstrip("/").rpartition("/")
            if head.startswith("file:") and head.endswith("/" + ARTIFACTS) and head != new_root:
                moved.append((exp_id, f"{head}/{leaf}", f"{new_root}/{leaf}"))
        with con:
            for exp_id, old, new in moved:
                con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?", (new, exp_id))
                con.execute("UPDATE runs SET artifact_uri = ? || substr(artifact_uri, ?) WHERE experiment_id = ? "
                            "AND substr(artifact_uri, 1, ?) = ?", (new, len(old) + 1, exp_id, len(old), old))
        return len(moved)
    finally:
        con.close()
