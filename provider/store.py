"""The Provider's state in SQLite: the asset registry, nonces, auth tokens and the request
ids that make creates idempotent."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
from c2d.provider.v1 import provider_pb2

from mesh.config import ensure_private_dir
from mesh.errors import Unauthenticated

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS nonces (address TEXT PRIMARY KEY, nonce TEXT NOT NULL);
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
CREATE TABLE IF NOT EXISTS requests (
    address TEXT NOT NULL, request_id TEXT NOT NULL, resource TEXT NOT NULL,
    PRIMARY KEY (address, request_id)
);
"""


def _locked(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    @functools.wraps(method)
    async def wrapper(self: ProviderStore, *args: Any, **kwargs: Any) -> T:
        async with self.lock:
            return await method(self, *args, **kwargs)

    return wrapper


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class ProviderStore:
    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db
        # One connection serves every request: a statement of one request must never land
        # inside another request's open transaction (and be rolled back with it).
        self.lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path) -> ProviderStore:
        ensure_private_dir(path.parent)
        db = await aiosqlite.connect(path, isolation_level=None)
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=NORMAL")
        await db.executescript(_SCHEMA)
        return cls(db)

    async def close(self) -> None:
        await self.db.close()

    # -- nonces and tokens ---------------------------------------------------------------

    @_locked
    async def use_nonce(self, address: str, nonce: str) -> None:
        """Stores `nonce` as the address's latest, in one transaction with the check that it
        is larger than the one before. Call only after the signature has been verified."""
        key = address.lower()
        await self.db.execute("BEGIN IMMEDIATE")
        try:
            async with self.db.execute("SELECT nonce FROM nonces WHERE address = ?", (key,)) as c:
                row = await c.fetchone()
            if row is not None and int(nonce) <= int(row[0]):
                raise Unauthenticated(
                    "the nonce was used before or is lower than the last one; use a larger nonce",
                    reason="NONCE_REUSED",
                )
            await self.db.execute(
                "INSERT INTO nonces (address, nonce) VALUES (?, ?) "
                "ON CONFLICT (address) DO UPDATE SET nonce = excluded.nonce",
                (key, nonce),
            )
        except BaseException:
            await self.db.execute("ROLLBACK")
            raise
        await self.db.execute("COMMIT")

    @_locked
    async def add_token(self, token: str, address: str, expire_time: float) -> None:
        await self.db.execute(
            "INSERT INTO tokens (token_hash, address, expire_time) VALUES (?, ?, ?)",
            (_token_hash(token), address, expire_time),
        )
        await self.db.execute("DELETE FROM tokens WHERE expire_time < ?", (time.time(),))

    @_locked
    async def token_address(self, token: str) -> str | None:
        async with self.db.execute(
            "SELECT address, expire_time FROM tokens WHERE token_hash = ?", (_token_hash(token),)
        ) as cur:
            row = await cur.fetchone()
        if row is None or float(row[1]) < time.time():
            return None
        return str(row[0])

    @_locked
    async def revoke_token(self, token: str, address: str) -> bool:
        cursor = await self.db.execute(
            "DELETE FROM tokens WHERE token_hash = ? AND address = ?",
            (_token_hash(token), address),
        )
        return bool(cursor.rowcount)

    # -- idempotency ---------------------------------------------------------------------

    @_locked
    async def request_resource(self, address: str, request_id: str) -> str | None:
        async with self.db.execute(
            "SELECT resource FROM requests WHERE address = ? AND request_id = ?",
            (address, request_id),
        ) as cur:
            row = await cur.fetchone()
        return None if row is None else str(row[0])

    @_locked
    async def remember_request(self, address: str, request_id: str, resource: str) -> None:
        await self.db.execute(
            "INSERT OR IGNORE INTO requests (address, request_id, resource) VALUES (?, ?, ?)",
            (address, request_id, resource),
        )

    # -- assets --------------------------------------------------------------------------

    @_locked
    async def add_dataset(self, dataset: provider_pb2.Dataset, file_paths: list[str]) -> None:
        await self.db.execute(
            "INSERT INTO datasets (id, seq, record, file_paths) VALUES "
            "(?, COALESCE((SELECT MAX(seq) FROM datasets), 0) + 1, ?, ?)",
            (
                dataset.name.removeprefix("datasets/"),
                dataset.SerializeToString(),
                json.dumps(file_paths),
            ),
        )

    @_locked
    async def dataset(self, dataset_id: str) -> tuple[provider_pb2.Dataset, list[str]] | None:
        async with self.db.execute(
            "SELECT record, file_paths FROM datasets WHERE id = ?", (dataset_id,)
        ) as cur:
            row = await cur.fetchone()
        if row is None:
            return None
        return provider_pb2.Dataset.FromString(row[0]), list(json.loads(row[1]))

    @_locked
    async def datasets(self, limit: int, after_seq: int) -> list[tuple[int, provider_pb2.Dataset]]:
        async with self.db.execute(
            "SELECT seq, record FROM datasets WHERE seq > ? ORDER BY seq LIMIT ?",
            (after_seq, limit),
        ) as cur:
            return [
                (int(r[0]), provider_pb2.Dataset.FromString(r[1])) for r in await cur.fetchall()
            ]

    @_locked
    async def add_algorithm(self, algorithm: provider_pb2.Algorithm, code: bytes) -> None:
        await self.db.execute(
            "INSERT INTO algorithms (id, seq, record, code) VALUES "
            "(?, COALESCE((SELECT MAX(seq) FROM algorithms), 0) + 1, ?, ?)",
            (algorithm.name.removeprefix("algorithms/"), algorithm.SerializeToString(), code),
        )

    @_locked
    async def algorithm(self, algorithm_id: str) -> tuple[provider_pb2.Algorithm, bytes] | None:
        async with self.db.execute(
            "SELECT record, code FROM algorithms WHERE id = ?", (algorithm_id,)
        ) as cur:
            row = await cur.fetchone()
        if row is None:
            return None
        return provider_pb2.Algorithm.FromString(row[0]), bytes(row[1])

    @_locked
    async def algorithms(
        self, limit: int, after_seq: int
    ) -> list[tuple[int, provider_pb2.Algorithm]]:
        async with self.db.execute(
            "SELECT seq, record FROM algorithms WHERE seq > ? ORDER BY seq LIMIT ?",
            (after_seq, limit),
        ) as cur:
            return [
                (int(r[0]), provider_pb2.Algorithm.FromString(r[1])) for r in await cur.fetchall()
            ]
