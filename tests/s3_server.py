"""A real S3 server on 127.0.0.1 for the tests: moto's server (S3 only), one per test session,
with a fresh bucket per test so that tests never see each other's objects.

moto does not verify request signatures: tests of presigned-URL expiry and tampering check the
URL with our own code, not by asking the server."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from mesh.s3 import S3Settings

# moto accepts any key pair; fixed ones keep presigned URLs reproducible in a test.
ACCESS_KEY_ID = "testing-access-key"
SECRET_ACCESS_KEY = "testing-secret-key"
REGION = "us-east-1"


def settings_at(endpoint_url: str) -> S3Settings:
    """The tests' credentials, for a store at `endpoint_url` (the server, a relay to it, or
    nothing at all)."""
    return S3Settings(
        endpoint_url=endpoint_url,
        region=REGION,
        access_key_id=ACCESS_KEY_ID,
        secret_access_key=SECRET_ACCESS_KEY,
    )


def dead_endpoint() -> str:
    """An endpoint on 127.0.0.1 that nobody listens on: S3 down."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@dataclass(frozen=True)
class S3Server:
    """A running server: its endpoint and settings that reach it."""

    endpoint_url: str

    @property
    def settings(self) -> S3Settings:
        return settings_at(self.endpoint_url)

    @property
    def env(self) -> dict[str, str]:
        """The C2D_S3_* variables that name this server, for services and subprocesses."""
        return {
            "C2D_S3_ENDPOINT": self.endpoint_url,
            "C2D_S3_REGION": REGION,
            "C2D_S3_ACCESS_KEY_ID": ACCESS_KEY_ID,
            "C2D_S3_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
        }

    def put_object(self, bucket: str, key: str, data: bytes) -> None:
        """Stores `data` at `key`, as an owner filling a bucket would."""
        client = self.client()
        try:
            client.put_object(Bucket=bucket, Key=key, Body=data)
        finally:
            client.close()

    def client(self, key_id: str = ACCESS_KEY_ID, secret: str = SECRET_ACCESS_KEY) -> Any:
        """A plain boto3 client on the server (close it): what another writer, or an operator,
        does beside the services; a consumer with keys of its own."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
        )

    def objects(self, bucket: str) -> dict[str, bytes]:
        """Every object in `bucket`, by key, with its content."""
        client = self.client()
        try:
            listed = client.list_objects_v2(Bucket=bucket).get("Contents", [])
            return {
                o["Key"]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
                for o in listed
            }
        finally:
            client.close()

    def presigned_put(self, bucket: str, key: str, key_id: str, secret: str) -> str:
        """A SigV4 presigned PUT URL for `key`, as a consumer makes it with its own keys."""
        client = self.client(key_id, secret)
        try:
            url: str = client.generate_presigned_url(
                "put_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=600
            )
            return url
        finally:
            client.close()

    def create_bucket(self, name: str | None = None) -> str:
        """Makes a bucket (a fresh name unless given) and returns its name."""
        bucket = name or f"test-{uuid.uuid4().hex[:16]}"
        client = self.client()
        client.create_bucket(Bucket=bucket)
        client.close()
        return bucket


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield S3Server(endpoint_url=f"http://{host}:{port}")
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh, empty bucket on the session's server."""
    return s3_server.create_bucket()
