"""OperatorService.ExportResults in front of a real engine, results on local disk: a succeeded
job's outputs copied into the storage's dataset area in the order asked, idempotently, where
deleting the job does not reach them; NOT_FOUND for anyone but the job's owner (viewers too)
and for expired results; FAILED_PRECONDITION for a job that did not succeed; INVALID_ARGUMENT
for a log, an index given twice, a job without outputs, a malformed dataset id; DATA_LOSS for a
stored result that is not the recorded one."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import grpc
from c2d.common.v1 import job_pb2
from c2d.operator.v1 import operator_pb2

from mesh.storage import LocalStorage
from tests.conftest import needs_root, new_key
from tests.e2e.test_job import expect
from tests.operator_service.node import Node, error_info, running_node

pytestmark = needs_root
State = job_pb2.Job.State
Kind = job_pb2.ResultFile
DATASET = "ef" * 32
TWO_OUTPUTS = b"""
open('/data/outputs/a.txt', 'w').write('alpha')
open('/data/outputs/b.txt', 'w').write('bravo!')
print('done', flush=True)
"""


async def run(
    node: Node, owner: str, code: bytes, *, viewers: list[str] | None = None
) -> job_pb2.Job:
    spec = node.spec(owner, code, viewers=viewers or [])
    await node.create(spec)
    final = (await node.watch_to_end(spec.job_id, owner))[-1]
    return final


def export(
    node: Node, job: job_pb2.Job, caller: str, indexes: list[int], dataset_id: str = DATASET
) -> operator_pb2.ExportResultsResponse:
    request = operator_pb2.ExportResultsRequest(
        job_id=job.name.removeprefix("jobs/"), owner=caller, indexes=indexes, dataset_id=dataset_id
    )
    return node.operator.ExportResults(request)  # type: ignore[no-any-return]


def storage_of(node: Node) -> LocalStorage:
    return LocalStorage(Path(node.config.storage_url))


async def test_outputs_are_copied_into_the_dataset_area(tmp_path: Path) -> None:
    owner, viewer, stranger = (new_key().address for _ in range(3))
    async with running_node(tmp_path) as node:
        job = await run(node, owner, TWO_OUTPUTS, viewers=[viewer])
        assert job.state == State.STATE_SUCCEEDED, job.message
        outputs = {r.name: r for r in job.results if r.kind == Kind.KIND_OUTPUT}
        a, b = outputs["a.txt"], outputs["b.txt"]

        # In the order asked: b first, then a.
        response = await export(node, job, owner, [b.index, a.index])
        assert [(f.index, f.name, f.kind, f.size_bytes, f.sha256) for f in response.files] == [
            (0, "b.txt", Kind.KIND_OUTPUT, 6, hashlib.sha256(b"bravo!").hexdigest()),
            (1, "a.txt", Kind.KIND_OUTPUT, 5, hashlib.sha256(b"alpha").hexdigest()),
        ]
        storage = storage_of(node)
        assert storage.dataset_file(DATASET, 0).read_bytes() == b"bravo!"
        assert storage.dataset_file(DATASET, 1).read_bytes() == b"alpha"
        # Again: the same answer, the same copies.
        again = await export(node, job, owner, [b.index, a.index])
        assert again == response
        # Every output, by index, when none is named.
        everything = await export(node, job, owner, [], "12" * 32)
        assert [f.name for f in everything.files] == sorted(outputs, key=lambda n: outputs[n].index)

        # Only the owner: to a viewer, as to a stranger, the job is not there.
        for caller in (viewer, stranger):
            await expect(export(node, job, caller, []), grpc.StatusCode.NOT_FOUND, "JOB_NOT_FOUND")

        await node.operator.DeleteJob(
            operator_pb2.DeleteJobRequest(job_id=job.name.removeprefix("jobs/"), owner=owner)
        )
        assert not (Path(node.config.storage_url) / job.name.removeprefix("jobs/")).exists()
        assert storage.dataset_file(DATASET, 0).read_bytes() == b"bravo!"


async def test_what_cannot_be_exported(tmp_path: Path) -> None:
    owner = new_key().address
    async with running_node(tmp_path) as node:
        failed = await run(node, owner, b"raise SystemExit(2)\n")
        assert failed.state == State.STATE_FAILED
        await expect(
            export(node, failed, owner, []),
            grpc.StatusCode.FAILED_PRECONDITION,
            "JOB_NOT_SUCCEEDED",
        )
        silent = await run(node, owner, b"print('no outputs')\n")
        error = await expect(
            export(node, silent, owner, []), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"
        )
        assert error_info(error).metadata["field"] == "indexes"

        job = await run(node, owner, TWO_OUTPUTS)
        output = next(r.index for r in job.results if r.kind == Kind.KIND_OUTPUT)
        log = next(r.index for r in job.results if r.kind == Kind.KIND_ALGORITHM_LOG)
        for indexes, field in (([output, log], "indexes[1]"), ([output, output], "indexes[1]")):
            error = await expect(
                export(node, job, owner, indexes),
                grpc.StatusCode.INVALID_ARGUMENT,
                "INVALID_ARGUMENT",
            )
            assert error_info(error).metadata["field"] == field
        error = await expect(
            export(node, job, owner, [], "not-an-id"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
        )
        assert error_info(error).metadata["field"] == "dataset_id"

        # A stored result that is not the recorded one is not copied.
        job_id = job.name.removeprefix("jobs/")
        stored = Path(node.config.storage_url) / job_id / f"{output:04d}"
        stored.write_bytes(b"forged")
        await expect(export(node, job, owner, [output]), grpc.StatusCode.DATA_LOSS, "DATA_LOSS")
        assert not storage_of(node).dataset_file(DATASET, 0).exists()

        # Expired results are gone, even before the sweeper deleted them.
        await node.service.store.set_expiry(job_id, time.time_ns() - 1)
        await expect(export(node, job, owner, []), grpc.StatusCode.NOT_FOUND, "RESULTS_EXPIRED")
