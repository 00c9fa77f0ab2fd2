"""SQLite as every service of the embedded node uses it.

Statements run inline on the event loop: they are indexed single-row reads and writes on a
local WAL database, tens of microseconds each, far less than handing each one to a thread.
Because no `await` falls inside a method of a store, each method is atomic with respect to
every other request of the same process."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from mesh.config import ensure_private_dir


def connect(path: Path, schema: str) -> sqlite3.Connection:
    """Opens (creating) the database at `path`, in an owner-only folder, with `schema`."""
    ensure_private_dir(path.parent)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    # WAL with NORMAL: a commit survives a crash of the process, and costs no fsync.
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA busy_timeout=5000")
    db.executescript(schema)
    return db


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    """Runs the statements inside as one transaction (the connection autocommits otherwise)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
