"""Shared stores from many processes: database URLs as the installed driver needs them, and creating a shared
thing (a schema, a study, an MLflow experiment) when any number of processes may try at the same moment.

Creation is left to the database: every process tries, the unique key lets exactly one win, and the others
retry after a short, jittered backoff and find what the winner made. Imports nothing heavy (``study`` and
``tracking`` both use it; neither may import the other).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import random
import socket
import time
import zlib
from pathlib import Path
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")

ATTEMPTS = 12
# what a lost creation race looks like through SQLAlchemy, the drivers, Optuna, alembic and MLflow; a store
# that is unreachable or misconfigured matches none of these and fails on the first attempt
RACE_MARKS = ("unique constraint", "duplicate key", "already exists", "uniqueviolation", "integrityerror",
              "database is locked", "deadlock detected", "could not serialize", "duplicatedstudyerror",
              "resource_already_exists", "out-of-date database schema")


def lost_race(e: BaseException) -> bool:
    """Whether ``e`` (or what it wraps) is another process having created the same thing first."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = f"{type(e).__name__} {getattr(e, 'error_code', '')} {e}".lower()
        if any(m in text for m in RACE_MARKS):
            return True
        e = e.__cause__ or e.__context__
    return False


def retry_race(fn: Callable[[], T], attempts: int = ATTEMPTS, first_s: float = 0.05) -> T:
    """``fn()``, called again while it loses a creation race (see ``lost_race``); other errors pass at once."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - re-raised unless it is a lost race
            if i == attempts - 1 or not lost_race(e):
                raise
        # jittered, so that the processes that lost together do not collide again together
        time.sleep(first_s * 2 ** min(i, 5) * (0.5 + random.random()))
    raise AssertionError("unreachable")


@contextlib.contextmanager
def creation_lock(url: str) -> Iterator[None]:
    """Held while a store's schema may be created or migrated: MLflow's alembic migrations, run by several
    processes at once, fail in ways no retry repairs (a migration step finding its version row gone). One
    process migrates, the others wait and then find the schema current. SQLite: an flock on the database's
    folder (no extra file); PostgreSQL: a session advisory lock; any other store: retries only."""
    if url.startswith("sqlite:///"):
        import fcntl

        folder = Path(url[len("sqlite:///"):]).parent
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock
        return
    if not url.startswith(("postgresql", "postgres")):
        yield
        return
    import sqlalchemy as sa

    engine = sa.create_engine(db_url(url), poolclass=sa.pool.NullPool)
    key = zlib.crc32(b"lora_ablate schema creation")
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()
    finally:
        engine.dispose()


def postgres_driver() -> str | None:
    """The PostgreSQL driver SQLAlchemy should use for a plain ``postgresql://`` URL: None for its default
    (psycopg2, when installed), else ``psycopg`` (psycopg 3, the ``postgres`` extra)."""
    if importlib.util.find_spec("psycopg2") is not None:
        return None
    if importlib.util.find_spec("psycopg") is not None:
        return "psycopg"
    return None


def db_url(url: str) -> str:
    """``url`` as SQLAlchemy can open it with the installed driver: ``postgresql://`` (and ``postgres://``)
    becomes ``postgresql+psycopg://`` when psycopg 3 is what is installed; any other URL is unchanged."""
    scheme, sep, rest = str(url).partition("://")
    if not sep or scheme not in ("postgresql", "postgres"):
        return url
    driver = postgres_driver()
    return f"postgresql+{driver}://{rest}" if driver else f"postgresql://{rest}"


def missing_driver_hint(url: str) -> str:
    if str(url).startswith(("postgresql", "postgres")):
        return "; install a PostgreSQL driver: pip install 'lora_ablate[postgres]'"
    return ""


def worker_id() -> dict[str, str]:
    """Who this process is among a study's workers: host, pid and the GPUs it sees."""
    return {"host": socket.gethostname(), "pid": str(os.getpid()),
            "gpu": os.environ.get("CUDA_VISIBLE_DEVICES", "")}


def worker_label() -> str:
    w = worker_id()
    return f"{w['host']}-{w['pid']}" + (f"-gpu{w['gpu'].replace(',', '_')}" if w["gpu"] else "")
