"""The Provider's state in SQLite: the asset registry, nonces, auth tokens and the request
ids that make creates idempotent."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path

from c2d.provider.v1 import provider_pb2

from mesh.errors import Unauthenticated
from mesh.sqlite import connect

_SCHEMA = """
CREATE TABLE IF NOT EXISTS nonces (address TEXT PRIMARY KEY, nonce INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (
    token_hash TEXT PRIMARY KEY, address TEXT NOT NULL, expire_time REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS datasets (
    id TEXT PRIMARY KEY, seq INTEGER NOT NULL,
    record BLOB NOT NULL,            -- provider.v1.Dataset, the public part
    file_paths TEXT NOT NULL         -- JSON list; never leaves the node's internal hops
);
CREATE TABLE IF NOT EXISTS algorithms (
    id TEXT PRIMARY KEY, seq INTEGER NOT NULL,
    record BLOB NOT NULL,            -- provider.v1.Algorithm
    code BLOB NOT NULL
);
-- Each insert takes MAX(seq) + 1: an index makes that a lookup rather than a scan.
CREATE INDEX IF NOT EXISTS datasets_by_seq ON datasets (seq);
CREATE INDEX IF NOT EXISTS algorithms_by_seq ON algorithms (seq);
CREATE TABLE IF NOT EXISTS requests (
    address TEXT NOT NULL, request_id TEXT NOT NULL, resource TEXT NOT NULL,
    PRIMARY KEY (address, request_id)
);
"""


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class ProviderStore:
    """Async methods for the servicer's sake; each runs its statements inline (mesh.sqlite)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    @classmethod
    async def open(cls, path: Path) -> ProviderStore:
        return cls(connect(path, _SCHEMA))

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
        row = self.db.execute(
            "SELECT resource FROM requests WHERE address = ? AND request_id = ?",
            (address, request_id),
        ).fetchone()
        return None if row is None else str(row[0])

    async def remember_request(self, address: str, request_id: str, resource: str) -> None:
        self.db.execute(
            "INSERT OR IGNORE INTO requests (address, request_id, resource) VALUES (?, ?, ?)",
            (address, request_id, resource),
        )

    # -- assets --------------------------------------------------------------------------

    async def add_dataset(self, dataset: provider_pb2.Dataset, file_paths: list[str]) -> None:
        self.db.execute(
            "INSERT INTO datasets (id, seq, record, file_paths) VALUES "
            "(?, COALESCE((SELECT MAX(seq) FROM datasets), 0) + 1, ?, ?)",
            (
                dataset.name.removeprefix("datasets/"),
                dataset.SerializeToString(),
                json.dumps(file_paths),
            ),
        )

    async def dataset(self, dataset_id: str) -> tuple[provider_pb2.Dataset, list[str]] | None:
        row = self.db.execute(
            "SELECT record, file_paths FROM datasets WHERE id = ?", (dataset_id,)
        ).fetchone()
        if row is None:
            return None
        return provider_pb2.Dataset.FromString(row[0]), list(json.loads(row[1]))

    async def datasets(self, limit: int, after_seq: int) -> list[tuple[int, provider_pb2.Dataset]]:
        rows = self.db.execute(
            "SELECT seq, record FROM datasets WHERE seq > ? ORDER BY seq LIMIT ?",
            (after_seq, limit),
        ).fetchall()
        return [(int(r[0]), provider_pb2.Dataset.FromString(r[1])) for r in rows]

    async def add_algorithm(self, algorithm: provider_pb2.Algorithm, code: bytes) -> None:
        self.db.execute(
            "INSERT INTO algorithms (id, seq, record, code) VALUES "
            "(?, COALESCE((SELECT MAX(seq) FROM algorithms), 0) + 1, ?, ?)",
            (algorithm.name.removeprefix("algorithms/"), algorithm.SerializeToString(), code),
        )

    async def algorithm(self, algorithm_id: str) -> tuple[provider_pb2.Algorithm, bytes] | None:
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
