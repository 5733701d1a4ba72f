"""A throwaway PostgreSQL server on this machine, its data in a temporary folder, for the scale-out tests and
benchmarks (one place, imported by tests/test_scale_out.py and benchmarks/scale_out_*.py).

Two ways to get one, tried in this order:

- the distribution's server binaries (Debian: ``apt-get install -y postgresql``; ``initdb`` on PATH or under
  ``/usr/lib/postgresql/<version>/bin``), listening on a free loopback port; as root the package's
  ``postgres`` user runs it (the server refuses root);
- the ``pgserver`` wheel (``pip install pgserver``: the server binaries inside a wheel, for hosts without
  the package or apt), which listens on a Unix socket only and handles root itself (its own system user).

Either way ``server.new_db(prefix)`` creates an empty database and returns its URL.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator


class PostgresUnavailable(RuntimeError):
    """Neither the server binaries nor the pgserver wheel are here (tests skip on it)."""


@dataclass
class LocalPostgres:
    kind: str  # "debian" (distribution binaries) or "pgserver" (the wheel)
    admin_url: str  # the server's "postgres" database, where databases are created
    version: str
    root: str
    _url_of: Callable[[str], str] = field(repr=False)
    _names: Iterator[int] = field(default_factory=lambda: iter(range(10**6)), repr=False)

    def new_db(self, prefix: str = "db") -> str:
        """A new, empty database; its URL (``postgresql://``, the driver lora_ablate installs)."""
        import sqlalchemy as sa

        from lora_ablate.stores import db_url

        name = f"{prefix}{next(self._names)}"
        engine = sa.create_engine(db_url(self.admin_url), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        finally:
            engine.dispose()
        return self._url_of(name)


def server_binary(name: str) -> str | None:
    return shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))[::-1]), None)


@contextmanager
def local_postgres(fsync: bool = True, max_connections: int = 200, prefer: str = "auto") -> Iterator[LocalPostgres]:
    """A running server for the ``with`` block, stopped and its folder removed afterwards. ``fsync=False``
    (tests) trades crash safety for speed; ``prefer``: auto, debian or pgserver."""
    initdb, pg_ctl = server_binary("initdb"), server_binary("pg_ctl")
    if prefer in ("auto", "debian") and initdb and pg_ctl:
        with _debian(initdb, pg_ctl, fsync, max_connections) as server:
            yield server
        return
    if prefer == "debian":
        raise PostgresUnavailable("PostgreSQL server binaries (initdb, pg_ctl) not found: "
                                  "apt-get install -y postgresql")
    with _pgserver(fsync) as server:
        yield server


@contextmanager
def _debian(initdb: str, pg_ctl: str, fsync: bool, max_connections: int) -> Iterator[LocalPostgres]:
    root = tempfile.mkdtemp(prefix="lora_ablate_pg_")
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root: its package's user runs it
        if shutil.which("runuser") is None or subprocess.run(["id", "postgres"], capture_output=True).returncode:
            shutil.rmtree(root, ignore_errors=True)
            raise PostgresUnavailable("running as root without a 'postgres' user to run the PostgreSQL server")
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = f"{root}/data"
    options = f"-h 127.0.0.1 -p {port} -k {root} -c max_connections={max_connections}"
    options += "" if fsync else " -c fsync=off"
    try:
        subprocess.run([*as_user, initdb, "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8"], check=True,
                       capture_output=True)
        subprocess.run([*as_user, pg_ctl, "-D", data, "-l", f"{root}/log", "-w", "-o", options, "start"],
                       check=True, capture_output=True)
        version = subprocess.run([pg_ctl, "--version"], capture_output=True, text=True).stdout.strip()
        url = f"postgresql://postgres@127.0.0.1:{port}/"
        yield LocalPostgres("debian", url + "postgres", version, root, lambda name: url + name)
    finally:  # also when the server failed to start: nothing is left behind
        subprocess.run([*as_user, pg_ctl, "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def _pgserver(fsync: bool) -> Iterator[LocalPostgres]:
    try:
        import pgserver
    except ImportError:
        raise PostgresUnavailable("no PostgreSQL server: apt-get install -y postgresql, or pip install pgserver") \
            from None
    root = tempfile.mkdtemp(prefix="lora_ablate_pgserver_")
    os.chmod(root, 0o755)  # as root, pgserver's own system user must reach the data folder inside
    srv = None
    try:
        srv = pgserver.get_server(f"{root}/data", cleanup_mode="stop")
        # the wheel starts its server with the stock settings (max_connections 100: enough for a few
        # workers; raising it needs a restart behind the wheel's back); fsync applies on a reload
        if not fsync:
            srv.psql("ALTER SYSTEM SET fsync = off; SELECT pg_reload_conf();")
        version = srv.psql("SHOW server_version;").split("\n")[2].strip()
        uri = srv.get_uri()  # postgresql://postgres:@/postgres?host=<socket dir>
        head, query = uri.split("?", 1)
        base = head.rsplit("/", 1)[0]
        yield LocalPostgres("pgserver", uri, f"PostgreSQL {version} (pgserver wheel)", root,
                            lambda name: f"{base}/{name}?{query}")
    finally:
        if srv is not None:
            srv.cleanup()
        shutil.rmtree(root, ignore_errors=True)
