"""Dataset files that are local paths, S3 objects or HTTP(S) URLs: published side by side in
order; refused, when malformed, naming the field and never the value; never shown by the
registry, the audit log or the Provider's log; bound by the request's signature; kept across
a store from before remote files; and handed to the engine as DatasetFileSource entries, for
jobs and for an owner's sample runs alike."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import rfc8785
import structlog
from c2d.engine.v1 import engine_pb2
from c2d.provider.v1 import provider_pb2 as pb
from grpc_status import rpc_status

from mesh.digests import digest_for
from provider.config import ProviderConfig
from provider.server import Provider
from provider.server import build as build_provider
from provider.sources import FileSource
from provider.store import ProviderStore
from sdk.client import Client, remote_file
from sdk.keys import Key
from tests.conftest import LocalMesh, needs_root, new_key
from tests.e2e.test_hostile import log_of
from tests.e2e.test_job import error_info, run_to_end
from tests.pods.http_source import HttpSource
from tests.s3_server import S3Server

# Part of every location and credential name these tests give, so that any echo shows.
MARKER = "secretlocation7f3"
LOCAL = b"local,1\nlocal,2\n"
S3_CONTENT = b"s3,1\ns3,2\ns3,3\n"
HTTP_CONTENT = b"http,1\n"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class LoneProvider:
    """A Provider with no Operator Service behind it: enough for publishing and reading the
    registry, which never reach one."""

    provider: Provider
    data_root: Path
    owner: Key

    def client(self, key: Key) -> Client:
        return Client(self.provider.server.address, key)

    def data_file(self, name: str, content: bytes) -> Path:
        path = self.data_root / name
        path.write_bytes(content)
        path.chmod(0o644)
        return path


@pytest.fixture
async def lone_provider(tmp_path: Path) -> AsyncIterator[LoneProvider]:
    data_root = tmp_path / "data"
    data_root.mkdir()
    owner = new_key()
    provider = await build_provider(
        ProviderConfig(
            listen="127.0.0.1:0",
            operator_address=f"unix:{tmp_path / 'no-operator.sock'}",
            database=tmp_path / "provider" / "provider.db",
            data_root=data_root,
            owners=frozenset({owner.address}),
        )
    )
    await provider.server.start()
    try:
        yield LoneProvider(provider, data_root, owner)
    finally:
        await provider.server.stop(0.5)
        await provider.close()


async def publish_raw(client: Client, request: pb.PublishDatasetRequest) -> pb.Dataset:
    """PublishDataset as any client may send it, past the SDK's own checks."""
    response = await client.stub.PublishDataset(
        request, metadata=client.signature_metadata("PublishDataset", request), timeout=30
    )
    dataset: pb.Dataset = response.dataset
    return dataset


async def refusal(client: Client, request: pb.PublishDatasetRequest) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await publish_raw(client, request)
    return caught.value


def leaks(message: Any, *secrets: str) -> list[str]:
    """Which of `secrets` appear in the message's wire form."""
    wire = message.SerializeToString()
    return [s for s in secrets if s.encode() in wire]


# -- publishing ------------------------------------------------------------------------------


async def test_local_s3_and_http_files_are_published_in_order_and_never_shown(
    lone_provider: LoneProvider,
) -> None:
    local = lone_provider.data_file(f"{MARKER}-local.csv", LOCAL)
    s3_url = f"s3://{MARKER}-bucket/visits/{MARKER}.csv"
    http_url = f"https://{MARKER}.example.org/codes.csv?version=3"
    files: list[Path | pb.DatasetFileLocation] = [
        local,
        remote_file(
            s3_url,
            size_bytes=len(S3_CONTENT),
            sha256=sha256(S3_CONTENT),
            credentials=f"{MARKER}-lake",
        ),
        remote_file(http_url, size_bytes=len(HTTP_CONTENT), sha256=sha256(HTTP_CONTENT)),
    ]
    secrets = [MARKER, str(local), s3_url, http_url]
    request_id = uuid.uuid4().hex
    async with (
        lone_provider.client(lone_provider.owner) as owner,
        lone_provider.client(new_key()) as stranger,
    ):
        with structlog.testing.capture_logs() as logs:
            dataset = await owner.publish_dataset(files=files, request_id=request_id)
        # Local files measured by the Provider, remote ones as the owner declared them.
        assert [(f.index, f.size_bytes, f.sha256) for f in dataset.files] == [
            (0, len(LOCAL), sha256(LOCAL)),
            (1, len(S3_CONTENT), sha256(S3_CONTENT)),
            (2, len(HTTP_CONTENT), sha256(HTTP_CONTENT)),
        ]
        # A retry with the same request id is the same dataset, not another one.
        again = await owner.publish_dataset(files=files, request_id=request_id)
        assert again == dataset
        # A sample of remote files only.
        sample = await owner.publish_dataset(
            files=[remote_file(http_url, size_bytes=1, sha256="0" * 64)],
            sample_of=dataset.name,
        )

        shown = await stranger.get_dataset(dataset.did)
        assert shown.sample == sample.name
        listed = await stranger.stub.ListDatasets(pb.ListDatasetsRequest(), timeout=30)
        assert [d.name for d in listed.datasets] == [dataset.name, sample.name]
        audit = await owner.stub.ListAuditEvents(
            pb.ListAuditEventsRequest(), metadata=await owner.token_metadata(), timeout=30
        )
    for message in (dataset, shown, listed, audit):
        assert leaks(message, *secrets) == [], type(message).__name__
    assert any(line["event"] == "dataset published" for line in logs), logs
    assert not [s for s in secrets if s in json.dumps(logs, default=str)]
    [published, _] = [e for e in audit.events if e.action == "dataset.publish"]
    assert dict(published.details) == {
        "policy_version": 1,
        "files": 3,
        "remote_files": 2,
        "sample_of": "",
        "datatoken": "",
    }

    # Where the files are stays in the store, for the engine.
    found = await lone_provider.provider.store.dataset(dataset.name.removeprefix("datasets/"))
    assert found is not None
    assert found[1] == [
        FileSource("path", str(local.resolve()), len(LOCAL), sha256(LOCAL)),
        FileSource("s3_url", s3_url, len(S3_CONTENT), sha256(S3_CONTENT), f"{MARKER}-lake"),
        FileSource("http_url", http_url, len(HTTP_CONTENT), sha256(HTTP_CONTENT)),
    ]


GOOD_SHA = "ab" * 32


def remote(url: str, **fields: Any) -> pb.DatasetFileLocation:
    fields.setdefault("size_bytes", 10)
    fields.setdefault("sha256", GOOD_SHA)
    return pb.DatasetFileLocation(url=url, **fields)


def files_request(*locations: pb.DatasetFileLocation, **fields: Any) -> pb.PublishDatasetRequest:
    return pb.PublishDatasetRequest(request_id=uuid.uuid4().hex, files=locations, **fields)


def malformed(data_root: Path) -> Iterator[tuple[str, pb.PublishDatasetRequest, str]]:
    """(what is wrong, the request, the field the refusal names)."""
    ok = remote(f"https://{MARKER}.example.org/ok.csv")
    local = str(data_root / f"{MARKER}.csv")
    yield "both forms", files_request(ok, file_paths=[local]), "files"
    yield "no files", files_request(), "files"
    yield "1001 files", files_request(*[ok] * 1001), "files"
    yield "1001 paths", pb.PublishDatasetRequest(file_paths=[local] * 1001), "file_paths"
    yield (
        "path and url",
        files_request(ok, pb.DatasetFileLocation(path=local, url=ok.url)),
        ("files[1]"),
    )
    yield "neither", files_request(ok, pb.DatasetFileLocation(size_bytes=3)), "files[1]"
    for what, url in [
        ("ftp", f"ftp://{MARKER}.example.org/x.csv"),
        ("file", f"file:///srv/{MARKER}.csv"),
        ("no scheme", f"{MARKER}.example.org/x.csv"),
        ("userinfo", f"https://reader:{MARKER}@data.example.org/x.csv"),
        ("user only", f"http://{MARKER}@data.example.org/x.csv"),
        ("s3 userinfo", f"s3://key:{MARKER}@bucket/x.csv"),
        ("fragment", f"https://data.example.org/x.csv#{MARKER}"),
        ("no host", f"http:///{MARKER}.csv"),
        ("bad port", f"http://data.example.org:99999/{MARKER}.csv"),
        ("control", f"https://data.example.org/{MARKER}\n.csv"),
        ("space", f"https://data.example.org/{MARKER} x.csv"),
        ("too long", f"https://data.example.org/{MARKER}{'x' * 4100}"),
        ("bad bucket", f"s3://{MARKER.upper()}/x.csv"),
        ("bucket only", f"s3://{MARKER}-bucket"),
        ("prefix", f"s3://{MARKER}-bucket/folder/"),
        ("s3 query", f"s3://{MARKER}-bucket/x.csv?versionId=1"),
    ]:
        yield f"url: {what}", files_request(remote(url)), "files[0].url"
    for what, location, field in [
        ("no size", remote(ok.url, size_bytes=0), "size_bytes"),
        ("negative size", remote(ok.url, size_bytes=-5), "size_bytes"),
        ("no sha256", remote(ok.url, sha256=""), "sha256"),
        ("upper sha256", remote(ok.url, sha256=GOOD_SHA.upper()), "sha256"),
        ("short sha256", remote(ok.url, sha256=GOOD_SHA[:-1]), "sha256"),
        ("credentials space", remote(ok.url, credentials=f"{MARKER} x"), "credentials"),
        ("credentials dash", remote(ok.url, credentials=f"-{MARKER}"), "credentials"),
        ("credentials long", remote(ok.url, credentials=MARKER * 5), "credentials"),
        ("local sha256", pb.DatasetFileLocation(path=local, sha256=GOOD_SHA), "sha256"),
        ("local size", pb.DatasetFileLocation(path=local, size_bytes=3), "size_bytes"),
        ("local credentials", pb.DatasetFileLocation(path=local, credentials="x"), "credentials"),
    ]:
        yield what, files_request(ok, location), f"files[1].{field}"
    yield "outside", files_request(pb.DatasetFileLocation(path=f"/etc/{MARKER}")), "files[0].path"
    yield "missing", files_request(ok, pb.DatasetFileLocation(path=local)), "files[1].path"


async def test_malformed_files_are_refused_naming_the_field_never_the_value(
    lone_provider: LoneProvider,
) -> None:
    async with lone_provider.client(lone_provider.owner) as owner:
        for what, request, field in malformed(lone_provider.data_root):
            error = await refusal(owner, request)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (what, error.details())
            assert error_info(error).metadata["field"] == field, (what, error.details())
            status = rpc_status.from_call(error)  # type: ignore[arg-type]
            assert status is not None
            assert leaks(status, MARKER, MARKER.upper()) == [], (what, error.details())
        listed = await owner.stub.ListDatasets(pb.ListDatasetsRequest(), timeout=30)
    assert list(listed.datasets) == []


def test_the_digest_is_the_documented_list() -> None:
    request = pb.PublishDatasetRequest(
        request_id="r1",
        metadata=pb.AssetMetadata(title="t", tags=["a"]),
        files=[
            pb.DatasetFileLocation(path="/data/a.csv"),
            remote("s3://lake/b.csv", size_bytes=12, credentials="lake"),
        ],
        sample_of="datasets/" + "c" * 64,
    )
    documented: list[Any] = [
        "r1",
        ["t", "", "", "", ["a"]],
        [],
        [["/data/a.csv", "", "", 0, ""], ["", "s3://lake/b.csv", "lake", 12, GOOD_SHA]],
        [False, False, 0, [], [], [], False],
        "datasets/" + "c" * 64,
        ["", 0, ""],
    ]
    assert digest_for("PublishDataset", request) == sha256(rfc8785.dumps(documented))


@pytest.mark.parametrize("field", ["path", "url", "credentials", "size_bytes", "sha256"])
async def test_the_signature_binds_each_file(lone_provider: LoneProvider, field: str) -> None:
    local = str(lone_provider.data_file("a.csv", LOCAL))
    signed = files_request(
        pb.DatasetFileLocation(path=local), remote("https://data.example.org/b.csv")
    )
    sent = pb.PublishDatasetRequest()
    sent.CopyFrom(signed)
    index = 0 if field == "path" else 1
    changes: dict[str, Any] = {
        "path": local + ".other",
        "url": "https://other.example.org/b.csv",
        "credentials": "someone-else",
        "size_bytes": 11,
        "sha256": "cd" * 32,
    }
    setattr(sent.files[index], field, changes[field])
    async with lone_provider.client(lone_provider.owner) as owner:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await owner.stub.PublishDataset(
                sent, metadata=owner.signature_metadata("PublishDataset", signed), timeout=30
            )
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Signed over what it says, the same request is published.
        assert len((await publish_raw(owner, signed)).files) == 2


# -- the store -------------------------------------------------------------------------------

# The datasets table as it was before remote files: paths only.
_PATHS_ONLY_SCHEMA = """
CREATE TABLE datasets (
    id TEXT PRIMARY KEY, seq INTEGER NOT NULL,
    record BLOB NOT NULL,
    file_paths TEXT NOT NULL,
    sample_of TEXT
);
"""


async def test_a_store_from_before_remote_files_keeps_its_paths(tmp_path: Path) -> None:
    database = tmp_path / "provider" / "provider.db"
    database.parent.mkdir(mode=0o700)
    record = pb.Dataset(
        name="datasets/" + "a" * 64,
        files=[
            pb.DatasetFile(index=0, size_bytes=4, sha256="1" * 64),
            pb.DatasetFile(index=1, size_bytes=5, sha256="2" * 64),
        ],
        policy_version=1,
    )
    old = sqlite3.connect(database)
    old.executescript(_PATHS_ONLY_SCHEMA)
    old.execute(
        "INSERT INTO datasets VALUES (?, 1, ?, ?, NULL)",
        ("a" * 64, record.SerializeToString(), json.dumps(["/data/x.csv", "/data/y.csv"])),
    )
    old.commit()
    old.close()

    expected = [
        FileSource("path", "/data/x.csv", 4, "1" * 64),
        FileSource("path", "/data/y.csv", 5, "2" * 64),
    ]
    for _ in range(2):  # opening it again changes nothing more
        store = await ProviderStore.open(database)
        try:
            found = await store.dataset("a" * 64)
            assert found is not None and found[0] == record and found[1] == expected
            columns = {row[1] for row in store.db.execute("PRAGMA table_info(datasets)")}
            assert "file_paths" not in columns
        finally:
            await store.close()
    assert [f.to_engine() for f in expected] == [
        engine_pb2.DatasetFileSource(path="/data/x.csv", size_bytes=4, sha256="1" * 64),
        engine_pb2.DatasetFileSource(path="/data/y.csv", size_bytes=5, sha256="2" * 64),
    ]


# -- what the engine receives ----------------------------------------------------------------


def engine_spec(mesh: LocalMesh, job_name: str) -> engine_pb2.JobSpec:
    """The job spec the Operator Service keeps and hands to the engine, as it stored it."""
    db = sqlite3.connect(mesh.home / "operator" / "operator.db")
    try:
        row = db.execute(
            "SELECT spec FROM jobs WHERE id = ?", (job_name.removeprefix("jobs/"),)
        ).fetchone()
    finally:
        db.close()
    assert row is not None, f"the Operator Service has no {job_name}"
    return engine_pb2.JobSpec.FromString(row[0])


READ_ALL = b"""
import json, os
dataset = json.loads(os.environ["DIDS"])[0]
for name in sorted(os.listdir(f"/data/inputs/{dataset}")):
    print(name, len(open(f"/data/inputs/{dataset}/{name}", "rb").read()))
"""


@needs_root
async def test_jobs_and_sample_runs_get_each_file_where_it_is(
    local_mesh: LocalMesh,
    s3_server: S3Server,
    s3_bucket: str,
    http_source: HttpSource,
) -> None:
    s3_server.put_object(s3_bucket, "in/visits.csv", S3_CONTENT)
    local = local_mesh.data_file("mixed/local.csv", LOCAL)
    s3_url = f"s3://{s3_bucket}/in/visits.csv"
    http_url = http_source.serve("codes.csv", HTTP_CONTENT)
    sample_url = http_source.serve("codes-sample.csv", HTTP_CONTENT[:3])
    async with (
        local_mesh.client(local_mesh.owner) as owner,
        local_mesh.client(new_key()) as consumer,
    ):
        algorithm = await consumer.publish_algorithm(READ_ALL, "python3 $ALGO")
        trusted = await owner.trust(algorithm.did)
        dataset = await owner.publish_dataset(
            files=[
                local,
                remote_file(
                    s3_url,
                    size_bytes=len(S3_CONTENT),
                    sha256=sha256(S3_CONTENT),
                    credentials="lake",
                ),
                remote_file(http_url, size_bytes=len(HTTP_CONTENT), sha256=sha256(HTTP_CONTENT)),
            ],
            policy=pb.ComputePolicy(publisher_trusted_algorithms=[trusted]),
        )
        sample = await owner.publish_dataset(
            files=[remote_file(sample_url, size_bytes=3, sha256=sha256(HTTP_CONTENT[:3]))],
            sample_of=dataset.name,
        )
        job = await consumer.start_compute([dataset.did], algorithm=algorithm.did)
        # The sample run of an approval request goes through the same launch.
        untrusted = await consumer.publish_algorithm(READ_ALL + b"\n", "python3 $ALGO")
        asked = await consumer.create_approval_request(dataset.did, untrusted.did)
        sample_job = await owner.run_approval_sample(asked.name)

        [given] = engine_spec(local_mesh, job.name).datasets
        assert given.id == dataset.name.removeprefix("datasets/")
        assert list(given.files) == [
            engine_pb2.DatasetFileSource(
                path=str(local.resolve()), size_bytes=len(LOCAL), sha256=sha256(LOCAL)
            ),
            engine_pb2.DatasetFileSource(
                s3_url=s3_url,
                credentials="lake",
                size_bytes=len(S3_CONTENT),
                sha256=sha256(S3_CONTENT),
            ),
            engine_pb2.DatasetFileSource(
                http_url=http_url, size_bytes=len(HTTP_CONTENT), sha256=sha256(HTTP_CONTENT)
            ),
        ]
        [sampled] = engine_spec(local_mesh, sample_job.name).datasets
        assert sampled.id == sample.name.removeprefix("datasets/")
        assert list(sampled.files) == [
            engine_pb2.DatasetFileSource(
                http_url=sample_url, size_bytes=3, sha256=sha256(HTTP_CONTENT[:3])
            )
        ]
        # What the job itself sees of its dataset never says where the files are.
        ddo = json.loads(given.ddo_json)
        assert s3_bucket not in given.ddo_json and "127.0.0.1" not in given.ddo_json
        assert ddo["did"] == dataset.did
        # The engine takes these sources as they are: the sample run fetches its file over
        # HTTP and reads it. (The job itself names a credential no engine here has.) Neither
        # job's message says where a file is.
        _, sampled_final = await run_to_end(owner, sample_job)
        assert sampled_final.state == sampled_final.STATE_SUCCEEDED, sampled_final.message
        assert await log_of(owner, sampled_final) == "0 3\n"
        _, final = await run_to_end(consumer, job)
        assert final.state in (final.STATE_SUCCEEDED, final.STATE_FAILED), final.message
        for ended in (final, sampled_final):
            assert not [s for s in (str(local), s3_url, http_url, sample_url) if s in ended.message]
