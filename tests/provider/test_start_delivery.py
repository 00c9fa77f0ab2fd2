"""The consumer's choice of results and delivery at StartCompute, on the Provider's side:
malformed choices and destinations the node does not allow are refused (with the field, before
any lookup), audited, and never echo a secret; the request digest binds both; the job's spec
carries them to the engine, the provenance facts keep the selection and the destination's
description; and no response, audit row, provenance record, log line or database of the node
ever holds a key or an upload URL."""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog
from c2d.common.v1 import container_pb2, job_pb2
from c2d.provider.v1 import provider_pb2 as pb
from structlog.testing import capture_logs

from mesh import delivery
from mesh.auth import request_digest
from mesh.digests import digest_for
from provider import launch
from provider.auth import Caller
from provider.config import ProviderConfig
from sdk.client import result_selection, s3_delivery, upload_urls
from tests.conftest import LocalMesh, needs_root, new_key, start_local_mesh
from tests.e2e.test_job import error_info, publish_pair, run_to_end
from tests.operator_engine.test_delivery import files_holding
from tests.provider.test_policy import job_facts, refused
from tests.s3_server import S3Server

# Markers no response, audit row, record or log line may ever hold.
SECRET = "delivery-secret-" + uuid.uuid4().hex
TOKEN = "delivery-session-" + uuid.uuid4().hex
URL_SIGNATURE = "X-Amz-Signature=" + uuid.uuid4().hex
NO_DATASET = "datasets/" + "0" * 64
NO_ALGORITHM = "algorithms/" + "0" * 64


@pytest.fixture(autouse=True)
def _no_allowed_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nodes of these tests allow no host unless a test says so."""
    monkeypatch.delenv(delivery.ALLOW_HOSTS_ENV, raising=False)


def s3(**fields: str) -> job_pb2.ResultDelivery:
    values = {
        "bucket": "consumer-results",
        "prefix": "runs/",
        "endpoint": "https://s3.example.invalid",
        "access_key_id": "AKIACONSUMER",
        "secret_access_key": SECRET,
        "session_token": TOKEN,
        **fields,
    }
    bucket, prefix = values.pop("bucket"), values.pop("prefix")
    return s3_delivery(bucket, prefix, **values)


def urls(
    count: int = 1, name: str = "total.json", host: str = "127.0.0.1"
) -> job_pb2.ResultDelivery:
    found = {name: f"https://{host}/put/{name}?{URL_SIGNATURE}"}
    found.update({f"more/{i}.json": f"https://{host}/{i}?{URL_SIGNATURE}" for i in range(1, count)})
    return upload_urls(found)


def assert_no_secret(text: str, where: str) -> None:
    for secret in (SECRET, TOKEN, URL_SIGNATURE):
        assert secret not in text, f"{where} holds a delivery secret"


def assert_node_keeps_no_secret(home: Path, *, only: str = "") -> None:
    """No file under the node's home (databases with their WAL files, results, state) holds a
    secret; `only` limits the scan to one folder of it."""
    assert not files_holding(home / only, SECRET, TOKEN, URL_SIGNATURE)


# -- refusals --------------------------------------------------------------------------------

# (what the consumer sends, the status, the reason, the field)
REFUSALS: list[tuple[str, dict[str, Any], grpc.StatusCode, str, str]] = [
    (
        "a malformed bucket",
        {"delivery": s3(bucket="Not_A_Bucket")},
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        "delivery.s3.bucket",
    ),
    (
        "a prefix that climbs",
        {"delivery": s3(prefix="runs/../other/")},
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        "delivery.s3.prefix",
    ),
    (
        "no secret key",
        {"delivery": s3(secret_access_key="")},
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        "delivery.s3.secret_access_key",
    ),
    (
        "a plain http endpoint",
        {"delivery": s3(endpoint="http://s3.example.org")},
        grpc.StatusCode.PERMISSION_DENIED,
        delivery.REFUSED,
        "delivery",
    ),
    (
        "an endpoint on loopback",
        {"delivery": s3(endpoint="https://127.0.0.1:9000")},
        grpc.StatusCode.PERMISSION_DENIED,
        delivery.REFUSED,
        "delivery",
    ),
    (
        "an upload URL on loopback",
        {"delivery": urls()},
        grpc.StatusCode.PERMISSION_DENIED,
        delivery.REFUSED,
        "delivery",
    ),
    (
        "too many upload URLs",
        {"delivery": urls(delivery.MAX_UPLOAD_URLS + 1, host="uploads.example.org")},
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        "delivery.upload_urls",
    ),
    (
        "upload URLs on too many hosts",
        {
            "delivery": upload_urls(
                {
                    f"{i}.json": f"https://h{i}.example.org/{i}?{URL_SIGNATURE}"
                    for i in range(delivery.MAX_UPLOAD_HOSTS + 1)
                }
            )
        },
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        "delivery.upload_urls.urls",
    ),
    (
        "a result name that climbs",
        {"delivery": urls(name="../total.json", host="uploads.example.org")},
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        "delivery.upload_urls.urls",
    ),
    (
        "an unknown result selection",
        {"results": 9},
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        "results",
    ),
]


@needs_root
async def test_refusals_name_the_field_come_first_are_audited_and_hold_no_secret(
    local_mesh: LocalMesh,
) -> None:
    consumer_key = new_key()
    async with (
        local_mesh.client(local_mesh.owner) as owner,
        local_mesh.client(consumer_key) as consumer,
    ):
        for what, choice, code, reason, field in REFUSALS:
            # Nothing the request names exists: the choice is checked before any lookup.
            error = await refused(
                consumer.start_compute([NO_DATASET], algorithm=NO_ALGORITHM, **choice)
            )
            assert error.code() == code, (what, error.details())
            info = error_info(error)
            assert (info.reason, info.metadata["field"]) == (reason, field), what
            assert_no_secret(str(error.details()) + str(info), what)
        events = await owner.list_audit_events(action="compute.start")
    assert [(e.outcome, e.actor, e.resource, e.reason, e.details["field"]) for e in events] == [
        (pb.AUDIT_OUTCOME_REFUSED, consumer_key.address, NO_DATASET, reason, field)
        for _, _, _, reason, field in REFUSALS
    ]
    for event in events:
        assert_no_secret(str(event), "an audit row")
    # A destination the node refused is named by its description; a malformed one by its kind.
    assert [e.details["delivery"] for e in events] == [
        "s3",
        "s3",
        "s3",
        "s3://consumer-results/runs/{job}/ at s3.example.org",
        "s3://consumer-results/runs/{job}/ at 127.0.0.1:9000",
        "upload URLs (1)",
        "upload_urls",
        "upload_urls",
        "upload_urls",
        "",
    ]
    assert events[-1].details["result_selection"] == "9"
    assert_node_keeps_no_secret(local_mesh.home, only="provider")


def test_an_unknown_result_word_is_refused_by_the_sdk() -> None:
    assert result_selection("outputs") == job_pb2.RESULT_SELECTION_OUTPUTS
    assert result_selection("LOGS") == job_pb2.RESULT_SELECTION_LOGS
    assert result_selection("both") == job_pb2.RESULT_SELECTION_OUTPUTS_AND_LOGS
    assert result_selection(job_pb2.RESULT_SELECTION_LOGS) == job_pb2.RESULT_SELECTION_LOGS
    with pytest.raises(ValueError, match="outputs, logs, both"):
        result_selection("everything")


# -- the digest ------------------------------------------------------------------------------


def start_request(**fields: Any) -> pb.StartComputeRequest:
    return pb.StartComputeRequest(request_id="r1", dataset=NO_DATASET, algorithm="a", **fields)


def test_the_digest_lists_the_results_and_the_delivery_as_the_proto_documents() -> None:
    base = ["r1", NO_DATASET, [], "a", "", "", ["", "", ""], {}, "", [], [0.0, 0, 0, 0], False, []]
    assert digest_for("StartCompute", start_request()) == request_digest([*base, 0, None])
    with_s3 = start_request(results=job_pb2.RESULT_SELECTION_OUTPUTS, delivery=s3(region="eu-1"))
    assert digest_for("StartCompute", with_s3) == request_digest(
        [
            *base,
            2,
            [
                "https://s3.example.invalid",
                "eu-1",
                "consumer-results",
                "runs/",
                "AKIACONSUMER",
                SECRET,
                TOKEN,
            ],
        ]
    )
    to_urls = start_request(results=job_pb2.RESULT_SELECTION_LOGS, delivery=urls(2))
    assert digest_for("StartCompute", to_urls) == request_digest(
        [*base, 3, dict(to_urls.delivery.upload_urls.urls)]
    )


def test_every_part_of_the_choice_changes_the_digest() -> None:
    variants = [
        start_request(),
        start_request(results=job_pb2.RESULT_SELECTION_OUTPUTS),
        start_request(results=job_pb2.RESULT_SELECTION_LOGS),
        start_request(delivery=s3()),
        start_request(delivery=s3(secret_access_key=SECRET + "x")),
        start_request(delivery=s3(session_token="")),
        start_request(delivery=s3(prefix="")),
        start_request(delivery=urls()),
        start_request(delivery=urls(name="other.json")),
        start_request(delivery=urls(host="uploads.example.org")),
    ]
    digests = [digest_for("StartCompute", v) for v in variants]
    assert len(set(digests)) == len(digests)


@needs_root
async def test_a_signature_binds_the_results_and_the_delivery(local_mesh: LocalMesh) -> None:
    async with (
        local_mesh.client(local_mesh.owner) as owner,
        local_mesh.client(new_key()) as consumer,
    ):
        algorithm, dataset = await publish_pair(local_mesh, owner)

        def request(**fields: Any) -> pb.StartComputeRequest:
            return pb.StartComputeRequest(
                request_id=uuid.uuid4().hex,
                dataset=dataset.name,
                algorithm=algorithm.name,
                **fields,
            )

        async def moved(signed: pb.StartComputeRequest, sent: pb.StartComputeRequest) -> str:
            """The status of `sent` under a signature made for `signed`."""
            metadata = consumer.signature_metadata("StartCompute", signed)
            try:
                await consumer.stub.StartCompute(sent, metadata=metadata, timeout=30)
            except grpc.aio.AioRpcError as error:
                return error.code().name
            return "OK"

        plain = request()
        with_delivery = pb.StartComputeRequest()
        with_delivery.CopyFrom(plain)
        with_delivery.delivery.CopyFrom(s3())
        assert await moved(plain, with_delivery) == "UNAUTHENTICATED"
        other_secret = pb.StartComputeRequest()
        other_secret.CopyFrom(with_delivery)
        other_secret.delivery.s3.secret_access_key = "another-secret"
        assert await moved(with_delivery, other_secret) == "UNAUTHENTICATED"
        logs_only = pb.StartComputeRequest()
        logs_only.CopyFrom(plain)
        logs_only.results = job_pb2.RESULT_SELECTION_LOGS
        assert await moved(plain, logs_only) == "UNAUTHENTICATED"
        # Signed over what is sent, the same request passes the signature: the destination
        # (https, but not resolvable here) is what refuses it.
        assert await moved(with_delivery, with_delivery) == "PERMISSION_DENIED"


# -- the spec, the records, the secrets ------------------------------------------------------


def s3_to(server: S3Server, bucket: str, prefix: str = "runs/") -> job_pb2.ResultDelivery:
    return s3_delivery(
        bucket,
        prefix,
        endpoint=server.endpoint_url,
        # moto takes any keys: these are the markers the node must never keep.
        access_key_id="AKIACONSUMER",
        secret_access_key=SECRET,
        session_token=TOKEN,
    )


@contextlib.asynccontextmanager
async def allowing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: S3Server
) -> AsyncIterator[LocalMesh]:
    """A mesh whose node lets deliveries reach the test S3 server (on 127.0.0.1)."""
    monkeypatch.setenv(delivery.ALLOW_HOSTS_ENV, server.endpoint_url.removeprefix("http://"))
    async with start_local_mesh(tmp_path) as mesh:
        yield mesh


@contextlib.contextmanager
def no_secret_logged() -> Iterator[None]:
    """Captures every log line of the services in this process (with their bound context)
    and checks that none holds a secret."""
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as lines:
        yield
    assert lines
    for line in lines:
        assert_no_secret(repr(line), "a log line")


@needs_root
async def test_loopback_is_allowed_only_with_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3_server: S3Server, s3_bucket: str
) -> None:
    destination = s3_to(s3_server, s3_bucket)
    async with (
        start_local_mesh(tmp_path / "default") as mesh,
        mesh.client(mesh.owner) as owner,
        mesh.client(new_key()) as consumer,
    ):
        algorithm, dataset = await publish_pair(mesh, owner)
        error = await refused(
            consumer.start_compute([dataset.did], algorithm=algorithm.did, delivery=destination)
        )
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_info(error).reason == delivery.REFUSED
        assert delivery.ALLOW_HOSTS_ENV in str(error.details())
    async with (
        allowing(tmp_path / "allowing", monkeypatch, s3_server) as mesh,
        mesh.client(mesh.owner) as owner,
        mesh.client(new_key()) as consumer,
    ):
        algorithm, dataset = await publish_pair(mesh, owner)
        job = await consumer.start_compute(
            [dataset.did], algorithm=algorithm.did, delivery=destination
        )
        assert job.name.startswith("jobs/")
        await run_to_end(consumer, job)


def test_the_spec_carries_the_choice_and_the_provenance_only_its_description() -> None:
    plan = launch.JobPlan(
        owner=Caller(address=new_key().address, nonce="1"),
        datasets=[],
        algorithm=None,
        code=b"print(1)",
        entrypoint="python3 $ALGO",
        container=container_pb2.Container(),
        parameters={},
        environment=job_pb2.Environment(name="default"),
        allow_network=False,
        results=job_pb2.RESULT_SELECTION_LOGS,
        delivery=s3(),
    )
    spec = launch.job_spec(plan)
    assert spec.results == job_pb2.RESULT_SELECTION_LOGS
    assert spec.delivery == s3()
    facts = launch.provenance_facts(plan, spec.job_id)
    assert facts["result_selection"] == "logs"
    assert facts["delivery"] == f"s3://consumer-results/runs/{spec.job_id}/ at s3.example.invalid"
    assert_no_secret(repr(facts), "the provenance facts")
    # Without a choice: no delivery in the spec at all, and the default selection.
    bare = dataclasses.replace(
        plan, results=job_pb2.RESULT_SELECTION_UNSPECIFIED, delivery=job_pb2.ResultDelivery()
    )
    assert not launch.job_spec(bare).HasField("delivery")
    assert launch.provenance_facts(bare, "x")["result_selection"] == "outputs_and_logs"
    assert launch.provenance_facts(bare, "x")["delivery"] == ""


@needs_root
async def test_the_choice_reaches_the_job_and_no_secret_is_kept_or_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3_server: S3Server, s3_bucket: str
) -> None:
    """Needs the engine's side too (Job.result_selection, Job.delivery, the delivery)."""
    async with (
        allowing(tmp_path, monkeypatch, s3_server) as mesh,
        mesh.client(mesh.owner) as owner,
        mesh.client(new_key()) as consumer,
    ):
        with no_secret_logged():
            algorithm, dataset = await publish_pair(mesh, owner)
            job = await consumer.start_compute(
                [dataset.did],
                algorithm=algorithm.did,
                results="outputs",
                delivery=s3_to(s3_server, s3_bucket),
            )
            _, final = await run_to_end(consumer, job)
            document = (await consumer.get_provenance(job.name)).decode()
            events = await owner.list_audit_events(action="compute.start")
        job_id = job.name.removeprefix("jobs/")
        where = f"s3://{s3_bucket}/runs/{job_id}/ at {s3_server.endpoint_url[7:]}"

        # The Provider's own records: the selection as a word, the destination described.
        facts = job_facts(mesh, job.name)
        assert (facts["result_selection"], facts["delivery"]) == ("outputs", where)
        assert '"result_selection":"outputs"' in document
        assert where in document
        [started] = [e for e in events if e.outcome == pb.AUDIT_OUTCOME_ALLOWED]
        assert (started.details["result_selection"], started.details["delivery"]) == (
            "outputs",
            where,
        )
        for text, what in [
            (str(job), "StartCompute's response"),
            (str(final), "the final job"),
            (document, "the provenance record"),
            (str(events), "the audit log"),
        ]:
            assert_no_secret(text, what)

        # What the engine was handed, as the job reports it.
        assert final.state == job_pb2.Job.STATE_SUCCEEDED, final.message
        assert final.result_selection == job_pb2.RESULT_SELECTION_OUTPUTS
        assert final.delivery.destination == where
        assert final.delivery.state == job_pb2.DeliveryStatus.STATE_DELIVERED, final.delivery
        kinds = {r.kind for r in final.results}
        assert job_pb2.ResultFile.KIND_ALGORITHM_LOG not in kinds
        assert job_pb2.ResultFile.KIND_OUTPUT in kinds
        keys = {k for k in s3_server.objects(s3_bucket) if k.startswith(f"runs/{job_id}/")}
        assert f"runs/{job_id}/total.json" in keys
        assert final.delivery.delivered_count == len(keys)
    # Nothing on the node's disk keeps a secret once the job is over: the registry, the
    # engine's state, the Provider's database.
    assert_node_keeps_no_secret(mesh.home)


def test_the_node_reads_its_allowed_hosts_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert ProviderConfig.from_env().delivery_allow_hosts == frozenset()
    monkeypatch.setenv(delivery.ALLOW_HOSTS_ENV, "127.0.0.1:9000, Store.Local")
    expected = frozenset({"127.0.0.1:9000", "store.local"})
    assert ProviderConfig.from_env().delivery_allow_hosts == expected
    # A node built in code (as the tests' mesh is) follows the variable too.
    built = ProviderConfig(
        listen="127.0.0.1:0",
        operator_address="unix:x",
        database=Path("x"),
        data_root=Path("x"),
        owners=frozenset(),
    )
    assert built.delivery_allow_hosts == expected
