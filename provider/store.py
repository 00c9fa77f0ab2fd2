"""The Provider's state in SQLite: the asset registry with every version of each dataset's
policy, nonces, auth tokens and the request ids that make creates idempotent."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path

from c2d.provider.v1 import provider_pb2

from mesh.errors import FailedPrecondition, NotFound, Unauthenticated
from mesh.sqlite import connect, transaction
from provider.policy import PolicyVersionMismatch
from provider.sources import FileSource

_SCHEMA = """
CREATE TABLE IF NOT EXISTS nonces (address TEXT PRIMARY KEY, nonce INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (
    token_hash TEXT PRIMARY KEY, address TEXT NOT NULL, expire_time REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS datasets (
    id TEXT PRIMARY KEY, seq INTEGER NOT NULL,
    record BLOB NOT NULL,            -- provider.v1.Dataset, the public part, current policy
    sample_of TEXT,                  -- the id of the dataset this one is the sample of
    -- JSON list of provider.sources.FileSource: where the files are (paths, S3 or HTTP URLs,
    -- credential names, keys in the results storage). Never leaves the node's internal hops.
    files TEXT NOT NULL
);
-- Every version of every dataset's policy, so that a job's provenance names the exact one.
CREATE TABLE IF NOT EXISTS dataset_policies (
    dataset TEXT NOT NULL, version INTEGER NOT NULL,
    policy BLOB NOT NULL,            -- provider.v1.ComputePolicy
    PRIMARY KEY (dataset, version)
);
CREATE TABLE IF NOT EXISTS algorithms (
    id TEXT PRIMARY KEY, seq INTEGER NOT NULL,
    record BLOB NOT NULL,            -- provider.v1.Algorithm
    code BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS requests (
    address TEXT NOT NULL, request_id TEXT NOT NULL, resource TEXT NOT NULL,
    PRIMARY KEY (address, request_id)
);
"""

# After _upgrade, since a database from before samples gets their column there.
_INDEXES = """
-- Each insert takes MAX(seq) + 1: an index makes that a lookup rather than a scan.
CREATE INDEX IF NOT EXISTS datasets_by_seq ON datasets (seq);
CREATE INDEX IF NOT EXISTS algorithms_by_seq ON algorithms (seq);
-- A dataset has one sample at most; NULLs (no sample) do not collide.
CREATE UNIQUE INDEX IF NOT EXISTS datasets_by_sample_of ON datasets (sample_of);
"""

# A dataset's record with the sample it has, which is read beside it rather than stored in it.
_RECORD_COLUMNS = "d.record, (SELECT s.id FROM datasets s WHERE s.sample_of = d.id)"


def _upgrade(db: sqlite3.Connection) -> None:
    """Brings a database from an earlier version up to date, one step after the other."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(datasets)")}
    if "sample_of" not in columns:
        _add_versions_and_samples(db)
    if "files" not in columns:
        _add_file_sources(db)


def _add_file_sources(db: sqlite3.Connection) -> None:
    """From before remote files, a dataset's files were local paths only (`file_paths`, a JSON
    list): each becomes a local source with the size and sha256 its record shows."""
    with transaction(db):
        db.execute("ALTER TABLE datasets ADD COLUMN files TEXT")
        rows = db.execute("SELECT id, record, file_paths FROM datasets").fetchall()
        for dataset_id, record, file_paths in rows:
            public = provider_pb2.Dataset.FromString(record).files
            sources = [
                FileSource(
                    "path",
                    path,
                    size=public[i].size_bytes if i < len(public) else 0,
                    sha256=public[i].sha256 if i < len(public) else "",
                )
                for i, path in enumerate(json.loads(file_paths))
            ]
            db.execute(
                "UPDATE datasets SET files = ? WHERE id = ?", (_files_json(sources), dataset_id)
            )
        db.execute("ALTER TABLE datasets DROP COLUMN file_paths")


def _files_json(sources: list[FileSource]) -> str:
    return json.dumps([s.to_json() for s in sources])


def _add_versions_and_samples(db: sqlite3.Connection) -> None:
    """From before policy versions, samples and algorithm versions: policies become version 1
    and algorithms private version 1 (no API could read their code then, and private keeps it
    so)."""
    with transaction(db):
        db.execute("ALTER TABLE datasets ADD COLUMN sample_of TEXT")
        for dataset_id, record in db.execute("SELECT id, record FROM datasets").fetchall():
            dataset = provider_pb2.Dataset.FromString(record)
            dataset.policy_version = 1
            db.execute(
                "UPDATE datasets SET record = ? WHERE id = ?",
                (dataset.SerializeToString(), dataset_id),
            )
            db.execute(
                "INSERT OR IGNORE INTO dataset_policies (dataset, version, policy) "
                "VALUES (?, 1, ?)",
                (dataset_id, dataset.policy.SerializeToString()),
            )
        for algorithm_id, record in db.execute("SELECT id, record FROM algorithms").fetchall():
            algorithm = provider_pb2.Algorithm.FromString(record)
            algorithm.access = provider_pb2.ALGORITHM_ACCESS_PRIVATE
            algorithm.version = 1
            algorithm.update_time.CopyFrom(algorithm.create_time)
            db.execute(
                "UPDATE algorithms SET record = ? WHERE id = ?",
                (algorithm.SerializeToString(), algorithm_id),
            )


def _dataset_of(record: bytes, sample: str | None) -> provider_pb2.Dataset:
    dataset = provider_pb2.Dataset.FromString(record)
    if sample is not None:
        dataset.sample = f"datasets/{sample}"
    return dataset


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class ProviderStore:
    """Async methods for the servicer's sake; each runs its statements inline (mesh.sqlite)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    @classmethod
    async def open(cls, path: Path) -> ProviderStore:
        db = connect(path, _SCHEMA)
        _upgrade(db)
        db.executescript(_INDEXES)
        return cls(db)

    async def close(self) -> None:
        self.db.close()

    # -- nonces and tokens ---------------------------------------------------------------

    async def use_nonce(self, address: str, nonce: str) -> None:
        """Stores `nonce` as the address's latest if it is larger than the one before, in one
        statement (so atomic). Call only after the signature has been verified."""
        stored = self.db.execute(
            "INSERT INTO nonces (address, nonce) VALUES (?, ?) "
            "ON CONFLICT (address) DO UPDATE SET nonce = excluded.nonce "
            "WHERE excluded.nonce > nonces.nonce",
            (address.lower(), int(nonce)),
        ).rowcount
        if not stored:
            raise Unauthenticated(
                "the nonce was used before or is lower than the last one; use a larger nonce",
                reason="NONCE_REUSED",
            )

    async def add_token(self, token: str, address: str, expire_time: float) -> None:
        self.db.execute(
            "INSERT INTO tokens (token_hash, address, expire_time) VALUES (?, ?, ?)",
            (_token_hash(token), address, expire_time),
        )
        self.db.execute("DELETE FROM tokens WHERE expire_time < ?", (time.time(),))

    async def token_address(self, token: str) -> str | None:
        row = self.db.execute(
            "SELECT address, expire_time FROM tokens WHERE token_hash = ?", (_token_hash(token),)
        ).fetchone()
        if row is None or float(row[1]) < time.time():
            return None
        return str(row[0])

    async def revoke_token(self, token: str, address: str) -> bool:
        cursor = self.db.execute(
            "DELETE FROM tokens WHERE token_hash = ? AND address = ?",
            (_token_hash(token), address),
        )
        return bool(cursor.rowcount)

    # -- idempotency ---------------------------------------------------------------------

    async def request_resource(self, address: str, request_id: str) -> str | None:
        """What the address's earlier create with this request id made; None for none (and for
        no request id: a create without one is not idempotent)."""
        if not request_id:
            return None
        row = self.db.execute(
            "SELECT resource FROM requests WHERE address = ? AND request_id = ?",
            (address, request_id),
        ).fetchone()
        return None if row is None else str(row[0])

    async def remember_request(self, address: str, request_id: str, resource: str) -> None:
        if not request_id:
            return
        self.db.execute(
            "INSERT OR IGNORE INTO requests (address, request_id, resource) VALUES (?, ?, ?)",
            (address, request_id, resource),
        )

    # -- assets --------------------------------------------------------------------------

    def sample_refusal(self, dataset_id: str) -> FailedPrecondition | None:
        """Why a new dataset cannot be the sample of `dataset_id`, or None when it can."""
        row = self.db.execute(
            "SELECT sample_of, (SELECT COUNT(*) FROM datasets s WHERE s.sample_of = d.id) "
            "FROM datasets d WHERE id = ?",
            (dataset_id,),
        ).fetchone()
        name = f"datasets/{dataset_id}"
        if row is None:
            return FailedPrecondition(f"no dataset {name}", reason="SAMPLE_TARGET_NOT_FOUND")
        if row[0] is not None:
            return FailedPrecondition(
                f"{name} is itself a sample; a sample has no sample", reason="SAMPLE_OF_SAMPLE"
            )
        if row[1]:
            return FailedPrecondition(f"{name} has a sample already", reason="SAMPLE_EXISTS")
        return None

    async def add_dataset(self, dataset: provider_pb2.Dataset, files: list[FileSource]) -> None:
        """Adds a dataset, with where its files are, and its policy as version 1. When it is
        the sample of another (`dataset.sample_of`), FAILED_PRECONDITION unless that one can
        take it (checked here, with the insert, so two samples published at once cannot both
        win)."""
        sample_of = dataset.sample_of.removeprefix("datasets/") or None
        if sample_of is not None:
            refusal = self.sample_refusal(sample_of)
            if refusal is not None:
                raise refusal
        with transaction(self.db):
            self.db.execute(
                "INSERT INTO datasets (id, seq, record, files, sample_of) VALUES "
                "(?, COALESCE((SELECT MAX(seq) FROM datasets), 0) + 1, ?, ?, ?)",
                (
                    dataset.name.removeprefix("datasets/"),
                    dataset.SerializeToString(),
                    _files_json(files),
                    sample_of,
                ),
            )
            self._add_policy_version(dataset)

    def _add_policy_version(self, dataset: provider_pb2.Dataset) -> None:
        self.db.execute(
            "INSERT INTO dataset_policies (dataset, version, policy) VALUES (?, ?, ?)",
            (
                dataset.name.removeprefix("datasets/"),
                dataset.policy_version,
                dataset.policy.SerializeToString(),
            ),
        )

    async def update_dataset_policy(
        self, dataset_id: str, policy: provider_pb2.ComputePolicy, expected_version: int
    ) -> provider_pb2.Dataset:
        """Replaces the policy as the next version and returns the dataset. NOT_FOUND for an
        unknown dataset; ABORTED when `expected_version` is not 0 and not the current one. No
        await inside: no job can start between the check and the change."""
        dataset = self._record(dataset_id)
        if dataset is None:
            raise NotFound(f"no dataset datasets/{dataset_id}", reason="DATASET_NOT_FOUND")
        if expected_version and expected_version != dataset.policy_version:
            raise PolicyVersionMismatch(
                f"{dataset.name} is at policy version {dataset.policy_version}, "
                f"not {expected_version}; read it again and retry"
            )
        dataset.policy.CopyFrom(policy)
        dataset.policy_version += 1
        public = provider_pb2.Dataset()
        public.CopyFrom(dataset)
        public.ClearField("sample")  # read beside the record, never stored in it
        with transaction(self.db):
            self.db.execute(
                "UPDATE datasets SET record = ? WHERE id = ?",
                (public.SerializeToString(), dataset_id),
            )
            self._add_policy_version(dataset)
        return dataset

    async def dataset_policy(
        self, dataset_id: str, version: int
    ) -> provider_pb2.ComputePolicy | None:
        """One version of a dataset's policy, as it was."""
        row = self.db.execute(
            "SELECT policy FROM dataset_policies WHERE dataset = ? AND version = ?",
            (dataset_id, version),
        ).fetchone()
        return None if row is None else provider_pb2.ComputePolicy.FromString(row[0])

    async def dataset(
        self, dataset_id: str
    ) -> tuple[provider_pb2.Dataset, list[FileSource]] | None:
        """The dataset's public record, and where its files are (for the engine only)."""
        row = self.db.execute(
            f"SELECT d.files, {_RECORD_COLUMNS} FROM datasets d WHERE id = ?",  # noqa: S608
            (dataset_id,),
        ).fetchone()
        if row is None:
            return None
        return _dataset_of(row[1], row[2]), [FileSource.from_json(f) for f in json.loads(row[0])]

    async def dataset_record(self, dataset_id: str) -> provider_pb2.Dataset | None:
        """The dataset's public record alone: its files' locations are not parsed for it."""
        return self._record(dataset_id)

    def _record(self, dataset_id: str) -> provider_pb2.Dataset | None:
        row = self.db.execute(
            f"SELECT {_RECORD_COLUMNS} FROM datasets d WHERE id = ?",  # noqa: S608
            (dataset_id,),
        ).fetchone()
        return None if row is None else _dataset_of(row[0], row[1])

    async def datasets(self, limit: int, after_seq: int) -> list[tuple[int, provider_pb2.Dataset]]:
        rows = self.db.execute(
            f"SELECT d.seq, {_RECORD_COLUMNS} FROM datasets d "  # noqa: S608
            "WHERE d.seq > ? ORDER BY d.seq LIMIT ?",
            (after_seq, limit),
        ).fetchall()
        return [(int(r[0]), _dataset_of(r[1], r[2])) for r in rows]

    async def add_algorithm(self, algorithm: provider_pb2.Algorithm, code: bytes) -> None:
        self.db.execute(
            "INSERT INTO algorithms (id, seq, record, code) VALUES "
            "(?, COALESCE((SELECT MAX(seq) FROM algorithms), 0) + 1, ?, ?)",
            (algorithm.name.removeprefix("algorithms/"), algorithm.SerializeToString(), code),
        )

    async def update_algorithm(
        self, algorithm: provider_pb2.Algorithm, code: bytes
    ) -> provider_pb2.Algorithm:
        """Stores `algorithm` (its record with the changes made) and its new code as the next
        version of the stored one; returns it with that version."""
        algorithm_id = algorithm.name.removeprefix("algorithms/")
        row = self.db.execute(
            "SELECT record FROM algorithms WHERE id = ?", (algorithm_id,)
        ).fetchone()
        if row is None:
            raise NotFound(f"no algorithm {algorithm.name}", reason="ALGORITHM_NOT_FOUND")
        algorithm.version = provider_pb2.Algorithm.FromString(row[0]).version + 1
        self.db.execute(
            "UPDATE algorithms SET record = ?, code = ? WHERE id = ?",
            (algorithm.SerializeToString(), code, algorithm_id),
        )
        return algorithm

    async def algorithm(self, algorithm_id: str) -> provider_pb2.Algorithm | None:
        """The algorithm's record, without its code (up to 16 MiB)."""
        row = self.db.execute(
            "SELECT record FROM algorithms WHERE id = ?", (algorithm_id,)
        ).fetchone()
        return None if row is None else provider_pb2.Algorithm.FromString(row[0])

    async def algorithm_with_code(
        self, algorithm_id: str
    ) -> tuple[provider_pb2.Algorithm, bytes] | None:
        row = self.db.execute(
            "SELECT record, code FROM algorithms WHERE id = ?", (algorithm_id,)
        ).fetchone()
        if row is None:
            return None
        return provider_pb2.Algorithm.FromString(row[0]), bytes(row[1])

    async def algorithms(
        self, limit: int, after_seq: int
    ) -> list[tuple[int, provider_pb2.Algorithm]]:
        rows = self.db.execute(
            "SELECT seq, record FROM algorithms WHERE seq > ? ORDER BY seq LIMIT ?",
            (after_seq, limit),
        ).fetchall()
        return [(int(r[0]), provider_pb2.Algorithm.FromString(r[1])) for r in rows]
