"""How the services reach S3 or an S3-compatible store (MinIO, Ceph, moto's server): the
settings, read once from the environment, and the aioboto3 client made from them.

One home for both users, so that results storage (mesh.storage_s3) and dataset sources fetched
by the configure stage (pods.configure) address a store the same way."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager

    from botocore.exceptions import ClientError
    from types_aiobotocore_s3 import S3Client

# S3's bounds on a multipart upload's parts: at least 5 MiB (but the last), at most 10,000;
# here rather than in mesh.storage_s3 so that configuration can check a part size without
# importing aioboto3.
MIN_PART_SIZE = 5 << 20
MAX_PART_SIZE = 5 << 30
MAX_PARTS = 10_000
PART_SIZE = 8 << 20

# S3's own bucket naming rules (3-63 lowercase letters, digits, dots and hyphens).
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


@dataclass(frozen=True)
class S3Settings:
    """Where the store is and who we are to it. Empty fields defer to botocore's own lookup
    (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION, profiles, instance
    roles), so a node on AWS needs none of them."""

    endpoint_url: str = ""
    region: str = ""
    access_key_id: str = ""
    secret_access_key: str = ""
    session_token: str = ""
    # Path-style (`endpoint/bucket/key`): what S3-compatible servers expect; virtual-hosted
    # style needs DNS names per bucket.
    path_style: bool = True
    # Seconds for connecting and for each read; every call has a deadline.
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.endpoint_url:
            parsed = urlparse(self.endpoint_url)
            if parsed.scheme not in ("http", "https") or not parsed.netloc:
                raise ValueError("an S3 endpoint is an http:// or https:// URL")
        if bool(self.access_key_id) != bool(self.secret_access_key):
            raise ValueError("an S3 access key id needs its secret access key, and the reverse")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> S3Settings:
        """The node's settings: C2D_S3_ENDPOINT, C2D_S3_REGION, C2D_S3_ACCESS_KEY_ID,
        C2D_S3_SECRET_ACCESS_KEY, C2D_S3_SESSION_TOKEN, C2D_S3_PATH_STYLE (1 or 0)."""
        env = os.environ if environ is None else environ
        return cls(
            endpoint_url=env.get("C2D_S3_ENDPOINT", ""),
            region=env.get("C2D_S3_REGION", ""),
            access_key_id=env.get("C2D_S3_ACCESS_KEY_ID", ""),
            secret_access_key=env.get("C2D_S3_SECRET_ACCESS_KEY", ""),
            session_token=env.get("C2D_S3_SESSION_TOKEN", ""),
            path_style=env.get("C2D_S3_PATH_STYLE", "1") not in ("0", "false", "no"),
        )

    def client(
        self, max_connections: int = 10, attempts: int = 4
    ) -> AbstractAsyncContextManager[S3Client]:
        """An aioboto3 S3 client for these settings, as an async context manager. Signed with
        SigV4 (what presigned URLs need everywhere); each call tried up to `attempts` times."""
        # Imported here: aioboto3 costs ~0.3 s to import, and most processes never touch S3.
        import aioboto3
        from botocore.config import Config

        session = aioboto3.Session(
            aws_access_key_id=self.access_key_id or None,
            aws_secret_access_key=self.secret_access_key or None,
            aws_session_token=self.session_token or None,
            region_name=self.region or None,
        )
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path" if self.path_style else "auto"},
            connect_timeout=self.connect_timeout_s,
            read_timeout=self.read_timeout_s,
            retries={"total_max_attempts": attempts, "mode": "standard"},
            max_pool_connections=max_connections,
        )
        kwargs: dict[str, Any] = {"config": config}
        if self.endpoint_url:
            kwargs["endpoint_url"] = self.endpoint_url
        client: AbstractAsyncContextManager[S3Client] = session.client("s3", **kwargs)
        return client


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/key` (or `s3://bucket/prefix`) as (bucket, key). The key may be empty; it
    never starts with a slash. Raises ValueError naming what is wrong, never echoing the URL
    (it may be a dataset's location)."""
    parsed = urlparse(url)
    if parsed.scheme != "s3":
        raise ValueError("not an s3:// URL")
    if parsed.query or parsed.fragment or parsed.params:
        raise ValueError("an s3:// URL has no query or fragment")
    bucket = parsed.netloc
    if not _BUCKET_RE.fullmatch(bucket) or ".." in bucket:
        raise ValueError("the bucket name is not a valid S3 bucket name")
    key = parsed.path.removeprefix("/")
    if "\x00" in key:
        raise ValueError("an S3 key has no NUL character")
    return bucket, key


def error_code(error: ClientError) -> str:
    """The store's code for a refusal (NoSuchKey, AccessDenied, a bare 404 on HEAD...), "" when
    it gives none: a short fixed word, never the bucket, key or credentials."""
    return str(error.response.get("Error", {}).get("Code", ""))


def parse_s3_object(url: str) -> tuple[str, str]:
    """`parse_s3_url` for a URL that must name one object: a key that is neither empty nor a
    prefix (ending in `/`)."""
    bucket, key = parse_s3_url(url)
    if not key or key.endswith("/"):
        raise ValueError("the s3:// URL names no object (s3://bucket/key), only a bucket or prefix")
    return bucket, key
