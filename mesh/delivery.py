"""A consumer's own storage for a job's results (`ResultDelivery`): the checks of a
destination, its description without secrets, and which hosts the node may write to.

A destination is consumer input that makes the node open connections, so it is checked twice:
by the Provider at StartCompute (for an early, clear refusal) and by the engine right before it
connects (its own view of DNS is the one that matters). Only `https://` to public addresses is
allowed, unless the node names the host in C2D_DELIVERY_ALLOW_HOSTS (an on-premises store, or
a test server on 127.0.0.1): otherwise a consumer could make the node write to its own
loopback, its cloud's metadata service or the data owner's internal network.

The secrets (keys, presigned URLs, which are bearer credentials) live only in memory for the
job: `without_secrets` is what any stored copy of a spec keeps."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
from collections.abc import Mapping
from urllib.parse import urlsplit

from c2d.common.v1 import job_pb2
from c2d.engine.v1 import engine_pb2

from mesh.errors import InvalidArgument, PermissionDenied
from mesh.s3 import parse_s3_url

ALLOW_HOSTS_ENV = "C2D_DELIVERY_ALLOW_HOSTS"
MAX_UPLOAD_URLS = 1000
MAX_UPLOAD_HOSTS = 10
MAX_URL_LENGTH = 8192
MAX_PREFIX_LENGTH = 512
MAX_NAME_LENGTH = 1024
# Keys and tokens are short; a bound keeps a hostile request from parking megabytes in memory.
MAX_SECRET_LENGTH = 4096

REFUSED = "DELIVERY_NOT_ALLOWED"


def is_set(delivery: job_pb2.ResultDelivery) -> bool:
    return delivery.WhichOneof("destination") is not None


# The consumer's choice of results as people write it: `c2d compute start --results`, the
# SDK's `results=`, the publish program's --results.
SELECTION_BY_WORD: dict[str, job_pb2.ResultSelection.ValueType] = {
    "outputs": job_pb2.RESULT_SELECTION_OUTPUTS,
    "logs": job_pb2.RESULT_SELECTION_LOGS,
    "both": job_pb2.RESULT_SELECTION_OUTPUTS_AND_LOGS,
}


def check_results(results: int, field: str = "results") -> None:
    """INVALID_ARGUMENT naming `field` unless `results` is a ResultSelection (the consumer's
    choice of results, checked alike by the Provider and the engine)."""
    if results not in job_pb2.ResultSelection.values():
        raise InvalidArgument(
            "results must be RESULT_SELECTION_OUTPUTS_AND_LOGS, RESULT_SELECTION_OUTPUTS or "
            "RESULT_SELECTION_LOGS (or unset for outputs and logs)",
            field=field,
        )


def check_delivery(delivery: job_pb2.ResultDelivery, field: str = "delivery") -> None:
    """INVALID_ARGUMENT, naming the field, unless `delivery` is unset or well formed. Never
    echoes a secret or a URL (a presigned URL is a credential)."""
    kind = delivery.WhichOneof("destination")
    if kind == "s3":
        _check_s3(delivery.s3, f"{field}.s3")
    elif kind == "upload_urls":
        _check_upload_urls(delivery.upload_urls, f"{field}.upload_urls")


def _check_s3(s3: job_pb2.S3Delivery, field: str) -> None:
    try:
        parse_s3_url(f"s3://{s3.bucket}")
    except ValueError:
        raise InvalidArgument(
            "the bucket is not a valid S3 bucket name (3-63 lowercase letters, digits, dots "
            "and hyphens)",
            field=f"{field}.bucket",
        ) from None
    if s3.endpoint:
        _check_url(s3.endpoint, f"{field}.endpoint", "an S3 endpoint")
        parts = urlsplit(s3.endpoint)
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise InvalidArgument(
                "an S3 endpoint is a scheme and host only, such as https://s3.example.org",
                field=f"{field}.endpoint",
            )
    if len(s3.region) > 64 or not all(c.isalnum() or c == "-" for c in s3.region):
        raise InvalidArgument("the region is letters, digits and '-'", field=f"{field}.region")
    prefix = s3.prefix
    if (
        len(prefix) > MAX_PREFIX_LENGTH
        or prefix.startswith("/")
        or "\x00" in prefix
        or any(part in (".", "..") for part in prefix.split("/"))
    ):
        raise InvalidArgument(
            f"the prefix is at most {MAX_PREFIX_LENGTH} characters, without a leading '/' or "
            "a '.' or '..' segment",
            field=f"{field}.prefix",
        )
    if not s3.access_key_id or not s3.secret_access_key:
        raise InvalidArgument(
            "delivery to S3 needs an access key id and its secret access key",
            field=f"{field}.access_key_id"
            if not s3.access_key_id
            else f"{field}.secret_access_key",
        )
    for name in ("access_key_id", "secret_access_key", "session_token"):
        if len(getattr(s3, name)) > MAX_SECRET_LENGTH:
            raise InvalidArgument(
                f"at most {MAX_SECRET_LENGTH} characters", field=f"{field}.{name}"
            )


def _check_upload_urls(upload: job_pb2.UploadUrls, field: str) -> None:
    if not upload.urls:
        raise InvalidArgument("name at least one result and its upload URL", field=field)
    if len(upload.urls) > MAX_UPLOAD_URLS:
        raise InvalidArgument(f"at most {MAX_UPLOAD_URLS} upload URLs", field=field)
    for name, url in upload.urls.items():
        if problem := result_name_problem(name):
            raise InvalidArgument(f"a result name {problem}", field=f"{field}.urls")
        _check_url(url, f"{field}.urls[{name}]", "an upload URL")
    # Each host is resolved and checked before connecting: a bound keeps that cheap.
    if len({urlsplit(url).netloc for url in upload.urls.values()}) > MAX_UPLOAD_HOSTS:
        raise InvalidArgument(
            f"upload URLs name at most {MAX_UPLOAD_HOSTS} different hosts", field=f"{field}.urls"
        )


def result_name_problem(name: str) -> str | None:
    """Why `name` cannot be a result's name (as the publish stage lists them), or None."""
    if not name or len(name) > MAX_NAME_LENGTH:
        return f"is 1 to {MAX_NAME_LENGTH} characters"
    if name.startswith("/") or any(part in ("", ".", "..") for part in name.split("/")):
        return "is a relative path without empty, '.' or '..' segments"
    if any(ord(c) < 0x20 or c == "\x7f" for c in name):
        return "has no control character"
    return None


def _check_url(url: str, field: str, what: str) -> None:
    if len(url) > MAX_URL_LENGTH:
        raise InvalidArgument(f"{what} is at most {MAX_URL_LENGTH} characters", field=field)
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise InvalidArgument(f"{what} is not a valid URL", field=field) from None
    if parts.scheme not in ("http", "https") or not host:
        raise InvalidArgument(f"{what} is an https:// URL with a host", field=field)
    if parts.username is not None or parts.password is not None:
        raise InvalidArgument(f"{what} carries no user or password", field=field)


def without_secrets(delivery: job_pb2.ResultDelivery) -> job_pb2.ResultDelivery:
    """What a stored copy keeps: the S3 destination without its keys; the names of the upload
    URLs without the URLs (each is a credential)."""
    kept = job_pb2.ResultDelivery()
    kind = delivery.WhichOneof("destination")
    if kind == "s3":
        kept.s3.CopyFrom(delivery.s3)
        kept.s3.ClearField("access_key_id")
        kept.s3.ClearField("secret_access_key")
        kept.s3.ClearField("session_token")
    elif kind == "upload_urls":
        for name in delivery.upload_urls.urls:
            kept.upload_urls.urls[name] = ""
    return kept


def stored_spec(spec: engine_pb2.JobSpec) -> engine_pb2.JobSpec:
    """What any stored copy of a job's spec keeps (the operator's database, the engine's
    spec.pb, the Kubernetes job Secret): all but the delivery's secrets."""
    if not is_set(spec.delivery):
        return spec
    kept = engine_pb2.JobSpec()
    kept.CopyFrom(spec)
    kept.delivery.CopyFrom(without_secrets(spec.delivery))
    return kept


def has_secrets(delivery: job_pb2.ResultDelivery) -> bool:
    """Whether `delivery` still holds what it needs to deliver: not a stored copy."""
    kind = delivery.WhichOneof("destination")
    if kind == "s3":
        return bool(delivery.s3.secret_access_key)
    if kind == "upload_urls":
        return all(delivery.upload_urls.urls.values())
    return False


def s3_key_prefix(s3: job_pb2.S3Delivery, job_id: str) -> str:
    """Where a job's results go in the consumer's bucket: `{prefix}{job id}/`."""
    return f"{s3.prefix}{job_id}/"


def describe(delivery: job_pb2.ResultDelivery, job_id: str) -> str:
    """The destination as a job shows it: no key, no URL."""
    kind = delivery.WhichOneof("destination")
    if kind == "s3":
        s3 = delivery.s3
        where = f"s3://{s3.bucket}/{s3_key_prefix(s3, job_id)}"
        host = urlsplit(s3.endpoint).netloc.rpartition("@")[2] if s3.endpoint else ""
        return f"{where} at {host}" if host else where
    if kind == "upload_urls":
        return f"upload URLs ({len(delivery.upload_urls.urls)})"
    return ""


def pending(delivery: job_pb2.ResultDelivery, job_id: str) -> job_pb2.DeliveryStatus:
    """What a job shows of its delivery from its acceptance until the delivery is over."""
    return job_pb2.DeliveryStatus(
        state=job_pb2.DeliveryStatus.STATE_PENDING, destination=describe(delivery, job_id)
    )


def allowed_hosts(environ: Mapping[str, str] | None = None) -> frozenset[str]:
    """The hosts (`host` or `host:port`, lowercase) the node lets deliveries reach over plain
    http or at addresses that are not public: C2D_DELIVERY_ALLOW_HOSTS, comma-separated."""
    env = os.environ if environ is None else environ
    return frozenset(
        entry.strip().lower() for entry in env.get(ALLOW_HOSTS_ENV, "").split(",") if entry.strip()
    )


def destination_urls(delivery: job_pb2.ResultDelivery) -> list[str]:
    """The URLs a delivery connects to; none for AWS itself (always public, always https)."""
    kind = delivery.WhichOneof("destination")
    if kind == "s3":
        return [delivery.s3.endpoint] if delivery.s3.endpoint else []
    if kind == "upload_urls":
        return list(delivery.upload_urls.urls.values())
    return []


def _allowed(host: str, port: int, allowed: frozenset[str]) -> bool:
    host = host.lower()
    return host in allowed or f"{host}:{port}" in allowed


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _refused(what: str) -> PermissionDenied:
    return PermissionDenied(
        f"the delivery destination {what}; only https:// to public addresses is allowed unless "
        f"the node allows the host ({ALLOW_HOSTS_ENV})",
        reason=REFUSED,
        field="delivery",
    )


def check_destination_blocking(delivery: job_pb2.ResultDelivery, allowed: frozenset[str]) -> None:
    """PERMISSION_DENIED (DELIVERY_NOT_ALLOWED) unless every URL the delivery connects to is
    https:// to a host whose every address is public, or a host in `allowed`. Resolves names
    (blocking: call from a worker thread). A name that does not resolve is refused too."""
    seen: set[tuple[str, int]] = set()
    for url in destination_urls(delivery):
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        if (host, port) in seen:
            continue
        seen.add((host, port))
        if _allowed(host, port, allowed):
            continue
        if parts.scheme != "https":
            raise _refused("is plain http://")
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError:
            raise _refused("has a host name that does not resolve") from None
        if not infos or not all(_public(str(info[4][0])) for info in infos):
            raise _refused("is not a public address")


async def check_destination(delivery: job_pb2.ResultDelivery, allowed: frozenset[str]) -> None:
    """`check_destination_blocking` off the event loop."""
    if destination_urls(delivery):
        await asyncio.to_thread(check_destination_blocking, delivery, allowed)
