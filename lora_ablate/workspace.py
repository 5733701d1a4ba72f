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
