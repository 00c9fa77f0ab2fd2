"""The audit log: every decision the Provider takes, appended in order, for the node's owners.

(First step: entries are appended; their chaining, listing and export come next.)"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    sequence INTEGER PRIMARY KEY,
    time REAL NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL, resource TEXT NOT NULL,
    allowed INTEGER NOT NULL, reason TEXT NOT NULL, details TEXT NOT NULL
);
"""


class AuditLog:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        db.executescript(_SCHEMA)

    async def record(
        self,
        actor: str,
        action: str,
        resource: str,
        *,
        allowed: bool,
        reason: str = "",
        details: dict[str, Any] | None = None,
    ) -> None:
        """Appends one decision. `details` must be JSON-able and never hold a dataset's
        location or an algorithm's code."""
        self.db.execute(
            "INSERT INTO audit (time, actor, action, resource, allowed, reason, details) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (time.time(), actor, action, resource, int(allowed), reason, json.dumps(details or {})),
        )
