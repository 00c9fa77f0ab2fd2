"""Provenance records: what ran on what, under which policy, and what it produced, signed by the
provider's key.

(First step: the facts known when a job starts are kept; the signed record comes next.)"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS job_facts (
    job TEXT PRIMARY KEY,            -- jobs/{job}
    facts TEXT NOT NULL              -- JSON: what the Provider decided at StartCompute
);
"""


class ProvenanceBook:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        db.executescript(_SCHEMA)

    async def job_started(self, job: str, facts: dict[str, Any]) -> None:
        """Keeps what the Provider decided when it started `job` (see the facts' layout in
        StartCompute)."""
        self.db.execute(
            "INSERT OR REPLACE INTO job_facts (job, facts) VALUES (?, ?)",
            (job, json.dumps(facts, sort_keys=True)),
        )
