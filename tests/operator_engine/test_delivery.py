"""Delivery of a job's results to the consumer's own storage. The consumer's bucket is moto's
S3 server on 127.0.0.1 (a bucket of its own, with keys of its own; moto accepts presigned PUT
URLs made by a boto client against it), the node's storage a real one on disk, and the jobs
run in real sandboxes behind a real Operator Service.

Covered: S3 and upload-URL deliveries checked byte for byte in the consumer's bucket; a copy
that does not match its recorded sha256 never lands there; refused credentials, a dead
endpoint, a silent one and a refused destination end the delivery FAILED with a message that
names neither a secret nor a URL, while the job keeps its own outcome and its results; a large
result goes multipart without being held in memory; the engine refuses malformed deliveries
and selections at RunJob; a job shows its delivery PENDING until its final state carries the
outcome; secrets never reach a file; and a job picked up after an engine restart has no
secrets, so its delivery fails saying so."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import io
import socket
import subprocess
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import structlog
from c2d.common.v1 import job_pb2
from c2d.engine.v1 import engine_pb2

from mesh import delivery as rules
from mesh import jobs as job_facts
from mesh.errors import InvalidArgument, PermissionDenied
from mesh.storage import LocalStorage, Storage
from operator_engine import delivery
from operator_engine.config import DeliverySettings, EnvironmentSpec
from operator_engine.jobs import check_delivery, new_job
from tests.conftest import needs_root
from tests.operator_service.node import error_info, running_node
from tests.s3_server import REGION, S3Server, dead_endpoint

MIB = 1 << 20
Kind = job_pb2.ResultFile
Status = job_pb2.DeliveryStatus
State = job_pb2.Job.State
# The consumer's own keys: distinct from the node's, and searched for on disk afterwards.
CONSUMER_KEY_ID = "consumer-key-id-7f3a"
CONSUMER_SECRET = "consumer-secret-9c1e-never-on-disk"
CONSUMER_TOKEN = "consumer-session-token-55aa"
LOOPBACK = frozenset({"127.0.0.1"})
QUICK = DeliverySettings(
    allow_hosts=LOOPBACK, timeout_s=30, connect_timeout_s=2, read_timeout_s=5, attempts=2
)


# -- helpers -------------------------------------------------------------------------------


@dataclasses.dataclass
class Stored:
    storage: Storage
    job_id: str
    results: list[job_pb2.ResultFile]
    content: dict[str, bytes]


async def store(storage: Storage, files: Sequence[tuple[str, int, bytes]]) -> Stored:
    """Results as the publish stage leaves them: stored by index, listed with size and sha256."""
    job_id = job_facts.new_job_id()
    results = []
    for index, (name, kind, data) in enumerate(files):
        kept = await storage.put(job_id, f"{index:04d}", io.BytesIO(data))
        results.append(
            job_pb2.ResultFile(
                index=index, name=name, kind=kind, size_bytes=kept.size, sha256=kept.sha256
            )
        )
    return Stored(storage, job_id, results, {name: data for name, _, data in files})


def typical(storage: Storage) -> Any:
    return store(
        storage,
        [
            ("answer.txt", Kind.KIND_OUTPUT, b"42\n"),
            ("tables/mean.csv", Kind.KIND_OUTPUT, b"mean\n2.0\n"),
            ("algorithm.log", Kind.KIND_ALGORITHM_LOG, b"computing\ndone\n"),
            ("configuration.log", Kind.KIND_CONFIGURATION_LOG, b"configure succeeded\n"),
            ("publish.log", Kind.KIND_PUBLISH_LOG, b"published 4 results\n"),
        ],
    )


def s3_target(endpoint: str, bucket: str, prefix: str = "deliveries/") -> job_pb2.ResultDelivery:
    return job_pb2.ResultDelivery(
        s3=job_pb2.S3Delivery(
            endpoint=endpoint,
            region=REGION,
            bucket=bucket,
            prefix=prefix,
            access_key_id=CONSUMER_KEY_ID,
            secret_access_key=CONSUMER_SECRET,
            session_token=CONSUMER_TOKEN,
        )
    )


def signature(url: str) -> str:
    return url.split("X-Amz-Signature=", 1)[1].split("&", 1)[0]


def assert_no_secret(text: str, *secrets: str) -> None:
    for secret in (CONSUMER_SECRET, CONSUMER_TOKEN, *secrets):
        assert secret not in text


@pytest.fixture
def node_storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "node-results")


# -- S3 ------------------------------------------------------------------------------------


async def test_s3_delivery_of_outputs_and_logs(
    node_storage: LocalStorage, s3_server: S3Server, s3_bucket: str
) -> None:
    stored = await typical(node_storage)
    target = s3_target(s3_server.endpoint_url, s3_bucket)
    with structlog.testing.capture_logs() as logs:
        status = await delivery.deliver(node_storage, stored.job_id, stored.results, target, QUICK)
    assert status.state == Status.STATE_DELIVERED, status.message
    assert status.delivered_count == 5
    assert status.message == ""
    host = s3_server.endpoint_url.removeprefix("http://")
    assert status.destination == f"s3://{s3_bucket}/deliveries/{stored.job_id}/ at {host}"
    found = s3_server.objects(s3_bucket)
    assert found == {f"deliveries/{stored.job_id}/{n}": d for n, d in stored.content.items()}
    # Each object says its sha256, as the job lists it.
    client = s3_server.client()
    try:
        for result in stored.results:
            head = client.head_object(
                Bucket=s3_bucket, Key=f"deliveries/{stored.job_id}/{result.name}"
            )
            assert head["Metadata"]["c2d-sha256"] == result.sha256
            assert hashlib.sha256(stored.content[result.name]).hexdigest() == result.sha256
    finally:
        client.close()
    assert {entry["job_id"] for entry in logs} == {stored.job_id}
    assert_no_secret(repr(logs), CONSUMER_KEY_ID)


class Watched(LocalStorage):
    """The node's storage, noting how much memory Python holds at each chunk read back."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.held: list[int] = []

    async def read(
        self, job_id: str, key: str, offset: int = 0, chunk_size: int = MIB
    ) -> AsyncIterator[bytes]:
        async for chunk in super().read(job_id, key, offset, chunk_size):
            self.held.append(tracemalloc.get_traced_memory()[0])
            yield chunk


async def test_a_large_result_goes_multipart_without_being_held_in_memory(
    tmp_path: Path,
) -> None:
    storage = Watched(tmp_path / "node-results")
    size = 24 * MIB
    data = hashlib.sha256(b"seed").digest() * (size // 32)
    stored = await store(storage, [("model.bin", Kind.KIND_OUTPUT, data)])
    del data
    settings = dataclasses.replace(QUICK, part_size=5 * MIB)
    # The consumer's S3 in a process of its own, so that what it holds is not counted here.
    with moto_process() as endpoint:
        s3 = S3Server(endpoint)
        bucket = s3.create_bucket()
        tracemalloc.start()
        try:
            status = await delivery.deliver(
                storage, stored.job_id, stored.results, s3_target(endpoint, bucket, ""), settings
            )
        finally:
            tracemalloc.stop()
        assert status.state == Status.STATE_DELIVERED, status.message
        client = s3.client()
        try:
            key = f"{stored.job_id}/model.bin"
            head = client.head_object(Bucket=bucket, Key=key)
            # A multipart object's ETag ends with its number of parts.
            assert head["ETag"].strip('"').endswith("-5")
            body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
            assert hashlib.sha256(body).hexdigest() == stored.results[0].sha256
        finally:
            client.close()
    # While it streamed (the S3 client made already), about one part was held, never the file.
    assert len(storage.held) == 24
    growth = max(storage.held) - storage.held[0]
    assert growth < 2 * settings.part_size, f"{growth / MIB:.1f} MiB held"


@contextlib.contextmanager
def moto_process() -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"{endpoint}/moto-api/", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.1)
        yield endpoint
    finally:
        process.terminate()
        process.wait(10)


async def test_a_copy_that_does_not_match_its_record_never_lands(
    node_storage: LocalStorage, s3_server: S3Server, s3_bucket: str
) -> None:
    stored = await store(
        node_storage,
        [
            ("small.txt", Kind.KIND_OUTPUT, b"small"),
            ("large.bin", Kind.KIND_OUTPUT, b"L" * (6 * MIB)),
            ("fine.txt", Kind.KIND_OUTPUT, b"fine"),
        ],
    )
    # The node's copies changed since they were recorded (a disk error, tampering).
    stored.results[0].sha256 = "0" * 64
    stored.results[1].sha256 = "1" * 64
    settings = dataclasses.replace(QUICK, part_size=5 * MIB)
    status = await delivery.deliver(
        node_storage,
        stored.job_id,
        stored.results,
        s3_target(s3_server.endpoint_url, s3_bucket, ""),
        settings,
    )
    assert status.state == Status.STATE_FAILED
    assert status.delivered_count == 1
    assert "small.txt (its stored copy does not match its recorded size and sha256)" in (
        status.message
    )
    assert "large.bin (its stored copy" in status.message
    assert set(s3_server.objects(s3_bucket)) == {f"{stored.job_id}/fine.txt"}
    # The multipart upload was aborted: no part is left in the bucket.
    client = s3_server.client()
    try:
        assert client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    finally:
        client.close()


async def test_refused_credentials_fail_the_delivery_without_naming_them(
    node_storage: LocalStorage, s3_server: S3Server, s3_bucket: str
) -> None:
    from moto.core.authorization import enable_iam_authentication

    stored = await typical(node_storage)
    target = s3_target(s3_server.endpoint_url, s3_bucket)
    # moto checks keys only when asked to; this consumer's keys are then unknown to it.
    with enable_iam_authentication(), structlog.testing.capture_logs() as logs:
        status = await delivery.deliver(node_storage, stored.job_id, stored.results, target, QUICK)
    assert status.state == Status.STATE_FAILED
    assert status.delivered_count == 0
    assert "answer.txt (the S3 destination refused it (InvalidAccessKeyId))" in status.message
    assert "delivered 0 of 5 results" in status.message
    for text in (status.message, status.destination, repr(logs)):
        assert_no_secret(text, CONSUMER_KEY_ID, s3_server.endpoint_url)
    assert s3_server.objects(s3_bucket) == {}


async def test_a_dead_endpoint_fails_quickly_and_stops_trying(
    node_storage: LocalStorage,
) -> None:
    stored = await typical(node_storage)
    endpoint = dead_endpoint()
    started = time.monotonic()
    status = await delivery.deliver(
        node_storage, stored.job_id, stored.results, s3_target(endpoint, "consumer-bucket"), QUICK
    )
    assert time.monotonic() - started < 15
    assert status.state == Status.STATE_FAILED
    assert "answer.txt (the S3 destination could not be reached (EndpointConnectionError))" in (
        status.message
    )
    # One destination: once unreachable, the rest is not tried.
    assert "not tried: tables/mean.csv, algorithm.log, configuration.log, publish.log" in (
        status.message
    )
    assert endpoint.removeprefix("http://") not in status.message


# -- upload URLs ---------------------------------------------------------------------------


async def test_upload_urls_deliver_the_named_results_and_report_the_rest(
    node_storage: LocalStorage, s3_server: S3Server, s3_bucket: str
) -> None:
    stored = await typical(node_storage)
    urls = {
        "answer.txt": s3_server.presigned_put(
            s3_bucket, "mine/answer", CONSUMER_KEY_ID, CONSUMER_SECRET
        ),
        "algorithm.log": s3_server.presigned_put(
            s3_bucket, "mine/log", CONSUMER_KEY_ID, CONSUMER_SECRET
        ),
        "missing.csv": s3_server.presigned_put(
            s3_bucket, "mine/missing", CONSUMER_KEY_ID, CONSUMER_SECRET
        ),
    }
    target = job_pb2.ResultDelivery(upload_urls=job_pb2.UploadUrls(urls=urls))
    with structlog.testing.capture_logs() as logs:
        status = await delivery.deliver(node_storage, stored.job_id, stored.results, target, QUICK)
    assert status.state == Status.STATE_DELIVERED, status.message
    assert status.delivered_count == 2
    assert status.destination == "upload URLs (3)"
    assert status.message == (
        "kept results without an upload URL, not delivered: tables/mean.csv, configuration.log, "
        "publish.log; upload URLs naming no result of the job: missing.csv"
    )
    assert s3_server.objects(s3_bucket) == {
        "mine/answer": b"42\n",
        "mine/log": b"computing\ndone\n",
    }
    for url in urls.values():
        assert_no_secret(repr(logs), url, signature(url))


async def test_an_upload_url_that_refuses_fails_with_its_status_only(
    node_storage: LocalStorage, s3_server: S3Server, s3_bucket: str
) -> None:
    stored = await typical(node_storage)
    good = s3_server.presigned_put(s3_bucket, "ok", CONSUMER_KEY_ID, CONSUMER_SECRET)
    gone = s3_server.presigned_put("no-such-bucket-anywhere", "x", CONSUMER_KEY_ID, CONSUMER_SECRET)
    target = job_pb2.ResultDelivery(
        upload_urls=job_pb2.UploadUrls(urls={"answer.txt": gone, "publish.log": good})
    )
    status = await delivery.deliver(node_storage, stored.job_id, stored.results, target, QUICK)
    assert status.state == Status.STATE_FAILED
    assert status.delivered_count == 1
    assert "answer.txt (its upload URL refused it (HTTP 404))" in status.message
    assert "delivered 1 of 2 results" in status.message
    assert_no_secret(status.message, gone, signature(gone), "no-such-bucket")
    assert s3_server.objects(s3_bucket) == {"ok": b"published 4 results\n"}


async def test_a_silent_destination_is_cut_off_by_the_deadline(
    node_storage: LocalStorage, silent_server: str
) -> None:
    stored = await typical(node_storage)
    url = f"{silent_server}/upload?X-Amz-Signature=abc123"
    target = job_pb2.ResultDelivery(
        upload_urls=job_pb2.UploadUrls(urls={"answer.txt": url, "publish.log": url})
    )
    settings = dataclasses.replace(QUICK, timeout_s=1.5, read_timeout_s=10)
    started = time.monotonic()
    status = await delivery.deliver(node_storage, stored.job_id, stored.results, target, settings)
    assert time.monotonic() - started < 5
    assert status.state == Status.STATE_FAILED
    assert "answer.txt (cut off: the delivery may take at most 1.5 s)" in status.message
    assert "not tried: publish.log" in status.message
    assert_no_secret(status.message, url, "abc123")


async def test_an_upload_url_sees_the_content_length_and_no_cut_copy(
    node_storage: LocalStorage,
) -> None:
    stored = await store(node_storage, [("data.bin", Kind.KIND_OUTPUT, b"d" * (3 * MIB + 5))])
    stored.results[0].sha256 = "f" * 64  # the stored copy no longer matches its record
    received: list[tuple[str | None, int]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        headers = dict(scope["headers"])
        got = 0
        while True:
            message = await receive()
            got += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        received.append((headers.get(b"content-length", b"").decode() or None, got))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async with asgi_server(app) as url:
        target = job_pb2.ResultDelivery(
            upload_urls=job_pb2.UploadUrls(urls={"data.bin": f"{url}/put"})
        )
        status = await delivery.deliver(node_storage, stored.job_id, stored.results, target, QUICK)
        await asyncio.sleep(0.2)
    assert status.state == Status.STATE_FAILED
    assert "data.bin (its stored copy does not match" in status.message
    # Announced whole, never sent whole: the server never completes this upload.
    assert all(length == str(3 * MIB + 5) and got < 3 * MIB + 5 for length, got in received)


@contextlib.asynccontextmanager
async def asgi_server(app: Any) -> AsyncIterator[str]:
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error", lifespan="off")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


# -- destinations refused at delivery time --------------------------------------------------


async def test_a_destination_the_node_does_not_allow_is_refused_before_connecting(
    node_storage: LocalStorage, s3_server: S3Server, s3_bucket: str
) -> None:
    stored = await typical(node_storage)
    nobody = dataclasses.replace(QUICK, allow_hosts=frozenset())
    plain = s3_target(s3_server.endpoint_url, s3_bucket)
    status = await delivery.deliver(node_storage, stored.job_id, stored.results, plain, nobody)
    assert status.state == Status.STATE_FAILED
    assert status.message.startswith("not delivered: the delivery destination is plain http://")
    assert "C2D_DELIVERY_ALLOW_HOSTS" in status.message
    # https to a private address (the node's loopback): refused as well.
    port = s3_server.endpoint_url.rsplit(":", 1)[1]
    private = job_pb2.ResultDelivery(
        upload_urls=job_pb2.UploadUrls(urls={"answer.txt": f"https://127.0.0.1:{port}/x"})
    )
    status = await delivery.deliver(node_storage, stored.job_id, stored.results, private, nobody)
    assert status.state == Status.STATE_FAILED
    assert "is not a public address" in status.message
    assert s3_server.objects(s3_bucket) == {}


async def test_a_name_is_resolved_by_the_engine_at_delivery_time(
    node_storage: LocalStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    stored = await typical(node_storage)
    resolved: dict[str, str] = {"consumer.example": "10.1.2.3"}

    def getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (resolved[host], port))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    target = job_pb2.ResultDelivery(
        upload_urls=job_pb2.UploadUrls(urls={"answer.txt": "https://consumer.example/up"})
    )
    status = await delivery.deliver(node_storage, stored.job_id, stored.results, target, QUICK)
    assert status.state == Status.STATE_FAILED
    assert "is not a public address" in status.message
    # The same name at a public address passes the check (checked alone: no connection).
    resolved["consumer.example"] = "93.184.216.34"
    rules.check_destination_blocking(target, frozenset())
    resolved["consumer.example"] = "169.254.169.254"
    with pytest.raises(PermissionDenied):
        rules.check_destination_blocking(target, frozenset())


async def test_a_stored_copy_has_no_secrets_and_is_not_delivered(
    node_storage: LocalStorage, s3_server: S3Server, s3_bucket: str
) -> None:
    stored = await typical(node_storage)
    kept = rules.without_secrets(s3_target(s3_server.endpoint_url, s3_bucket))
    status = await delivery.deliver(node_storage, stored.job_id, stored.results, kept, QUICK)
    assert status.state == Status.STATE_FAILED
    assert status.message == delivery.NO_SECRETS
    assert "never kept on disk" in status.message and "Provider" in status.message
    assert s3_server.objects(s3_bucket) == {}


# -- the engine ----------------------------------------------------------------------------


def spec_with(results: int = 0, target: job_pb2.ResultDelivery | None = None) -> engine_pb2.JobSpec:
    return engine_pb2.JobSpec(
        job_id=job_facts.new_job_id(),
        owner="0x" + "11" * 20,
        datasets=[engine_pb2.DatasetInput(id="d" * 64)],
        results=results,  # type: ignore[arg-type]
        delivery=target,
    )


def test_run_job_refuses_a_malformed_delivery_or_selection() -> None:
    environments = {"default": EnvironmentSpec()}
    target = s3_target("http://127.0.0.1:9", "Not_A_Bucket")
    with pytest.raises(InvalidArgument) as caught:
        new_job(spec_with(target=target), environments)
    assert caught.value.field == "spec.delivery.s3.bucket"
    assert CONSUMER_SECRET not in caught.value.message
    no_secret = s3_target("http://127.0.0.1:9", "bucket")
    no_secret.s3.access_key_id = ""
    with pytest.raises(InvalidArgument) as caught:
        new_job(spec_with(target=no_secret), environments)
    assert caught.value.field == "spec.delivery.s3.access_key_id"
    with pytest.raises(InvalidArgument) as caught:
        new_job(spec_with(results=9), environments)
    assert caught.value.field == "spec.results"
    urls = job_pb2.ResultDelivery(upload_urls=job_pb2.UploadUrls(urls={"../x": "https://a.b/"}))
    with pytest.raises(InvalidArgument) as caught:
        new_job(spec_with(target=urls), environments)
    assert caught.value.field == "spec.delivery.upload_urls.urls"


def test_a_job_shows_its_choice_and_its_delivery_pending_from_acceptance() -> None:
    target = s3_target("https://s3.example.org", "bucket", "out/")
    made = spec_with(job_pb2.RESULT_SELECTION_OUTPUTS, target)
    _, job = new_job(made, {"default": EnvironmentSpec()})
    assert job.result_selection == job_pb2.RESULT_SELECTION_OUTPUTS
    assert job.delivery == Status(
        state=Status.STATE_PENDING,
        destination=f"s3://bucket/out/{made.job_id}/ at s3.example.org",
    )
    assert_no_secret(str(job), CONSUMER_KEY_ID)
    _, plain = new_job(spec_with(), {"default": EnvironmentSpec()})
    assert not plain.HasField("delivery")
    # A stored copy, handed over again by the Operator Service, is accepted (it then fails).
    check_delivery(rules.without_secrets(target))
    urls = job_pb2.ResultDelivery(upload_urls=job_pb2.UploadUrls(urls={"a.txt": "https://x.y/"}))
    check_delivery(rules.without_secrets(urls))
    half = rules.without_secrets(target)
    half.s3.access_key_id = CONSUMER_KEY_ID
    with pytest.raises(InvalidArgument):
        check_delivery(half)


OUTPUT_CODE = b"""
with open("/data/outputs/answer.txt", "w") as f:
    f.write("42")
print("computed", flush=True)
"""
SLEEP_CODE = b"import time\nprint('holding the slot', flush=True)\ntime.sleep(60)\n"
ONE_SLOT = EnvironmentSpec(name="one", max_concurrent_jobs=1)


def files_holding(root: Path, *needles: str) -> list[str]:
    """Every file under `root` (the node's databases and their journals, job state, specs,
    results, logs) holding a needle."""
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                data = path.read_bytes()
            except OSError:
                continue
            found += [f"{path}: {n}" for n in needles if n.encode() in data]
    return found


@needs_root
@pytest.mark.timeout(120)
async def test_a_job_delivers_before_its_final_state_and_keeps_no_secret(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str
) -> None:
    home = tmp_path / "home"
    async with running_node(home, delivery=QUICK) as node:
        owner = "0x" + "22" * 20
        made = node.spec(owner, OUTPUT_CODE)
        made.results = job_pb2.RESULT_SELECTION_OUTPUTS
        made.delivery.CopyFrom(s3_target(s3_server.endpoint_url, s3_bucket, "jobs/"))
        accepted = await node.create(made)
        assert accepted.delivery.state == Status.STATE_PENDING
        assert accepted.result_selection == job_pb2.RESULT_SELECTION_OUTPUTS
        seen = await node.watch_to_end(made.job_id, owner)
        final = seen[-1]
        assert final.state == State.STATE_SUCCEEDED, final.message
        # Every form before the final one says PENDING; the final one has the outcome.
        assert all(j.delivery.state == Status.STATE_PENDING for j in seen[:-1])
        assert final.delivery.state == Status.STATE_DELIVERED, final.delivery.message
        assert [r.name for r in final.results] == ["answer.txt", "publish.log"]
        assert final.delivery.delivered_count == 2
        found = s3_server.objects(s3_bucket)
        assert found[f"jobs/{made.job_id}/answer.txt"] == b"42"
        assert set(found) == {f"jobs/{made.job_id}/answer.txt", f"jobs/{made.job_id}/publish.log"}
        publish_log = found[f"jobs/{made.job_id}/publish.log"].decode()
        assert "algorithm.log: not stored, the consumer asked for outputs only" in publish_log
        workspace = node.config.workspace_root / made.job_id
    # Once the job is cleaned up (the engine has stopped), its spec keeps no delivery at all.
    assert not engine_pb2.JobSpec.FromString((workspace / "spec.pb").read_bytes()).HasField(
        "delivery"
    )
    assert files_holding(home, CONSUMER_SECRET, CONSUMER_TOKEN) == []


@needs_root
@pytest.mark.timeout(120)
async def test_a_failed_delivery_leaves_the_job_and_its_results_alone(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str
) -> None:
    from moto.core.authorization import enable_iam_authentication

    home = tmp_path / "home"
    async with running_node(home, delivery=QUICK) as node:
        owner = "0x" + "33" * 20
        made = node.spec(owner, OUTPUT_CODE)
        made.results = job_pb2.RESULT_SELECTION_LOGS
        made.delivery.CopyFrom(s3_target(s3_server.endpoint_url, s3_bucket))
        with enable_iam_authentication():
            await node.create(made)
            final = (await node.watch_to_end(made.job_id, owner))[-1]
        assert final.state == State.STATE_SUCCEEDED, final.message
        assert final.delivery.state == Status.STATE_FAILED
        assert "InvalidAccessKeyId" in final.delivery.message
        assert_no_secret(final.delivery.message, CONSUMER_KEY_ID, s3_server.endpoint_url)
        # Logs only: no output was kept; each result is still downloadable from the node.
        assert [r.name for r in final.results] == [
            "algorithm.log",
            "configuration.log",
            "publish.log",
        ]
        assert await node.algorithm_log(final, owner) == "computed\n"
        recorded = await node.get(made.job_id, owner)
        assert recorded.delivery == final.delivery


@needs_root
@pytest.mark.timeout(120)
async def test_upload_urls_from_a_job_and_no_signature_on_disk(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str
) -> None:
    home = tmp_path / "home"
    urls = {
        "answer.txt": s3_server.presigned_put(
            s3_bucket, "consumer/answer", CONSUMER_KEY_ID, CONSUMER_SECRET
        ),
        "nothing.bin": s3_server.presigned_put(
            s3_bucket, "consumer/nothing", CONSUMER_KEY_ID, CONSUMER_SECRET
        ),
    }
    async with running_node(home, delivery=QUICK) as node:
        owner = "0x" + "44" * 20
        made = node.spec(owner, OUTPUT_CODE)
        made.delivery.upload_urls.urls.update(urls)
        await node.create(made)
        final = (await node.watch_to_end(made.job_id, owner))[-1]
        assert final.state == State.STATE_SUCCEEDED, final.message
        assert final.delivery.state == Status.STATE_DELIVERED
        assert final.delivery.delivered_count == 1
        assert "algorithm.log" in final.delivery.message
        assert "upload URLs naming no result of the job: nothing.bin" in final.delivery.message
        assert s3_server.objects(s3_bucket) == {"consumer/answer": b"42"}
    needles = [signature(u) for u in urls.values()]
    assert files_holding(home, *needles) == []


@needs_root
@pytest.mark.timeout(180)
async def test_a_job_picked_up_after_an_engine_restart_has_no_secrets(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str
) -> None:
    home = tmp_path / "home"
    owner = "0x" + "55" * 20
    environments = (EnvironmentSpec(), ONE_SLOT)
    async with running_node(home, environments, delivery=QUICK) as node:
        holder = node.spec(owner, SLEEP_CODE, environment="one")
        await node.create(holder)
        waiting = node.spec(owner, OUTPUT_CODE, environment="one")
        waiting.delivery.CopyFrom(s3_target(s3_server.endpoint_url, s3_bucket))
        queued = await node.create(waiting)
        assert queued.state == State.STATE_QUEUED
        assert queued.delivery.state == Status.STATE_PENDING
    # The engine stopped with the job queued: what it left on disk holds no secret.
    assert files_holding(home, CONSUMER_SECRET, CONSUMER_TOKEN) == []
    async with running_node(home, environments, delivery=QUICK) as node:
        final = (await node.watch_to_end(waiting.job_id, owner))[-1]
        assert final.state == State.STATE_SUCCEEDED, final.message
        assert final.delivery.state == Status.STATE_FAILED
        assert final.delivery.message == delivery.NO_SECRETS
        assert final.delivery.destination.startswith(f"s3://{s3_bucket}/deliveries/")
        assert final.results  # downloadable from the Provider, as the message says
    assert s3_server.objects(s3_bucket) == {}


@needs_root
@pytest.mark.timeout(60)
async def test_create_job_is_refused_with_the_field_and_nothing_kept(tmp_path: Path) -> None:
    home = tmp_path / "home"
    async with running_node(home, delivery=QUICK) as node:
        owner = "0x" + "66" * 20
        made = node.spec(owner)
        made.delivery.CopyFrom(s3_target("ftp://127.0.0.1:21", "bucket"))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await node.create(made)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(caught.value).metadata["field"] == "spec.delivery.s3.endpoint"
        assert_no_secret(caught.value.details() or "", CONSUMER_KEY_ID)
        unknown = node.spec(owner)
        unknown.results = 5  # type: ignore[assignment]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await node.create(unknown)
        assert error_info(caught.value).metadata["field"] == "spec.results"
    assert files_holding(home, CONSUMER_SECRET) == []


def test_delivery_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("C2D_DELIVERY_ALLOW_HOSTS", " MinIO.internal:9000 , 127.0.0.1 ")
    monkeypatch.setenv("C2D_DELIVERY_TIMEOUT_S", "120")
    settings = DeliverySettings.from_env()
    assert settings.allow_hosts == frozenset({"minio.internal:9000", "127.0.0.1"})
    assert settings.timeout_s == 120
    assert DeliverySettings().allow_hosts == settings.allow_hosts
    monkeypatch.setenv("C2D_DELIVERY_TIMEOUT_S", "0")
    with pytest.raises(ValueError, match="C2D_DELIVERY_TIMEOUT_S"):
        DeliverySettings.from_env()
