"""Where a dataset's files are: the locations an owner gives at publication (local paths
under the data root, S3 objects, HTTP(S) URLs), checked without echoing them, or, for a dataset
made from a job's outputs, their copies in the node's results storage (`stored`), kept in the
Provider's store, and handed to the engine as its job's `DatasetFileSource`s.

A location never leaves these hops: responses (a new dataset's record is `new_dataset`),
errors, audit entries and log lines name a file by its position only."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from c2d.engine.v1 import engine_pb2
from c2d.provider.v1 import provider_pb2 as pb

from mesh.errors import InvalidArgument
from mesh.jobs import is_sha256_hex
from mesh.s3 import parse_s3_object
from mesh.storage import dataset_key
from pods import configure
from pods.configure import DataProvisioningError
from provider import assets

MAX_DATASET_FILES = 1000
MAX_URL_CHARS = 4096
# A name in the engine's sources file (C2D_SOURCE_CREDENTIALS), never the secret itself.
CREDENTIALS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

Kind = Literal["path", "s3_url", "http_url", "stored"]
KINDS: tuple[Kind, ...] = ("path", "s3_url", "http_url", "stored")


@dataclass(frozen=True)
class FileSource:
    """One file of a dataset: where it is, and the size and sha256 it had at publication
    (measured by the Provider for a local file, declared by the owner for a remote one, the
    job's recorded ones for a copy of its output in the results storage)."""

    kind: Kind
    location: str
    size: int = 0
    sha256: str = ""
    # For a remote file: the name of a source credential configured on the engine.
    credentials: str = ""

    @property
    def remote(self) -> bool:
        """Whether the file is the owner's, outside the node (S3, HTTP)."""
        return self.kind in ("s3_url", "http_url")

    def to_json(self) -> dict[str, Any]:
        """As the store keeps it: the engine's field names, so the row reads like the spec."""
        document: dict[str, Any] = {self.kind: self.location}
        if self.credentials:
            document["credentials"] = self.credentials
        document["size_bytes"] = self.size
        document["sha256"] = self.sha256
        return document

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> FileSource:
        (kind,) = [k for k in KINDS if k in document]
        return cls(
            kind=kind,
            location=str(document[kind]),
            size=int(document.get("size_bytes", 0)),
            sha256=str(document.get("sha256", "")),
            credentials=str(document.get("credentials", "")),
        )

    def to_engine(self) -> engine_pb2.DatasetFileSource:
        source = engine_pb2.DatasetFileSource(
            credentials=self.credentials, size_bytes=self.size, sha256=self.sha256
        )
        setattr(source, self.kind, self.location)
        return source


@dataclass(frozen=True)
class RequestedFile:
    """A file of a PublishDataset request whose shape has been checked. A local one is not
    measured yet (size 0); `field` is what its errors name: `file_paths[i]` or
    `files[i].path`."""

    field: str
    source: FileSource


def requested_files(request: pb.PublishDatasetRequest) -> list[RequestedFile]:
    """The request's files in order, each checked for shape without any I/O (the Provider
    never reads a remote file). INVALID_ARGUMENT naming the field and index, never the
    value."""
    if request.file_paths and request.files:
        raise InvalidArgument("set file_paths or files, not both", field="files")
    if request.file_paths:
        if len(request.file_paths) > MAX_DATASET_FILES:
            raise InvalidArgument("file_paths must list 1 to 1000 files", field="file_paths")
        return [
            RequestedFile(f"file_paths[{i}]", FileSource("path", raw))
            for i, raw in enumerate(request.file_paths)
        ]
    if not 1 <= len(request.files) <= MAX_DATASET_FILES:
        raise InvalidArgument(
            "a dataset has 1 to 1000 files: list them in files (or file_paths)", field="files"
        )
    return [_requested(f"files[{i}]", location) for i, location in enumerate(request.files)]


def _requested(field: str, location: pb.DatasetFileLocation) -> RequestedFile:
    if location.path and location.url:
        raise InvalidArgument(f"{field} has a path and a url: set one", field=field)
    if location.path:
        for name in ("credentials", "size_bytes", "sha256"):
            if getattr(location, name):
                raise InvalidArgument(
                    f"{field}.{name} is for a remote file; the Provider measures a local one",
                    field=f"{field}.{name}",
                )
        return RequestedFile(f"{field}.path", FileSource("path", location.path))
    if not location.url:
        raise InvalidArgument(f"{field} needs a path or a url", field=field)
    kind = _check_url(location.url, f"{field}.url")
    if location.size_bytes < 1:
        raise InvalidArgument(
            f"{field}.size_bytes must give the remote file's size in bytes (1 or more)",
            field=f"{field}.size_bytes",
        )
    if not is_sha256_hex(location.sha256):
        raise InvalidArgument(
            f"{field}.sha256 must be the remote file's sha256 as 64 lowercase hex digits",
            field=f"{field}.sha256",
        )
    if location.credentials and not CREDENTIALS_NAME.fullmatch(location.credentials):
        raise InvalidArgument(
            f"{field}.credentials must name a source credential of the node: letters, digits, "
            "'_', '.' and '-', at most 64, starting with a letter or digit",
            field=f"{field}.credentials",
        )
    return RequestedFile(
        field,
        FileSource(
            kind,
            location.url,
            size=location.size_bytes,
            sha256=location.sha256,
            credentials=location.credentials,
        ),
    )


def _check_url(url: str, field: str) -> Kind:
    """Which kind of remote file `url` is; INVALID_ARGUMENT naming `field` when it is not one
    the engine can fetch, or when it holds a secret."""
    if len(url) > MAX_URL_CHARS:
        raise InvalidArgument(f"{field} must be at most {MAX_URL_CHARS} characters", field=field)
    if any(ch < " " or ch == "\x7f" for ch in url):
        raise InvalidArgument(f"{field} must not hold control characters", field=field)
    if url.startswith("s3://"):
        kind: Kind = "s3_url"
    elif url.startswith(("http://", "https://")):
        kind = "http_url"
    else:
        raise InvalidArgument(f"{field} must start with s3://, http:// or https://", field=field)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (parsing the port is the check: ValueError when malformed)
    except ValueError:
        raise InvalidArgument(f"{field} is not a valid URL", field=field) from None
    if "@" in parts.netloc:
        # Secrets never travel in requests: the node keeps them, named by `credentials`.
        raise InvalidArgument(
            f"{field} must not hold credentials (user:password@); name a source credential "
            "of the node in credentials instead",
            field=field,
        )
    if "#" in url:
        raise InvalidArgument(f"{field} must not have a fragment (#...)", field=field)
    if kind == "s3_url":
        _check_s3_url(url, field)
    elif not parts.hostname:
        raise InvalidArgument(f"{field} names no host", field=field)
    elif not url.isascii() or " " in url:
        raise InvalidArgument(
            f"{field} must be ASCII without spaces: percent-encode other characters",
            field=field,
        )
    return kind


def _check_s3_url(url: str, field: str) -> None:
    try:
        parse_s3_object(url)
    except ValueError as error:
        # parse_s3_url's messages never echo the URL.
        raise InvalidArgument(f"{field}: {error}", field=field) from None


def measure(requested: Sequence[RequestedFile], data_root: Path) -> list[FileSource]:
    """The files with each local one checked as the configure stage will (under the data root
    after resolving links, a regular file, readable by the sandbox) and measured; remote ones
    as declared. Blocking: run it in a thread. Errors name the field, never the path."""
    measured: list[FileSource] = []
    root: Path | None = None
    for item in requested:
        source = item.source
        if source.remote:
            measured.append(source)
            continue
        try:
            # Resolved once, at the first local file, whose field a missing root is named by.
            root = root or configure.resolve_data_root(data_root)
            path, size = configure.check_dataset_file(source.location, root, item.field)
        except DataProvisioningError as error:
            raise InvalidArgument(str(error), field=item.field) from None
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        measured.append(FileSource("path", str(path), size=size, sha256=digest))
    return measured


def stored_file(dataset_id: str, index: int, size: int, sha256: str) -> FileSource:
    """File `index` of a dataset made from a job's outputs: the copy of an output in the
    results storage's dataset area (OperatorService.ExportResults), with its size and sha256."""
    return FileSource("stored", dataset_key(dataset_id, index), size=size, sha256=sha256)


def new_dataset(
    dataset_id: str,
    publisher: str,
    metadata: pb.AssetMetadata,
    policy: pb.ComputePolicy,
    files: Sequence[FileSource],
    **fields: Any,
) -> pb.Dataset:
    """A new dataset's public record, at version 1 of its policy, with `fields` (sample_of,
    pricing, derived_from...): its files by position, size and sha256, never where they are."""
    dataset = pb.Dataset(
        name=f"datasets/{dataset_id}",
        did=assets.did(dataset_id),
        publisher=publisher,
        metadata=metadata,
        files=public_files(files),
        policy=policy,
        policy_version=1,
        **fields,
    )
    dataset.create_time.GetCurrentTime()
    return dataset


def public_files(sources: Sequence[FileSource]) -> list[pb.DatasetFile]:
    """What anyone may see of the files: position, size and sha256, never where they are."""
    return [
        pb.DatasetFile(index=i, size_bytes=s.size, sha256=s.sha256) for i, s in enumerate(sources)
    ]
