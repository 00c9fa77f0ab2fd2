"""The job registry: every job, its spec, its latest state, every change of state and who may
read it, in SQLite (statements inline: see mesh.sqlite).

A job may be read by its owner and by its viewers (addresses compare case-insensitively; each is
kept in its EIP-55 form for display), and only its owner may stop or delete it: `may_read` and
`owns` decide, from the job as stored (its `viewers` are the spec's, from its creation on: the
engine copies them into every form of the job it reports).

The schema grows by statements that leave an existing database as it was (IF NOT EXISTS) and by
numbered migrations (`PRAGMA user_version`), so that a registry written by an earlier version
still opens."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from c2d.common.v1 import job_pb2
from c2d.engine.v1 import engine_pb2

from mesh import delivery as delivery_rules
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
-- Who may read each job: its owner (position 0) and its viewers (1, 2, ... in the spec's
-- order). Listing reads one range of (reader, seq), newest first, whatever the reader's role.
CREATE TABLE IF NOT EXISTS job_readers (
    reader TEXT NOT NULL,            -- the address, lowercase
    seq INTEGER NOT NULL,            -- the job's seq
    job_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    address TEXT NOT NULL,           -- as given (EIP-55)
    PRIMARY KEY (reader, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS job_readers_by_job ON job_readers (job_id);
"""

# Each migration brings a registry from the version before it (its index) to the next.
_MIGRATIONS = (
    # 1: readers. The owners of the jobs made before are their only readers; listing no longer
    # uses the owners' index.
    (
        "INSERT OR IGNORE INTO job_readers (reader, seq, job_id, position, address) "
        "SELECT lower(owner), seq, id, 0, owner FROM jobs",
        "DROP INDEX IF EXISTS jobs_by_owner",
    ),
    # 2: retention. `results_due`: when the retention sweeper is next to act on a final job's
    # results (operator_service.retention); NULL when nothing is due: the job is not final, its
    # results are kept until it is deleted, or they are deleted already. A partial index, so
    # that each sweep reads only the jobs that are due, never every job.
    (
        "ALTER TABLE jobs ADD COLUMN results_due REAL",
        "CREATE INDEX IF NOT EXISTS jobs_by_results_due ON jobs (results_due, id) "
        "WHERE results_due IS NOT NULL",
    ),
)


def _migrate(db: sqlite3.Connection) -> None:
    with transaction(db):
        (version,) = db.execute("PRAGMA user_version").fetchone()
        for statements in _MIGRATIONS[version:]:
            for statement in statements:
                db.execute(statement)
        if version < len(_MIGRATIONS):
            db.execute(f"PRAGMA user_version = {len(_MIGRATIONS)}")


def owns(job: job_pb2.Job, address: str) -> bool:
    """Whether `address` owns the job (case-insensitively)."""
    return bool(address) and job.owner.lower() == address.lower()


def may_read(job: job_pb2.Job, address: str) -> bool:
    """Whether `address` owns or views the job (case-insensitively)."""
    lowered = address.lower()
    return owns(job, address) or any(v.lower() == lowered for v in job.viewers)


class JobStore:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    @classmethod
    async def open(cls, path: Path) -> JobStore:
        db = connect(path, _SCHEMA)
        try:
            _migrate(db)
        except BaseException:
            db.close()
            raise
        return cls(db)

    async def close(self) -> None:
        self.db.close()

    async def insert(self, spec: engine_pb2.JobSpec, job: job_pb2.Job, lease_until: float) -> bool:
        """Adds a job, with its owner and viewers as its readers; False when its id exists
        already (a retried create). The spec is kept without its delivery's secrets (keys,
        upload URLs), which never reach the disk: a job handed to the engine again from here
        has none, and its delivery fails, saying so."""
        kept = delivery_rules.stored_spec(spec)
        with transaction(self.db):
            # All rows fetched: the statement is done before the commit.
            rows = self.db.execute(
                "INSERT OR IGNORE INTO jobs (id, owner, seq, state, spec, job, lease_until) "
                "VALUES (?, ?, COALESCE((SELECT MAX(seq) FROM jobs), 0) + 1, ?, ?, ?, ?) "
                "RETURNING seq",
                (
                    spec.job_id,
                    spec.owner,
                    job.state,
                    kept.SerializeToString(),
                    job.SerializeToString(),
                    lease_until,
                ),
            ).fetchall()
            if rows:
                seq = int(rows[0][0])
                self.db.executemany(
                    "INSERT OR IGNORE INTO job_readers (reader, seq, job_id, position, address) "
                    "VALUES (?, ?, ?, ?, ?)",
                    [
                        (address.lower(), seq, spec.job_id, position, address)
                        for position, address in enumerate([spec.owner, *spec.viewers])
                    ],
                )
                self._event(job)
        return bool(rows)

    async def save(
        self,
        job: job_pb2.Job,
        lease_until: float | None = None,
        *,
        results_due: float | None = None,
    ) -> None:
        """Records the job's latest form (renewing its lease when given), when its results are
        next due for the retention sweeper (None: never), and an event when its state
        changed."""
        job_id = job.name.removeprefix("jobs/")
        with transaction(self.db):
            row = self.db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return
            self.db.execute(
                "UPDATE jobs SET state = ?, job = ?, lease_until = COALESCE(?, lease_until), "
                "results_due = ? WHERE id = ?",
                (job.state, job.SerializeToString(), lease_until, results_due, job_id),
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
        self, reader: str, limit: int, before_seq: int | None
    ) -> list[tuple[int, job_pb2.Job]]:
        """The jobs `reader` owns or views, newest first, from before `before_seq`."""
        query = (
            "SELECT r.seq, j.job FROM job_readers r JOIN jobs j ON j.id = r.job_id "
            "WHERE r.reader = ?"
        )
        args: list[object] = [reader.lower()]
        if before_seq is not None:
            query += " AND r.seq < ?"
            args.append(before_seq)
        query += " ORDER BY r.seq DESC LIMIT ?"
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

    async def due(
        self, now: float, limit: int, after: tuple[float, str] | None = None
    ) -> list[tuple[float, str]]:
        """Up to `limit` jobs whose results are due by `now`, as (due, job id), soonest first,
        from after `after` (the last pair of the previous page)."""
        if after is None:
            after = (float("-inf"), "")
        rows = self.db.execute(
            "SELECT results_due, id FROM jobs WHERE results_due <= ? AND (results_due, id) > "
            "(?, ?) ORDER BY results_due, id LIMIT ?",
            (now, after[0], after[1], limit),
        ).fetchall()
        return [(float(r[0]), str(r[1])) for r in rows]

    async def set_expiry(self, job_id: str, expire_ns: int | None) -> None:
        """Sets when the job's results expire (`results_expire_time`, nanoseconds since the
        epoch), due then; None: kept until the job is deleted, due never."""
        with transaction(self.db):
            row = self.db.execute("SELECT job FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return
            job = job_pb2.Job.FromString(row[0])
            if expire_ns is None:
                job.ClearField("results_expire_time")
            else:
                job.results_expire_time.FromNanoseconds(expire_ns)
            self.db.execute(
                "UPDATE jobs SET job = ?, results_due = ? WHERE id = ?",
                (
                    job.SerializeToString(),
                    None if expire_ns is None else expire_ns / 1e9,
                    job_id,
                ),
            )

    async def mark_expired(self, job_id: str) -> job_pb2.Job | None:
        """Records that the job's results are deleted: `results_expired`, due never again.
        The job as it is now; None when it is gone."""
        with transaction(self.db):
            row = self.db.execute("SELECT job FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            job = job_pb2.Job.FromString(row[0])
            job.results_expired = True
            self.db.execute(
                "UPDATE jobs SET job = ?, results_due = NULL WHERE id = ?",
                (job.SerializeToString(), job_id),
            )
        return job

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
            self.db.execute("DELETE FROM job_readers WHERE job_id = ?", (job_id,))
