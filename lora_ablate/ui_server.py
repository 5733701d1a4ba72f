"""The ``ui`` command's ``mlflow server``: started on a workspace's store, answered on ``/health``, stopped
with its workers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from lora_ablate.errors import UserError


@dataclass
class UiServer:
    """A running ``mlflow server`` (its own process group, so its uvicorn workers stop with it)."""

    url: str
    process: subprocess.Popen
    log: Path

    def stop(self, timeout: float = 15.0, keep_log: bool = False) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if not keep_log:
            self.log.unlink(missing_ok=True)

    def __enter__(self) -> "UiServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_ui(backend_uri: str, artifacts: Path | None = None, host: str = "127.0.0.1", port: int = 0,
             timeout: float = 90.0) -> UiServer:
    """Start the MLflow UI on ``backend_uri`` and return once it answers (``/health``)."""
    port = port or free_port(host)
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
           "--host", host, "--port", str(port), "--workers", "1"]
    if artifacts is not None:
        cmd += ["--default-artifact-root", artifacts.as_uri()]
    # The job runner (GenAI background jobs) starts half a dozen worker processes a study never needs.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = Path(tempfile.mkstemp(prefix="lora_ablate_ui_", suffix=".log")[1])
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = UiServer(f"http://{host}:{port}", proc, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text().strip().splitlines()[-1:] or ["no output"]
            raise UserError(f"mlflow server exited with status {proc.returncode}: {tail[0]} (log: {log})")
        try:
            with urllib.request.urlopen(f"{server.url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return server
        except OSError:
            pass
        time.sleep(0.5)
    server.stop(keep_log=True)
    raise UserError(f"mlflow server did not answer on {server.url} within {timeout:.0f} s (log: {log})")
