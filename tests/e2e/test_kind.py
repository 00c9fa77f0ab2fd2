"""One whole job on the mesh as deployed on a kind cluster (deploy/overlays/kind) by
scripts/kind-e2e.sh (`make kind-e2e`): a consumer publishes an algorithm, the data owner
publishes a dataset whose file the script put in the node's data folder and trusts the
algorithm, the consumer runs a job to its end, reads its log and results, and deletes it.

The script says where things are:
  C2D_KIND_PROVIDER   host:port of the Provider (a `kubectl port-forward`)
  C2D_KIND_OWNER_KEY  the data owner's key file (its address is the node's C2D_OWNERS)
  C2D_KIND_DATASET    the dataset file as the Provider sees it; the script writes the numbers
                      1 to 10, one a line, so their sum is 55
  C2D_KIND_STRICT     "1": a Provider that does not answer fails the test instead of skipping it
Without C2D_KIND_PROVIDER, or when the Provider does not answer, the test skips."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from c2d.common.v1 import job_pb2
from c2d.provider.v1 import provider_pb2 as pb
from eth_account import Account
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sdk.client import Client
from sdk.keys import Key

PROVIDER_VAR = "C2D_KIND_PROVIDER"
OWNER_KEY_VAR = "C2D_KIND_OWNER_KEY"
DATASET_VAR = "C2D_KIND_DATASET"
STRICT_VAR = "C2D_KIND_STRICT"
NO_CLUSTER = "no kind cluster: run `make kind-e2e` on a machine with Docker"
DEFAULT_DATASET = "/c2d/data/numbers.txt"
DATASET_SUM = 55
# Pods are scheduled, started and finished three times per job (configure, compute, publish).
JOB_DEADLINE_S = 300.0

SUM_ALGORITHM = b"""
import json, os
total = 0
for dataset_id in json.loads(os.environ["DIDS"]):
    folder = os.path.join(os.environ["INPUTS"], dataset_id)
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name)) as f:
            total += sum(int(line) for line in f if line.strip())
factor = 1
custom = os.path.join(os.environ["INPUTS"], "algoCustomData.json")
if os.path.exists(custom):
    factor = json.load(open(custom)).get("factor", 1)
print("total", total, flush=True)
with open(os.path.join(os.environ["OUTPUTS"], "total.json"), "w") as f:
    json.dump({"total": total * factor}, f)
"""


@dataclass(frozen=True)
class KindMesh:
    provider: str
    owner: Key
    dataset_path: str


async def _health_problem(target: str) -> str:
    """Why the Provider at `target` cannot take a job, or "" when it is SERVING."""
    channel = grpc.aio.insecure_channel(target)
    # The generated stub's methods are set in its constructor, out of mypy's sight.
    stub: Any = health_pb2_grpc.HealthStub(channel)
    try:
        response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5.0)
    except grpc.aio.AioRpcError as error:
        return f"{error.code().name}: {error.details()}"
    finally:
        await channel.close()
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return ""


@pytest.fixture
async def kind_mesh() -> KindMesh:
    target = os.environ.get(PROVIDER_VAR, "")
    if not target:
        pytest.skip(f"{NO_CLUSTER} ({PROVIDER_VAR} is not set)")
    problem = await _health_problem(target)
    if problem:
        message = f"the Provider at {target} does not answer ({problem})"
        if os.environ.get(STRICT_VAR) == "1":
            pytest.fail(message)
        pytest.skip(f"{NO_CLUSTER}: {message}")
    key_file = Path(os.environ.get(OWNER_KEY_VAR, ""))
    if not key_file.is_file():
        pytest.fail(f"{OWNER_KEY_VAR} must name the data owner's key file (the script sets it)")
    return KindMesh(
        provider=target,
        owner=Key.load_or_create(key_file),
        dataset_path=os.environ.get(DATASET_VAR, DEFAULT_DATASET),
    )


def _new_key() -> Key:
    account = Account.create()
    return Key(address=account.address, private_key=bytes(account.key))


async def _watch_to_end(client: Client, name: str) -> tuple[list[int], job_pb2.Job]:
    """The states seen and the job as it ended; the watch ends after a final state."""
    states: list[int] = []
    final: job_pb2.Job | None = None
    async with asyncio.timeout(JOB_DEADLINE_S):
        async for update in client.watch_job(name):
            if not states or states[-1] != update.state:
                states.append(update.state)
            final = update
    assert final is not None, "the watch ended without sending the job"
    return states, final


@pytest.mark.timeout(JOB_DEADLINE_S + 120)
async def test_a_job_runs_end_to_end_on_kind(kind_mesh: KindMesh, tmp_path: Path) -> None:
    async with (
        Client(kind_mesh.provider, kind_mesh.owner) as owner,
        Client(kind_mesh.provider, _new_key()) as consumer,
    ):
        algorithm = await consumer.publish_algorithm(SUM_ALGORITHM, "python3 $ALGO")
        dataset = await owner.publish_dataset(
            [kind_mesh.dataset_path],
            policy=pb.ComputePolicy(
                publisher_trusted_algorithms=[await owner.trust(algorithm.did)]
            ),
        )
        job = await consumer.start_compute(
            [dataset.did], algorithm=algorithm.did, parameters={"factor": 10}
        )

        states, final = await _watch_to_end(consumer, job.name)
        reason = job_pb2.FailureReason.Name(final.failure_reason)
        assert states[-1] == job_pb2.Job.STATE_SUCCEEDED, f"{reason}: {final.message}"
        assert final.status_code == 70
        kinds = {result.name: result.kind for result in final.results}
        assert kinds.get("total.json") == job_pb2.ResultFile.KIND_OUTPUT, kinds
        for kind in (
            job_pb2.ResultFile.KIND_ALGORITHM_LOG,
            job_pb2.ResultFile.KIND_CONFIGURATION_LOG,
            job_pb2.ResultFile.KIND_PUBLISH_LOG,
        ):
            assert kind in kinds.values(), kinds

        output = next(result for result in final.results if result.name == "total.json")
        saved = await consumer.download_result(job.name, output, tmp_path / "total.json")
        assert json.loads(saved.read_text()) == {"total": DATASET_SUM * 10}
        assert hashlib.sha256(saved.read_bytes()).hexdigest() == output.sha256

        log_text = "".join([chunk.text async for chunk in consumer.stream_logs(job.name)])
        assert log_text.strip() == f"total {DATASET_SUM}"

        # Deleting goes through the operator service to the results volume it mounts.
        await consumer.delete_job(job.name)
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await consumer.get_job(job.name)
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
