"""Whole jobs through the Provider's gRPC API: publish, start, watch, logs, results; and the
bad inputs the Provider must refuse with the right status."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Awaitable
from pathlib import Path

import grpc
import pytest
from c2d.common.v1 import job_pb2
from c2d.provider.v1 import provider_pb2 as pb
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from mesh import auth
from sdk.client import Client
from tests.conftest import LocalMesh, needs_root, new_key

pytestmark = needs_root

SUM_ALGORITHM = b"""
import json, os
total = 0
for dataset_id in json.loads(os.environ["DIDS"]):
    folder = os.path.join("/data/inputs", dataset_id)
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name)) as f:
            total += sum(int(line) for line in f if line.strip())
params = {}
if os.path.exists("/data/inputs/algoCustomData.json"):
    params = json.load(open("/data/inputs/algoCustomData.json"))
print("total", total, flush=True)
with open("/data/outputs/total.json", "w") as f:
    json.dump({"total": total * params.get("factor", 1)}, f)
"""


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "the error carries no google.rpc.Status details"
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return info


async def expect(
    call: Awaitable[object], code: grpc.StatusCode, reason: str
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    assert error_info(caught.value).reason == reason, caught.value.details()
    return caught.value


async def publish_pair(
    mesh: LocalMesh, owner: Client, code: bytes = SUM_ALGORITHM, numbers: str = "1\n2\n3\n"
) -> tuple[pb.Algorithm, pb.Dataset]:
    algorithm = await owner.publish_algorithm(code, "python3 $ALGO")
    data = mesh.data_file(f"numbers-{time.monotonic_ns()}.txt", numbers.encode())
    dataset = await owner.publish_dataset(
        [data],
        policy=pb.ComputePolicy(publisher_trusted_algorithms=[await owner.trust(algorithm.did)]),
    )
    return algorithm, dataset


async def run_to_end(client: Client, job: job_pb2.Job) -> tuple[list[int], job_pb2.Job]:
    states = []
    final = job
    async for update in client.watch_job(job.name):
        if not states or states[-1] != update.state:
            states.append(update.state)
        final = update
    return states, final


async def test_a_job_runs_end_to_end(local_mesh: LocalMesh, tmp_path: Path) -> None:
    consumer_key = new_key()
    async with (
        local_mesh.client(local_mesh.owner) as owner,
        local_mesh.client(consumer_key) as consumer,
    ):
        algorithm, dataset = await publish_pair(local_mesh, owner)
        assert dataset.did == f"did:c2d:{dataset.name.removeprefix('datasets/')}"
        job = await consumer.start_compute(
            [dataset.did], algorithm=algorithm.did, parameters={"factor": 10}
        )
        assert job.owner == consumer_key.address
        states, final = await run_to_end(consumer, job)
        S = job_pb2.Job
        # A quick job may pass some states before the watch begins; it ends succeeded.
        assert states[-1] == S.STATE_SUCCEEDED, final.message
        assert final.status_code == 70 and final.status_text == "Job finished"
        kinds = {r.name: r.kind for r in final.results}
        assert kinds["total.json"] == job_pb2.ResultFile.KIND_OUTPUT
        assert job_pb2.ResultFile.KIND_ALGORITHM_LOG in kinds.values()
        assert job_pb2.ResultFile.KIND_CONFIGURATION_LOG in kinds.values()
        assert job_pb2.ResultFile.KIND_PUBLISH_LOG in kinds.values()

        output = next(r for r in final.results if r.name == "total.json")
        saved = await consumer.download_result(job.name, output, tmp_path / "total.json")
        assert json.loads(saved.read_text()) == {"total": 60}
        assert hashlib.sha256(saved.read_bytes()).hexdigest() == output.sha256

        log_text = "".join([c.text async for c in consumer.stream_logs(job.name)])
        assert log_text == "total 6\n"
        # Resuming from an offset gives the rest of the log.
        rest = "".join([c.text async for c in consumer.stream_logs(job.name, offset=6)])
        assert rest == "6\n"

        listed = await consumer.list_jobs()
        assert [j.name for j in listed] == [job.name]

        await consumer.delete_job(job.name)
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await consumer.get_job(job.name)
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND


async def test_log_lines_arrive_while_the_job_runs(local_mesh: LocalMesh) -> None:
    code = b"import time\nprint('A', flush=True)\ntime.sleep(3)\nprint('B', flush=True)\n"
    async with local_mesh.client(local_mesh.owner) as owner:
        algorithm, dataset = await publish_pair(local_mesh, owner, code)
        job = await owner.start_compute([dataset.did], algorithm=algorithm.did)
        arrivals: dict[str, float] = {}
        async for chunk in owner.stream_logs(job.name):
            for letter in "AB":
                if letter in chunk.text:
                    arrivals[letter] = time.monotonic()
        # B is printed 3 s after A: A must have arrived well before.
        assert arrivals["B"] - arrivals["A"] > 2.5


async def test_a_failing_algorithm_fails_with_its_reason_and_keeps_its_logs(
    local_mesh: LocalMesh,
) -> None:
    code = b"import sys\nprint('about to fail', flush=True)\nsys.exit(3)\n"
    async with local_mesh.client(local_mesh.owner) as owner:
        algorithm, dataset = await publish_pair(local_mesh, owner, code)
        job = await owner.start_compute([dataset.did], algorithm=algorithm.did)
        _, final = await run_to_end(owner, job)
        assert final.state == job_pb2.Job.STATE_FAILED
        assert final.failure_reason == job_pb2.FAILURE_REASON_ALGORITHM_EXIT_NONZERO
        assert final.exit_code == 3
        assert any(r.kind == job_pb2.ResultFile.KIND_ALGORITHM_LOG for r in final.results)


async def test_a_running_job_can_be_stopped(local_mesh: LocalMesh) -> None:
    code = b"import time\nprint('working', flush=True)\ntime.sleep(60)\n"
    async with local_mesh.client(local_mesh.owner) as owner:
        algorithm, dataset = await publish_pair(local_mesh, owner, code)
        job = await owner.start_compute([dataset.did], algorithm=algorithm.did)
        async for chunk in owner.stream_logs(job.name):
            if "working" in chunk.text:
                break
        started = time.monotonic()
        stopped = await owner.stop_job(job.name)
        assert stopped.state == job_pb2.Job.STATE_CANCELLED
        assert time.monotonic() - started < 5


async def test_raw_code_runs_only_where_the_dataset_allows_it(local_mesh: LocalMesh) -> None:
    async with local_mesh.client(local_mesh.owner) as owner:
        closed = await owner.publish_dataset([local_mesh.data_file("a.txt", b"5\n")])
        opened = await owner.publish_dataset(
            [local_mesh.data_file("b.txt", b"7\n")],
            policy=pb.ComputePolicy(allow_raw_algorithm=True),
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await owner.start_compute([closed.did], raw_code=SUM_ALGORITHM.decode())
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_info(refused.value).reason == "RAW_ALGORITHM_NOT_ALLOWED"
        job = await owner.start_compute([opened.did], raw_code=SUM_ALGORITHM.decode())
        _, final = await run_to_end(owner, job)
        assert final.state == job_pb2.Job.STATE_SUCCEEDED, final.message


async def test_a_new_dataset_trusts_no_algorithm(local_mesh: LocalMesh) -> None:
    async with local_mesh.client(local_mesh.owner) as owner:
        algorithm = await owner.publish_algorithm(SUM_ALGORITHM, "python3 $ALGO")
        dataset = await owner.publish_dataset([local_mesh.data_file("c.txt", b"1\n")])
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await owner.start_compute([dataset.did], algorithm=algorithm.did)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_info(refused.value).reason == "ALGORITHM_NOT_TRUSTED"
        assert dataset.name in (refused.value.details() or "")


async def test_only_owners_publish_datasets_and_only_from_the_data_root(
    local_mesh: LocalMesh,
    tmp_path: Path,
) -> None:
    secret = tmp_path / "outside" / "secret-location.csv"
    secret.parent.mkdir()
    secret.write_text("1\n")
    secret.chmod(0o644)
    async with (
        local_mesh.client(new_key()) as stranger,
        local_mesh.client(local_mesh.owner) as owner,
    ):
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await stranger.publish_dataset([local_mesh.data_file("d.txt", b"1\n")])
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED

        link = local_mesh.data_root / "sneaky-link"
        link.symlink_to(secret)
        for path in (secret, link, local_mesh.data_root / "missing.csv"):
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await owner.publish_dataset([path])
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "secret-location" not in (bad.value.details() or "")
            assert str(local_mesh.data_root) not in (bad.value.details() or "")
            assert error_info(bad.value).metadata["field"] == "file_paths[0]"


async def test_someone_elses_job_does_not_exist(local_mesh: LocalMesh) -> None:
    async with local_mesh.client(local_mesh.owner) as owner, local_mesh.client(new_key()) as other:
        algorithm, dataset = await publish_pair(local_mesh, owner)
        job = await owner.start_compute([dataset.did], algorithm=algorithm.did)
        for call in (other.get_job(job.name), other.stop_job(job.name)):
            with pytest.raises(grpc.aio.AioRpcError) as hidden:
                await call
            assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await owner.get_job("jobs/" + "0" * 32)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as malformed:
            await owner.get_job("jobs/not-an-id")
        assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(malformed.value).metadata["field"] == "name"
        await run_to_end(owner, job)


async def test_forged_replayed_and_moved_signatures_are_refused(local_mesh: LocalMesh) -> None:
    key = new_key()
    async with local_mesh.client(key) as client:
        stub = client.stub
        request = pb.PublishAlgorithmRequest(code=b"print(1)", entrypoint="python3 $ALGO")
        metadata = client.signature_metadata("PublishAlgorithm", request)
        await stub.PublishAlgorithm(request, metadata=metadata)

        async def refused(
            req: pb.PublishAlgorithmRequest, md: list[tuple[str, str]]
        ) -> grpc.aio.AioRpcError:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await stub.PublishAlgorithm(req, metadata=md)
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
            return error.value

        # The same signed request again: its nonce is spent.
        assert error_info(await refused(request, metadata)).reason == "NONCE_REUSED"
        # A valid signature moved onto another request: the digest no longer matches.
        other = pb.PublishAlgorithmRequest(code=b"print(2)", entrypoint="python3 $ALGO")
        moved = client.signature_metadata("PublishAlgorithm", request)
        await refused(other, moved)
        # A signature by someone else, claiming this address.
        forged = dict(client.signature_metadata("PublishAlgorithm", request))
        impostor = new_key()
        forged[auth.SIGNATURE_HEADER] = auth.sign(
            impostor.private_key,
            key.address,
            int(forged[auth.NONCE_HEADER]),
            "PublishAlgorithm",
            "0" * 64,
        )
        await refused(request, list(forged.items()))
        # A signature over the raw text instead of its keccak256 hash.
        from eth_account import Account
        from eth_account.messages import encode_defunct

        nonce = str(time.time_ns())
        from mesh.digests import digest_for

        text = auth.signed_text(
            key.address, nonce, "PublishAlgorithm", digest_for("PublishAlgorithm", request)
        )
        raw = Account.sign_message(encode_defunct(text=text), private_key=key.private_key)
        await refused(
            request,
            [
                (auth.ADDRESS_HEADER, key.address),
                (auth.NONCE_HEADER, nonce),
                (auth.SIGNATURE_HEADER, "0x" + bytes(raw.signature).hex()),
            ],
        )
        # No credentials at all.
        await refused(request, [])


async def test_tokens_read_but_do_not_write_and_can_be_revoked(local_mesh: LocalMesh) -> None:
    async with local_mesh.client(local_mesh.owner) as owner:
        await owner.list_jobs()
        token = (await owner.token_metadata())[0]
        request = pb.PublishAlgorithmRequest(code=b"print(1)", entrypoint="python3 $ALGO")
        with pytest.raises(grpc.aio.AioRpcError) as write:
            await owner.stub.PublishAlgorithm(request, metadata=[token])
        assert write.value.code() == grpc.StatusCode.UNAUTHENTICATED
        revoke = pb.RevokeAuthTokenRequest(token=token[1].removeprefix("Bearer "))
        await owner.stub.RevokeAuthToken(
            revoke, metadata=owner.signature_metadata("RevokeAuthToken", revoke)
        )
        with pytest.raises(grpc.aio.AioRpcError) as revoked:
            await owner.stub.ListJobs(pb.ListJobsRequest(), metadata=[token])
        assert revoked.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_concurrent_jobs_beyond_capacity_queue(local_mesh: LocalMesh) -> None:
    code = b"import time\ntime.sleep(1)\nprint('done', flush=True)\n"
    async with local_mesh.client(local_mesh.owner) as owner:
        algorithm, dataset = await publish_pair(local_mesh, owner, code)
        # The "small" environment runs one job at a time.
        jobs = [
            await owner.start_compute([dataset.did], algorithm=algorithm.did, environment="small")
            for _ in range(3)
        ]
        seen_queued = False
        async for update in owner.watch_job(jobs[2].name):
            if update.state == job_pb2.Job.STATE_QUEUED and update.queue_position >= 1:
                seen_queued = True
        assert seen_queued
        finals = await asyncio.gather(*(run_to_end(owner, j) for j in jobs))
        assert all(f.state == job_pb2.Job.STATE_SUCCEEDED for _, f in finals)
        ends = [f.end_time.ToNanoseconds() for _, f in finals]
        assert ends == sorted(ends), "queued jobs run in the order they came"


async def test_concurrent_signed_calls_never_fail_the_provider(local_mesh: LocalMesh) -> None:
    """Signed calls racing each other: each is accepted or refused for its nonce, never an
    internal error, and nothing one of them writes is lost with another's refusal."""
    async with local_mesh.client(new_key()) as client:
        requests = [
            pb.PublishAlgorithmRequest(code=f"print({i})".encode(), entrypoint="python3 $ALGO")
            for i in range(20)
        ]
        signed = [(r, client.signature_metadata("PublishAlgorithm", r)) for r in requests]
        outcomes = await asyncio.gather(
            *(client.stub.PublishAlgorithm(r, metadata=m) for r, m in signed),
            return_exceptions=True,
        )
        codes = {
            o.code() if isinstance(o, grpc.aio.AioRpcError) else grpc.StatusCode.OK
            for o in outcomes
        }
        assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED}, outcomes
        accepted = [o for o in outcomes if not isinstance(o, BaseException)]
        assert accepted
        for response in accepted:
            assert (await client.get_algorithm(response.algorithm.name)).did


async def test_no_log_line_reveals_where_data_lives_and_job_lines_carry_the_job_id(
    local_mesh: LocalMesh,
) -> None:
    import structlog
    from structlog.testing import capture_logs

    async with local_mesh.client(local_mesh.owner) as owner:
        # As the services log: context variables (job_id, consumer) merged into each line.
        with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as events:
            algorithm, dataset = await publish_pair(local_mesh, owner)
            job = await owner.start_compute([dataset.did], algorithm=algorithm.did)
            _, final = await run_to_end(owner, job)
            with pytest.raises(grpc.aio.AioRpcError):
                await owner.publish_dataset([local_mesh.data_root / "missing-file.csv"])
    assert final.state == job_pb2.Job.STATE_SUCCEEDED
    job_id = job.name.removeprefix("jobs/")
    for event in events:
        text = repr(event)
        assert str(local_mesh.data_root) not in text, event
        assert "missing-file" not in text, event
    about_the_job = [
        e
        for e in events
        if e.get("event")
        in ("job accepted", "compute ended", "job final", "configure.done", "publish.done")
    ]
    assert len(about_the_job) >= 5
    assert all(e.get("job_id") == job_id for e in about_the_job), about_the_job


async def test_the_registry_records_every_change_of_state(local_mesh: LocalMesh) -> None:
    from operator_service.store import JobStore

    code = b"import time\ntime.sleep(0.3)\nprint('ok', flush=True)\n"
    async with local_mesh.client(local_mesh.owner) as owner:
        algorithm, dataset = await publish_pair(local_mesh, owner, code)
        job = await owner.start_compute([dataset.did], algorithm=algorithm.did)
        await run_to_end(owner, job)
    store = await JobStore.open(local_mesh.home / "operator" / "operator.db")
    try:
        states = [state for _, state, _, _ in await store.events(job.name.removeprefix("jobs/"))]
    finally:
        await store.close()
    S = job_pb2.Job
    assert states[0] == S.STATE_QUEUED and states[-1] == S.STATE_SUCCEEDED
    assert S.STATE_RUNNING in states


async def test_a_final_job_keeps_neither_the_code_nor_the_data_locations(
    local_mesh: LocalMesh,
) -> None:
    """The engine's record of a finished job holds who may read it, not the (private) code
    nor where the datasets are: those live no longer than the job."""
    marker = "unmistakable-private-line-" + hashlib.sha256(b"marker").hexdigest()[:12]
    code = SUM_ALGORITHM + f"\n# {marker}\n".encode()
    async with local_mesh.client(local_mesh.owner) as owner:
        algorithm, dataset = await publish_pair(local_mesh, owner, code=code)
        job = await owner.start_compute([dataset.did], algorithm=algorithm.did)
        _, final = await run_to_end(owner, job)
        assert final.state == job_pb2.Job.STATE_SUCCEEDED
    workspaces = local_mesh.home / "engine" / "jobs"

    def keeping() -> list[Path]:
        secrets = (marker.encode(), str(local_mesh.data_root).encode())
        return [
            path
            for path in workspaces.rglob("*")
            if path.is_file() and any(secret in path.read_bytes() for secret in secrets)
        ]

    # The engine cleans up just after it reports the final state.
    deadline = time.monotonic() + 10
    while keeping() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert keeping() == []
