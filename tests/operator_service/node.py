"""An Operator Engine and an Operator Service in this process, each a real gRPC server on its
own socket, with stubs to call them as the Provider and the Operator Service do."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from c2d.common.v1 import job_pb2
from c2d.engine.v1 import engine_pb2, engine_pb2_grpc
from c2d.operator.v1 import operator_pb2, operator_pb2_grpc

from mesh import jobs as job_facts
from mesh.channels import open_channel
from operator_engine.config import EngineConfig, EnvironmentSpec
from operator_engine.runner import Runner
from operator_service.server import OperatorService
from tests.conftest import SandboxIdentity, engine_and_operator, engine_config
from tests.e2e.test_job import error_info as error_info  # re-exported for these suites

HELLO = b"print('hello', flush=True)\n"


def job_spec(
    data_root: Path,
    owner: str,
    code: bytes = HELLO,
    *,
    viewers: Sequence[str] = (),
    private: bool = False,
    resources: job_pb2.Resources | None = None,
    environment: str = "default",
) -> engine_pb2.JobSpec:
    """A job on one small dataset of its own under the data root."""
    data_root.mkdir(parents=True, exist_ok=True)
    data = data_root / f"data-{uuid.uuid4().hex}.txt"
    content = b"1\n2\n3\n"
    data.write_bytes(content)
    data.chmod(0o644)
    # As the Provider hands it over: the path with the size and sha256 it measured.
    source = engine_pb2.DatasetFileSource(
        path=str(data), size_bytes=len(content), sha256=hashlib.sha256(content).hexdigest()
    )
    return engine_pb2.JobSpec(
        job_id=job_facts.new_job_id(),
        owner=owner,
        datasets=[engine_pb2.DatasetInput(id="d" * 64, files=[source], ddo_json="{}")],
        algorithm=engine_pb2.AlgorithmInput(
            id="a" * 64,
            code=code,
            code_sha256=hashlib.sha256(code).hexdigest(),
            entrypoint="python3 $ALGO",
            private=private,
        ),
        environment=environment,
        viewers=viewers,
        resources=resources,
    )


@dataclass
class Node:
    home: Path
    config: EngineConfig
    runner: Runner
    engine: engine_pb2_grpc.EngineServiceStub
    operator: operator_pb2_grpc.OperatorServiceStub
    service: OperatorService

    def spec(self, owner: str, code: bytes = HELLO, **options: Any) -> engine_pb2.JobSpec:
        return job_spec(self.config.data_root, owner, code, **options)

    async def create(self, spec: engine_pb2.JobSpec) -> job_pb2.Job:
        response = await self.operator.CreateJob(operator_pb2.CreateJobRequest(spec=spec))
        return response.job

    async def get(self, job_id: str, caller: str) -> job_pb2.Job:
        request = operator_pb2.GetJobRequest(job_id=job_id, owner=caller)
        return (await self.operator.GetJob(request)).job

    async def watch_to_end(self, job_id: str, caller: str) -> list[job_pb2.Job]:
        """Every message of WatchJob until the job is final."""
        request = operator_pb2.WatchJobRequest(job_id=job_id, owner=caller)
        async with asyncio.timeout(60):
            return [response.job async for response in self.operator.WatchJob(request)]

    async def log(self, job_id: str, caller: str) -> str:
        """StreamJobLogs from the start to its end."""
        request = operator_pb2.StreamJobLogsRequest(job_id=job_id, owner=caller)
        async with asyncio.timeout(60):
            return "".join([r.chunk.text async for r in self.operator.StreamJobLogs(request)])

    async def result(self, job_id: str, caller: str, index: int) -> bytes:
        request = operator_pb2.ReadResultRequest(job_id=job_id, owner=caller, index=index)
        return b"".join([r.data async for r in self.operator.ReadResult(request)])

    async def algorithm_log(self, job: job_pb2.Job, caller: str) -> str:
        """The published algorithm log of a final job."""
        (log,) = [r for r in job.results if r.kind == job_pb2.ResultFile.KIND_ALGORITHM_LOG]
        job_id = job.name.removeprefix("jobs/")
        return (await self.result(job_id, caller, log.index)).decode()


@contextlib.asynccontextmanager
async def running_node(
    home: Path,
    environments: tuple[EnvironmentSpec, ...] = (EnvironmentSpec(),),
    **engine_settings: Any,
) -> AsyncIterator[Node]:
    """Engine and Operator Service on fresh state under `home` (or on what an earlier node
    left there), stopped again afterwards. `engine_settings` replace fields of EngineConfig."""
    sandbox = SandboxIdentity.new()
    config = dataclasses.replace(engine_config(home, sandbox, environments), **engine_settings)
    config.data_root.mkdir(parents=True, exist_ok=True)
    async with engine_and_operator(home, config, sandbox, lease_s=10) as started:
        engine_server, runner, service = started
        engine_channel = open_channel(engine_server.address)
        operator_channel = open_channel(service.server.address)
        try:
            yield Node(
                home=home,
                config=config,
                runner=runner,
                engine=engine_pb2_grpc.EngineServiceStub(engine_channel),
                operator=operator_pb2_grpc.OperatorServiceStub(operator_channel),
                service=service,
            )
        finally:
            await operator_channel.close()
            await engine_channel.close()
