"""Algorithms: private unless published public; a private one's code is read only by its
publisher (and by an owner while an approval request names it), by every route, and appears
in no record, error, service log line or job log; a public one's is open to anyone; only its
publisher updates it, which changes its checksums and version."""

from __future__ import annotations

import base64

import grpc
import structlog
from c2d.provider.v1 import provider_pb2 as pb

from sdk.client import Client
from tests.conftest import LocalMesh, Rest, needs_root, new_key
from tests.e2e.test_hostile import log_of
from tests.e2e.test_job import error_info, run_to_end
from tests.e2e.test_rest import error_info as rest_error_info
from tests.e2e.test_rest import error_of, signed
from tests.provider.test_policy import publish_data, refused, trusting

pytestmark = needs_root

ENTRYPOINT = "python3 $ALGO"
# Lines no one but the publisher may ever see; the last one crashes, so that a traceback
# would print it.
SECRET = "proprietary_weighting_7f3a"
PRIVATE_CODE = f"""
{SECRET} = [0.25, 0.75]
print("scored", sum({SECRET}), flush=True)
raise RuntimeError("{SECRET} failed on purpose")
""".encode()


async def private_pair(
    mesh: LocalMesh, publisher: Client, owner: Client
) -> tuple[pb.Algorithm, pb.Dataset]:
    algorithm = await publisher.publish_algorithm(PRIVATE_CODE, ENTRYPOINT)
    dataset = await publish_data(mesh, owner, trusting(await owner.trust(algorithm.did)))
    return algorithm, dataset


async def test_algorithms_are_private_unless_published_public(local_mesh: LocalMesh) -> None:
    async with local_mesh.client(new_key()) as publisher:
        private = await publisher.publish_algorithm(b"print(1)\n", ENTRYPOINT)
        public = await publisher.publish_algorithm(
            b"print(2)\n", ENTRYPOINT, access=pb.ALGORITHM_ACCESS_PUBLIC
        )
        for algorithm, access in (
            (private, pb.ALGORITHM_ACCESS_PRIVATE),
            (public, pb.ALGORITHM_ACCESS_PUBLIC),
        ):
            assert algorithm.access == access
            assert algorithm.version == 1
            assert algorithm.update_time == algorithm.create_time
            assert await publisher.get_algorithm(algorithm.did) == algorithm
        wrong = await refused(publisher.publish_algorithm(b"x", ENTRYPOINT, access=7))  # type: ignore[arg-type]
        assert error_info(wrong).metadata["field"] == "access"


async def test_private_code_is_read_only_by_its_publisher_over_grpc(
    local_mesh: LocalMesh,
) -> None:
    async with (
        local_mesh.client(local_mesh.owner) as owner,
        local_mesh.client(new_key()) as publisher,
        local_mesh.client(new_key()) as consumer,
        local_mesh.client(new_key()) as stranger,
    ):
        algorithm, dataset = await private_pair(local_mesh, publisher, owner)
        assert await publisher.download_algorithm(algorithm.did) == PRIVATE_CODE
        signed_read = await publisher.download_algorithm(algorithm.did, credentials="signature")
        assert signed_read == PRIVATE_CODE
        assert await publisher.download_algorithm(algorithm.did, offset=10) == PRIVATE_CODE[10:]

        # A consumer who ran it has used it, not read it.
        job = await consumer.start_compute([dataset.did], algorithm=algorithm.did)
        await run_to_end(consumer, job)
        for reader, credentials in (
            (stranger, "token"),
            (stranger, "signature"),
            (consumer, "token"),
            (owner, "token"),  # an owner, while no approval request names it
        ):
            error = await refused(
                reader.download_algorithm(algorithm.did, credentials=credentials)  # type: ignore[arg-type]
            )
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED
            assert error_info(error).reason == "ALGORITHM_PRIVATE"
            assert SECRET not in (error.details() or "")
        anonymous = await refused(stranger.download_algorithm(algorithm.did, credentials="none"))
        assert anonymous.code() == grpc.StatusCode.UNAUTHENTICATED

        # An owner reviewing an approval request for it may read it while it is pending.
        untrusting = await publish_data(local_mesh, owner)
        request = await consumer.create_approval_request(untrusting.did, algorithm.did)
        assert await owner.download_algorithm(algorithm.did) == PRIVATE_CODE
        await owner.reject(request.name, "no thanks")
        after = await refused(owner.download_algorithm(algorithm.did))
        assert error_info(after).reason == "ALGORITHM_PRIVATE"

        downloads = await owner.list_audit_events(action="algorithm.download")
        outcomes = [(e.actor, e.outcome) for e in downloads]
        assert outcomes.count((stranger.key.address, pb.AUDIT_OUTCOME_REFUSED)) == 2
        assert (publisher.key.address, pb.AUDIT_OUTCOME_ALLOWED) in outcomes
        assert (owner.key.address, pb.AUDIT_OUTCOME_ALLOWED) in outcomes


async def test_private_code_is_read_only_by_its_publisher_over_rest(rest: Rest) -> None:
    mesh, http = rest.mesh, rest.http
    async with (
        mesh.client(mesh.owner) as owner,
        mesh.client(new_key()) as publisher,
        mesh.client(new_key()) as stranger,
    ):
        algorithm, _ = await private_pair(mesh, publisher, owner)
        path = f"/v1/{algorithm.name}:download"
        request = pb.DownloadAlgorithmRequest(name=algorithm.name)

        denied = await http.get(path, headers=signed(stranger, "DownloadAlgorithm", request))
        assert rest_error_info(error_of(denied, 403, "PERMISSION_DENIED"))["reason"] == (
            "ALGORITHM_PRIVATE"
        )
        assert SECRET not in denied.text
        anonymous = await http.get(path)
        error_of(anonymous, 401, "UNAUTHENTICATED")
        assert SECRET not in anonymous.text

        allowed = await http.get(path, headers=signed(publisher, "DownloadAlgorithm", request))
        assert allowed.status_code == 200, allowed.text
        assert allowed.content == PRIVATE_CODE
        assert allowed.headers["content-disposition"].startswith("attachment")

        # The public records, over REST too, carry no code.
        for record in (
            await http.get(f"/v1/{algorithm.name}"),
            await http.get("/v1/algorithms"),
        ):
            assert record.status_code == 200, record.text
            assert SECRET not in record.text
            assert base64.b64encode(PRIVATE_CODE).decode() not in record.text


async def test_public_code_is_open_to_anyone(rest: Rest) -> None:
    mesh, http = rest.mesh, rest.http
    # Over 2 MiB: three chunks.
    code = b"print('public')\n" + b"#" * (2 << 20) + b"\n"
    async with mesh.client(new_key()) as publisher, mesh.client(new_key()) as anyone:
        algorithm = await publisher.publish_algorithm(
            code, ENTRYPOINT, access=pb.ALGORITHM_ACCESS_PUBLIC
        )
        assert await anyone.download_algorithm(algorithm.did, credentials="none") == code
        assert await anyone.download_algorithm(algorithm.did, credentials="token") == code
        call = anyone.stub.DownloadAlgorithm(
            pb.DownloadAlgorithmRequest(name=algorithm.name, offset=5)
        )
        chunks = [(c.offset, len(c.data)) async for c in call]
        assert chunks == [
            (5, 1 << 20),
            (5 + (1 << 20), 1 << 20),
            (5 + (2 << 20), len(code) - 5 - (2 << 20)),
        ]
        past = await refused(
            anyone.download_algorithm(algorithm.did, offset=len(code) + 1, credentials="none")
        )
        assert error_info(past).metadata["field"] == "offset"

        whole = await http.get(f"/v1/{algorithm.name}:download")
        assert whole.status_code == 200, whole.text
        assert whole.content == code
        resumed = await http.get(f"/v1/{algorithm.name}:download", params={"offset": 100})
        assert resumed.content == code[100:]


async def test_only_the_publisher_updates_an_algorithm(local_mesh: LocalMesh) -> None:
    async with (
        local_mesh.client(local_mesh.owner) as owner,
        local_mesh.client(new_key()) as publisher,
        local_mesh.client(new_key()) as stranger,
    ):
        algorithm, dataset = await private_pair(local_mesh, publisher, owner)
        new_code = b"print('version two')\n"
        denied = await refused(stranger.update_algorithm(algorithm.did, new_code, ENTRYPOINT))
        assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_info(denied).reason == "NOT_THE_PUBLISHER"
        for code, entrypoint, parameters, field in (
            (b"", ENTRYPOINT, [], "code"),
            (new_code, "python3 main.py", [], "entrypoint"),
            (new_code, ENTRYPOINT, [pb.ParameterSpec(name="9", type=1)], "parameters[0].name"),
        ):
            bad = await refused(
                publisher.update_algorithm(algorithm.did, code, entrypoint, parameters=parameters)
            )
            assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error_info(bad).metadata["field"] == field
        assert await publisher.get_algorithm(algorithm.did) == algorithm

        spec = pb.ParameterSpec(name="rounds", type=pb.PARAMETER_TYPE_INTEGER)
        updated = await publisher.update_algorithm(
            algorithm.did, new_code, "python3 -u $ALGO", parameters=[spec]
        )
        assert (updated.name, updated.did, updated.access) == (
            algorithm.name,
            algorithm.did,
            algorithm.access,
        )
        assert updated.version == 2
        assert list(updated.parameters) == [spec]
        assert updated.size_bytes == len(new_code)
        assert updated.files_checksum != algorithm.files_checksum
        assert updated.container_section_checksum != algorithm.container_section_checksum
        assert updated.update_time.ToNanoseconds() >= algorithm.create_time.ToNanoseconds()
        assert updated.create_time == algorithm.create_time
        assert await publisher.get_algorithm(algorithm.did) == updated
        assert await publisher.download_algorithm(algorithm.did) == new_code

        # The dataset trusted the old checksums: it refuses the new code until trusted again.
        changed = await refused(publisher.start_compute([dataset.did], algorithm=algorithm.did))
        assert error_info(changed).reason == "ALGORITHM_CHECKSUM_MISMATCH"


async def test_private_code_is_in_no_record_error_or_log(local_mesh: LocalMesh) -> None:
    async with (
        local_mesh.client(local_mesh.owner) as owner,
        local_mesh.client(new_key()) as publisher,
        local_mesh.client(new_key()) as consumer,
    ):
        with structlog.testing.capture_logs() as service_lines:
            algorithm, dataset = await private_pair(local_mesh, publisher, owner)
            records = [
                await consumer.stub.GetAlgorithm(pb.GetAlgorithmRequest(name=algorithm.name)),
                await consumer.stub.ListAlgorithms(pb.ListAlgorithmsRequest()),
            ]
            errors = [
                await refused(consumer.download_algorithm(algorithm.did)),
                await refused(consumer.update_algorithm(algorithm.did, PRIVATE_CODE, ENTRYPOINT)),
                await refused(
                    consumer.start_compute(
                        [(await publish_data(local_mesh, owner)).did], algorithm=algorithm.did
                    )
                ),
            ]
            job = await consumer.start_compute([dataset.did], algorithm=algorithm.did)
            _, final = await run_to_end(consumer, job)
        for record in records:
            assert PRIVATE_CODE not in record.SerializeToString()
            assert SECRET not in str(record)
        for error in errors:
            assert SECRET not in (error.details() or "")
            assert SECRET not in str(error.trailing_metadata())
        assert SECRET not in repr(service_lines)
        assert final.state == final.STATE_FAILED
        assert SECRET not in final.message
        assert "scored 1.0" in await job_log(consumer, final.name)


async def job_log(client: Client, job: str) -> str:
    """The job's algorithm log; none of the code's own lines may be in it."""
    final = await client.get_job(job)
    text = await log_of(client, final)
    lines_of_code = {line.strip() for line in PRIVATE_CODE.decode().splitlines() if line.strip()}
    leaked = [line for line in text.splitlines() if line.strip() in lines_of_code]
    assert not leaked, f"the job log shows lines of the private code: {leaked}"
    return text
