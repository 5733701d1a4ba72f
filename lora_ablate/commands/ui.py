"""``ui``: the MLflow UI on a study workspace's store, until Ctrl-C or ``kill``."""

from __future__ import annotations

import time
from pathlib import Path

from lora_ablate.commands.study import _sigterm_as_interrupt
from lora_ablate.errors import UserError
from lora_ablate.workspace import DEFAULT_WORKSPACE, artifact_root, mlflow_db, mlflow_uri


def open_ui(workspace: Path = Path(DEFAULT_WORKSPACE), host: str = "127.0.0.1", port: int = 0):
    """Start the MLflow UI on the workspace's store; returns the running server (``.url``, ``.stop()``)."""
    from lora_ablate.ui_server import start_ui

    db = mlflow_db(workspace)
    if not db.is_file():
        raise UserError(f"no MLflow store at {str(db)!r}; run `python -m lora_ablate study` first, "
                        "or pass the study's --workspace DIR")
    return start_ui(mlflow_uri(workspace), artifact_root(workspace), host, port)


def cmd_ui(args) -> int:
    server = open_ui(args.workspace, args.host, args.port)
    print(f"MLflow UI: {server.url}   (Ctrl-C stops it)", flush=True)
    try:
        with _sigterm_as_interrupt():  # `kill` stops the server too, not only Ctrl-C
            while server.process.poll() is None:
                time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


def register(sub) -> None:
    default_ws = Path(DEFAULT_WORKSPACE)
    u = sub.add_parser("ui", help="start the MLflow UI on a study workspace and print its URL")
    u.add_argument("--workspace", type=Path, default=default_ws, help=f"study workspace (default {default_ws})")
    u.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    u.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    u.set_defaults(fn=cmd_ui)
