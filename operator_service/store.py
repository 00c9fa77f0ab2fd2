"""The job registry: every job, its spec, its latest state and every change of state, in
SQLite (statements inline: see mesh.sqlite)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from c2d.common.v1 import job_pb2
from c2d.engine.v1 import engine_pb2

from mesh import jobs as job_facts
from mesh.sqlite import connect, transaction

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    seq INTEGER NOT NULL,            -- insertion order, for newest-first listing
    state INTEGER NOT NULL,
    spec BLOB NOT NULL,              -- engine.v1.JobSpec
    job BLOB NOT NULL,               -- common.v1.Job, as last seen
    lease_until REAL NOT NULL        -- the engine must be heard from before this (unix time)
);
CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner, seq);
-- Each insert takes MAX(seq) + 1: without this it scans every job (4 ms at 100,000 jobs, on
-- the path of every StartCompute); with it, a lookup.
CREATE INDEX IF NOT EXISTS jobs_by_seq ON jobs (seq);
CREATE TABLE IF NOT EXISTS job_events (
    job_id TEXT NOT NULL,
    time REAL NOT NULL,
    state INTEGER NOT NULL,
    failure_reason INTEGER NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS job_events_by_job ON job_events (job_id);
"""


class JobStore:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    @classmethod
    async def open(cls, path: Path) -> JobStore:
        return cls(connect(path, _SCHEMA))

    async def close(self) -> None:
        self.db.close()

    async def insert(self, spec: engine_pb2.JobSpec, job: job_pb2.Job, lease_until: float) -> bool:
        """Adds a job; False when its id exists already (a retried create)."""
        with transaction(self.db):
            added = self.db.execute(
                "INSERT OR IGNORE INTO jobs (id, owner, seq, state, spec, job, lease_until) "
                "VALUES (?, ?, COALESCE((SELECT MAX(seq) FROM jobs), 0) + 1, ?, ?, ?, ?)",
                (
                    spec.job_id,
                    spec.owner,
                    job.state,
                    spec.SerializeToString(),
                    job.SerializeToString(),
                    lease_until,
                ),
            ).rowcount
            if added:
                self._event(job)
        return bool(added)

    async def save(self, job: job_pb2.Job, lease_until: float | None = None) -> None:
        """Records the job's latest form (renewing its lease when given), and an event when
        its state changed."""
        job_id = job.name.removeprefix("jobs/")
        with transaction(self.db):
            row = self.db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return
            self.db.execute(
                "UPDATE jobs SET state = ?, job = ?, lease_until = COALESCE(?, lease_until) "
                "WHERE id = ?",
                (job.state, job.SerializeToString(), lease_until, job_id),
            )
            if row[0] != job.state:
                self._event(job)

    def _event(self, job: job_pb2.Job) -> None:
        self.db.execute(
            "INSERT INTO job_events (job_id, time, state, failure_reason, message) "
            "VALUES (?, ?, ?, ?, ?)",
            (
                job.name.removeprefix("jobs/"),
                time.time(),
                job.state,
                job.failure_reason,
                job.message,
            ),
        )

    async def lease_until(self, job_id: str) -> float:
        row = self.db.execute("SELECT lease_until FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return 0.0 if row is None else float(row[0])

    async def job(self, job_id: str) -> job_pb2.Job | None:
        """The job's latest form, without its spec (which holds the algorithm's code, up to
        16 MiB: most callers need only the job)."""
        row = self.db.execute("SELECT job FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else job_pb2.Job.FromString(row[0])

    async def get(self, job_id: str) -> tuple[engine_pb2.JobSpec, job_pb2.Job] | None:
        row = self.db.execute("SELECT spec, job FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            return None
        return engine_pb2.JobSpec.FromString(row[0]), job_pb2.Job.FromString(row[1])

    async def page(
        self, owner: str, limit: int, before_seq: int | None
    ) -> list[tuple[int, job_pb2.Job]]:
        query = "SELECT seq, job FROM jobs WHERE owner = ?"
        args: list[object] = [owner]
        if before_seq is not None:
            query += " AND seq < ?"
            args.append(before_seq)
        query += " ORDER BY seq DESC LIMIT ?"
        args.append(limit)
        rows = self.db.execute(query, args).fetchall()
        return [(int(r[0]), job_pb2.Job.FromString(r[1])) for r in rows]

    async def unfinished(self) -> list[str]:
        finals = tuple(int(s) for s in job_facts.FINAL_STATES)
        marks = ",".join("?" * len(finals))
        rows = self.db.execute(
            f"SELECT id FROM jobs WHERE state NOT IN ({marks})",  # noqa: S608 (only "?" marks)
            finals,
        ).fetchall()
        return [str(r[0]) for r in rows]

    async def events(self, job_id: str) -> list[tuple[float, int, int, str]]:
        rows = self.db.execute(
            "SELECT time, state, failure_reason, message FROM job_events WHERE job_id = ? "
            "ORDER BY rowid",
            (job_id,),
        ).fetchall()
        return [(float(r[0]), int(r[1]), int(r[2]), str(r[3])) for r in rows]

    async def delete(self, job_id: str) -> None:
        with transaction(self.db):
            self.db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
            self.db.execute("DELETE FROM job_events WHERE job_id = ?", (job_id,))
