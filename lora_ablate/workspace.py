"""The workspace: the folder of a study's embedded stores (``optuna.db``, ``mlflow.db``, ``artifacts/``),
the store URLs that default to it, and how a URL is shown.

Study, tracking, export and the commands all find the stores through here, so the layout is written once.
Imports nothing heavy (``status`` and ``export`` run without torch or MLflow loaded up front).
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from lora_ablate.errors import UserError

DEFAULT_WORKSPACE = "lora_ablate_runs"
OPTUNA_DB = "optuna.db"
MLFLOW_DB = "mlflow.db"
ARTIFACTS = "artifacts"
# tracking stores that keep artifacts where they choose, not in the workspace
REMOTE_SCHEMES = ("http", "https", "databricks")
# what MLflow 3 accepts for a tracking store (a scheme may carry a driver: postgresql+psycopg2)
TRACKING_SCHEMES = ("file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks",
                    "databricks-uc", "uc")
# the SQLAlchemy dialects Optuna's RDBStorage can use
STORAGE_SCHEMES = ("sqlite", "postgresql", "mysql", "mariadb", "oracle", "mssql")
# pseudo file systems: a study or run folder there gets as far as loading the model, then fails to write
SYSTEM_DIRS = ("/proc", "/sys", "/dev")
PROBE_TIMEOUT_S = 5.0


def redact(url: str) -> str:
    """``postgresql://user:secret@host/db`` -> ``postgresql://user:***@host/db``: URLs end up in tags,
    errors and shared reports."""
    url = re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", str(url))
    # sqlite and other drivers also take credentials as query parameters (?password=..., &token=...)
    return re.sub(r"([?&]\w*(?:pass|pwd|secret|token|key|auth)\w*=)[^&#\s'\"]*", r"\1***", url,
                  flags=re.IGNORECASE)


def scheme_of(url: str) -> str:
    """``postgresql+psycopg2://...`` -> ``postgresql``; ``databricks`` -> ``databricks``."""
    return str(url).split(":", 1)[0].split("+", 1)[0].lower()


def check_url(url: str, where: str, valid: tuple[str, ...]) -> None:
    """A store URL whose scheme the library behind it knows; otherwise a UserError before anything opens it."""
    if url and scheme_of(url) not in valid:
        raise UserError(f"{where}={redact(url)!r} has an unknown scheme {scheme_of(url)!r}; choose one of: "
                        f"{', '.join(valid)}")


def check_answers(uri: str, where: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """A tracking server that does not answer fails here in seconds: MLflow itself retries a dead server for
    minutes, then raises a traceback that holds the URI with its password."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    try:
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        socket.create_connection((parsed.hostname or "", port), timeout=timeout).close()
    except ValueError as e:  # a port that is not a number
        raise UserError(f"{where}={redact(uri)!r} is not a valid URL: {e}") from None
    except OSError as e:
        raise UserError(f"{where}={redact(uri)!r}: the tracking server does not answer "
                        f"({e.strerror or type(e).__name__})") from None


def check_writable(path: str | Path, where: str) -> None:
    """``path`` is, or can be created as, a folder this process writes into: checked before the model loads,
    so a bad folder fails in a second with one line instead of after the work."""
    shown = str(path)
    full = Path(path).expanduser().resolve()
    for system in SYSTEM_DIRS:
        if full == Path(system) or Path(system) in full.parents:
            raise UserError(f"{where}={shown!r} is under {system}, a system folder; choose a folder of your own")
    existing = next(p for p in (full, *full.parents) if p.exists())
    if not existing.is_dir():
        inside = "" if existing == full else f" inside {str(existing)!r}"
        raise UserError(f"{where}={shown!r} is{inside} a file, not a folder; choose a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{where}={shown!r} is not writable (no write permission on {str(existing)!r})")


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
        return Path(uri[len("sqlite:///"):].split("?", 1)[0])
    if uri.startswith("file:"):
        return Path(urlparse(uri).path)
    if "://" not in uri and not uri.startswith("databricks"):
        return Path(uri)
    return None


def existing_tracking_uri(workspace: str | Path | None = None, tracking_uri: str | None = None) -> str:
    """The store to read: ``tracking_uri`` if given, else the workspace's. A local store that does not exist
    is an error here, because MLflow would silently create an empty one."""
    uri = tracking_uri or mlflow_uri(workspace or DEFAULT_WORKSPACE)
    check_url(uri, "--tracking-uri", TRACKING_SCHEMES)
    check_answers(uri, "--tracking-uri")
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
        if not con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'experiments'").fetchone():
            return 0  # a store whose schema MLflow has not created yet holds nothing to move
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
