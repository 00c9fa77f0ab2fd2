"""The ProviderService API: authentication, the asset registry, the dataset's policy, and
jobs through the Operator Service."""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import json
import re
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import structlog
from c2d.common.v1 import job_pb2
from c2d.engine.v1 import engine_pb2
from c2d.operator.v1 import operator_pb2, operator_pb2_grpc
from c2d.provider.v1 import provider_pb2 as pb
from c2d.provider.v1 import provider_pb2_grpc
from google.protobuf import json_format, timestamp_pb2

from mesh import jobs as job_facts
from mesh.auth import checksum
from mesh.channels import UNARY_TIMEOUT
from mesh.errors import InvalidArgument, NotFound, PermissionDenied
from provider import assets
from provider.audit import AuditLog
from provider.auth import Authenticator
from provider.config import ProviderConfig
from provider.policy import check_trusted
from provider.provenance import ProvenanceBook
from provider.store import ProviderStore

log = structlog.get_logger()
Context = grpc.aio.ServicerContext[Any, Any]

MAX_ALGORITHM_BYTES = 16 << 20
MAX_RAW_ALGORITHM_BYTES = 1 << 20
MAX_TOKEN_SECONDS = 24 * 3600
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{0,64}")
# The engine's environments are read again after this long; until _ENVIRONMENTS_STALE_S the
# list at hand answers while the new one is fetched.
_ENVIRONMENTS_FRESH_S = 10.0
_ENVIRONMENTS_STALE_S = 60.0
_RESULT_NAME = re.compile(r"jobs/([0-9a-f]{32})/results/([0-9]{1,6})")


def _page(size: int) -> int:
    if size < 0:
        raise InvalidArgument("page_size must not be negative", field="page_size")
    return min(size or 50, 500)


def _cursor(token: str) -> int:
    if not token:
        return 0
    try:
        return int(base64.urlsafe_b64decode(token.encode()).decode())
    except ValueError:
        raise InvalidArgument("page_token is not valid", field="page_token") from None


def _next_token(rows: list[Any], size: int) -> str:
    return (
        base64.urlsafe_b64encode(str(rows[size - 1][0]).encode()).decode()
        if len(rows) > size
        else ""
    )


def _check_request_id(request_id: str) -> None:
    if not _REQUEST_ID.fullmatch(request_id):
        raise InvalidArgument(
            "request_id must be at most 64 letters, digits or ._:-", field="request_id"
        )


def _check_entrypoint(entrypoint: str, field: str) -> None:
    if "$ALGO" not in entrypoint or "\x00" in entrypoint or len(entrypoint) > 1024:
        raise InvalidArgument(
            f"{field} must name the code as $ALGO, for example 'python3 $ALGO'", field=field
        )


@functools.lru_cache(maxsize=64)
def _ddo_json(record: bytes) -> str:
    """The dataset's description as its jobs see it. Datasets never change once published, so
    each is written once, not at every job."""
    return json_format.MessageToJson(pb.Dataset.FromString(record), indent=2)


def _whole_numbers(value: Any) -> Any:
    """Struct numbers are doubles; an algorithm given {"x": 1} expects 1, not 1.0."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _whole_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole_numbers(v) for v in value]
    return value


class ProviderServicer(provider_pb2_grpc.ProviderServiceServicer):
    def __init__(
        self,
        config: ProviderConfig,
        store: ProviderStore,
        operator: operator_pb2_grpc.OperatorServiceAsyncStub,
    ) -> None:
        self.config = config
        self.store = store
        self.operator = operator
        self.auth = Authenticator(store)
        self.audit = AuditLog(store.db)
        self.provenance = ProvenanceBook(store.db)
        self._environments: tuple[float, list[job_pb2.Environment]] = (0.0, [])
        self._refreshing: asyncio.Task[None] | None = None

    # -- tokens --------------------------------------------------------------------------

    async def CreateAuthToken(
        self, request: pb.CreateAuthTokenRequest, context: Context
    ) -> pb.CreateAuthTokenResponse:
        caller = await self.auth.signed(context, "CreateAuthToken", request)
        seconds = request.valid_for.seconds if request.HasField("valid_for") else 3600
        if not 0 < seconds <= MAX_TOKEN_SECONDS:
            raise InvalidArgument("valid_for must be between 1 s and 24 h", field="valid_for")
        token = secrets.token_urlsafe(32)
        expires = time.time() + seconds
        await self.store.add_token(token, caller.address, expires)
        expire_time = timestamp_pb2.Timestamp()
        expire_time.FromSeconds(int(expires))
        return pb.CreateAuthTokenResponse(token=token, expire_time=expire_time)

    async def RevokeAuthToken(
        self, request: pb.RevokeAuthTokenRequest, context: Context
    ) -> pb.RevokeAuthTokenResponse:
        caller = await self.auth.signed(context, "RevokeAuthToken", request)
        if not await self.store.revoke_token(request.token, caller.address):
            raise NotFound("you have no such token", reason="TOKEN_NOT_FOUND")
        return pb.RevokeAuthTokenResponse()

    # -- datasets ------------------------------------------------------------------------

    async def PublishDataset(
        self, request: pb.PublishDatasetRequest, context: Context
    ) -> pb.PublishDatasetResponse:
        caller = await self.auth.signed(context, "PublishDataset", request)
        if caller.address not in self.config.owners:
            raise PermissionDenied(
                "only the node's data owners may publish datasets", reason="NOT_A_DATA_OWNER"
            )
        _check_request_id(request.request_id)
        if request.request_id:
            previous = await self.store.request_resource(caller.address, request.request_id)
            if previous is not None:
                return pb.PublishDatasetResponse(dataset=await self._dataset(previous))
        if not 1 <= len(request.file_paths) <= assets.MAX_DATASET_FILES:
            raise InvalidArgument("file_paths must list 1 to 1000 files", field="file_paths")
        self._check_policy(request.policy)
        # One thread for every file: the data root is resolved once, not per file.
        checked = await asyncio.to_thread(
            assets.check_dataset_files, list(request.file_paths), self.config.data_root
        )
        dataset_id = assets.derive_id(caller.address, caller.nonce)
        dataset = pb.Dataset(
            name=f"datasets/{dataset_id}",
            did=assets.did(dataset_id),
            publisher=caller.address,
            metadata=request.metadata,
            files=[
                pb.DatasetFile(index=i, size_bytes=f.size, sha256=f.sha256)
                for i, f in enumerate(checked)
            ],
            policy=request.policy,
        )
        dataset.create_time.GetCurrentTime()
        await self.store.add_dataset(dataset, [f.path for f in checked])
        if request.request_id:
            await self.store.remember_request(caller.address, request.request_id, dataset.name)
        log.info("dataset published", dataset=dataset.did, files=len(checked))
        return pb.PublishDatasetResponse(dataset=dataset)

    def _check_policy(self, policy: pb.ComputePolicy) -> None:
        for i, trusted in enumerate(policy.publisher_trusted_algorithms):
            field = f"policy.publisher_trusted_algorithms[{i}]"
            if not re.fullmatch(r"did:c2d:[0-9a-f]{64}", trusted.did):
                raise InvalidArgument(f"{field}.did must be did:c2d:<64 hex>", field=field)
            for name in ("files_checksum", "container_section_checksum"):
                if not re.fullmatch(r"[0-9a-f]{64}", getattr(trusted, name)):
                    raise InvalidArgument(
                        f"{field}.{name} must be 64 lowercase hex digits", field=f"{field}.{name}"
                    )
        for i, publisher in enumerate(policy.publisher_trusted_algorithm_publishers):
            if publisher == "*":
                continue
            try:
                checksum(publisher)
            except ValueError:
                field = f"policy.publisher_trusted_algorithm_publishers[{i}]"
                raise InvalidArgument(f'{field} must be an address or "*"', field=field) from None
        if policy.timeout.seconds < 0:
            raise InvalidArgument("policy.timeout must not be negative", field="policy.timeout")

    async def _dataset(self, name: str, field: str = "name") -> pb.Dataset:
        return (await self._dataset_with_files(name, field))[0]

    async def GetDataset(
        self, request: pb.GetDatasetRequest, context: Context
    ) -> pb.GetDatasetResponse:
        return pb.GetDatasetResponse(dataset=await self._dataset(request.name))

    async def ListDatasets(
        self, request: pb.ListDatasetsRequest, context: Context
    ) -> pb.ListDatasetsResponse:
        size = _page(request.page_size)
        rows = await self.store.datasets(size + 1, _cursor(request.page_token))
        return pb.ListDatasetsResponse(
            datasets=[d for _, d in rows[:size]], next_page_token=_next_token(rows, size)
        )

    # -- algorithms ----------------------------------------------------------------------

    async def PublishAlgorithm(
        self, request: pb.PublishAlgorithmRequest, context: Context
    ) -> pb.PublishAlgorithmResponse:
        caller = await self.auth.signed(context, "PublishAlgorithm", request)
        _check_request_id(request.request_id)
        if request.request_id:
            previous = await self.store.request_resource(caller.address, request.request_id)
            if previous is not None:
                return pb.PublishAlgorithmResponse(algorithm=await self._algorithm(previous))
        if not request.code:
            raise InvalidArgument("code must not be empty", field="code")
        if len(request.code) > MAX_ALGORITHM_BYTES:
            raise InvalidArgument("code must be at most 16 MiB", field="code")
        _check_entrypoint(request.entrypoint, "entrypoint")
        algorithm_id = assets.derive_id(caller.address, caller.nonce)
        algorithm = pb.Algorithm(
            name=f"algorithms/{algorithm_id}",
            did=assets.did(algorithm_id),
            publisher=caller.address,
            metadata=request.metadata,
            entrypoint=request.entrypoint,
            files_checksum=assets.files_checksum([request.code]),
            container_section_checksum=assets.container_section_checksum(request.entrypoint),
            size_bytes=len(request.code),
        )
        algorithm.create_time.GetCurrentTime()
        await self.store.add_algorithm(algorithm, request.code)
        if request.request_id:
            await self.store.remember_request(caller.address, request.request_id, algorithm.name)
        log.info("algorithm published", algorithm=algorithm.did)
        return pb.PublishAlgorithmResponse(algorithm=algorithm)

    async def _algorithm(self, name: str, field: str = "name") -> pb.Algorithm:
        return (await self._algorithm_with_code(name, field))[0]

    async def GetAlgorithm(
        self, request: pb.GetAlgorithmRequest, context: Context
    ) -> pb.GetAlgorithmResponse:
        return pb.GetAlgorithmResponse(algorithm=await self._algorithm(request.name))

    async def ListAlgorithms(
        self, request: pb.ListAlgorithmsRequest, context: Context
    ) -> pb.ListAlgorithmsResponse:
        size = _page(request.page_size)
        rows = await self.store.algorithms(size + 1, _cursor(request.page_token))
        return pb.ListAlgorithmsResponse(
            algorithms=[a for _, a in rows[:size]], next_page_token=_next_token(rows, size)
        )

    async def ListEnvironments(
        self, request: pb.ListEnvironmentsRequest, context: Context
    ) -> pb.ListEnvironmentsResponse:
        return pb.ListEnvironmentsResponse(environments=await self._environment_list())

    async def _environment_list(self) -> list[job_pb2.Environment]:
        fetched, environments = self._environments
        age = time.monotonic() - fetched
        if environments and age < _ENVIRONMENTS_FRESH_S:
            return environments
        if environments and age < _ENVIRONMENTS_STALE_S:
            # Answer with the list at hand and fetch a new one beside this call: a
            # StartCompute every ten seconds no longer pays two more hops.
            if self._refreshing is None or self._refreshing.done():
                self._refreshing = asyncio.create_task(self._refresh_environments())
            return environments
        return await self._fetch_environments()

    async def _fetch_environments(self) -> list[job_pb2.Environment]:
        response = await self.operator.ListEnvironments(
            operator_pb2.ListEnvironmentsRequest(), timeout=UNARY_TIMEOUT
        )
        environments = list(response.environments)
        self._environments = (time.monotonic(), environments)
        return environments

    async def _refresh_environments(self) -> None:
        try:
            await self._fetch_environments()
        except (grpc.aio.AioRpcError, grpc.aio.UsageError) as error:
            # The list at hand stays; a call past _ENVIRONMENTS_STALE_S fetches it itself.
            log.debug("environments not refreshed", error=str(error))

    # -- jobs ----------------------------------------------------------------------------

    async def StartCompute(
        self, request: pb.StartComputeRequest, context: Context
    ) -> pb.StartComputeResponse:
        caller = await self.auth.signed(context, "StartCompute", request)
        _check_request_id(request.request_id)
        if request.request_id:
            previous = await self.store.request_resource(caller.address, request.request_id)
            if previous is not None:
                return pb.StartComputeResponse(job=await self._job(previous, caller.address))
        if not request.dataset:
            raise InvalidArgument("dataset is required", field="dataset")
        names = [request.dataset, *request.additional_datasets]
        fields = [
            "dataset",
            *(f"additional_datasets[{i}]" for i in range(len(request.additional_datasets))),
        ]
        if len(set(names)) != len(names):
            raise InvalidArgument("a dataset is listed twice", field="additional_datasets")
        datasets = [
            await self._dataset_with_files(n, f) for n, f in zip(names, fields, strict=True)
        ]
        algorithm, code = await self._resolve_algorithm(request)
        for dataset, _ in datasets:
            check_trusted(dataset, algorithm)
        environment = request.environment or "default"
        environments = {e.name: e for e in await self._environment_list()}
        if environment not in environments:
            raise NotFound(f"no environment named {environment!r}", reason="ENVIRONMENT_NOT_FOUND")
        parameters = _whole_numbers(json_format.MessageToDict(request.parameters))
        spec = engine_pb2.JobSpec(
            job_id=job_facts.new_job_id(),
            owner=caller.address,
            datasets=[
                engine_pb2.DatasetInput(
                    id=dataset.name.removeprefix("datasets/"),
                    file_paths=paths,
                    ddo_json=_ddo_json(dataset.SerializeToString(deterministic=True)),
                )
                for dataset, paths in datasets
            ],
            algorithm=engine_pb2.AlgorithmInput(
                id=algorithm.name.removeprefix("algorithms/") if algorithm else "",
                code=code,
                code_sha256=hashlib.sha256(code).hexdigest(),
                entrypoint=algorithm.entrypoint if algorithm else request.raw_algorithm.entrypoint,
            ),
            parameters_json=json.dumps(parameters) if parameters else "",
            environment=environment,
            allow_network=all(d.policy.allow_network_access for d, _ in datasets),
        )
        structlog.contextvars.bind_contextvars(job_id=spec.job_id)
        response = await self.operator.CreateJob(
            operator_pb2.CreateJobRequest(spec=spec), timeout=UNARY_TIMEOUT
        )
        if request.request_id:
            await self.store.remember_request(caller.address, request.request_id, response.job.name)
        log.info(
            "compute started",
            datasets=len(datasets),
            algorithm=algorithm.did if algorithm else "raw",
        )
        return pb.StartComputeResponse(job=response.job)

    async def _dataset_with_files(
        self, name: str, field: str = "name"
    ) -> tuple[pb.Dataset, list[str]]:
        """The dataset with the paths of its files (for the engine only)."""
        found = await self.store.dataset(job_facts.parse_name(name, "datasets", field))
        if found is None:
            raise NotFound(f"no dataset {name}", reason="DATASET_NOT_FOUND")
        return found

    async def _algorithm_with_code(
        self, name: str, field: str = "name"
    ) -> tuple[pb.Algorithm, bytes]:
        """The algorithm with its code (for the engine only)."""
        found = await self.store.algorithm(job_facts.parse_name(name, "algorithms", field))
        if found is None:
            raise NotFound(f"no algorithm {name}", reason="ALGORITHM_NOT_FOUND")
        return found

    async def _resolve_algorithm(
        self, request: pb.StartComputeRequest
    ) -> tuple[pb.Algorithm | None, bytes]:
        raw = request.raw_algorithm
        if request.algorithm:
            if raw.code or raw.entrypoint:
                raise InvalidArgument(
                    "send either algorithm or raw_algorithm, not both", field="raw_algorithm"
                )
            return await self._algorithm_with_code(request.algorithm, "algorithm")
        if not raw.code:
            raise InvalidArgument("algorithm or raw_algorithm.code is required", field="algorithm")
        code = raw.code.encode()
        if len(code) > MAX_RAW_ALGORITHM_BYTES:
            raise InvalidArgument(
                "raw_algorithm.code must be at most 1 MiB", field="raw_algorithm.code"
            )
        _check_entrypoint(raw.entrypoint, "raw_algorithm.entrypoint")
        return None, code

    async def _job(self, name: str, owner: str) -> job_pb2.Job:
        job_id = job_facts.parse_name(name, "jobs")
        response = await self.operator.GetJob(
            operator_pb2.GetJobRequest(job_id=job_id, owner=owner), timeout=UNARY_TIMEOUT
        )
        return response.job

    async def GetJob(self, request: pb.GetJobRequest, context: Context) -> pb.GetJobResponse:
        caller = await self.auth.reader(context, "GetJob", request)
        return pb.GetJobResponse(job=await self._job(request.name, caller.address))

    async def ListJobs(self, request: pb.ListJobsRequest, context: Context) -> pb.ListJobsResponse:
        caller = await self.auth.reader(context, "ListJobs", request)
        response = await self.operator.ListJobs(
            operator_pb2.ListJobsRequest(
                owner=caller.address, page_size=request.page_size, page_token=request.page_token
            ),
            timeout=UNARY_TIMEOUT,
        )
        return pb.ListJobsResponse(jobs=response.jobs, next_page_token=response.next_page_token)

    async def WatchJob(
        self, request: pb.WatchJobRequest, context: Context
    ) -> AsyncIterator[pb.WatchJobResponse]:
        caller = await self.auth.reader(context, "WatchJob", request)
        job_id = job_facts.parse_name(request.name, "jobs")
        structlog.contextvars.bind_contextvars(job_id=job_id)
        async for response in self.operator.WatchJob(
            operator_pb2.WatchJobRequest(job_id=job_id, owner=caller.address)
        ):
            yield pb.WatchJobResponse(job=response.job)

    async def StreamJobLogs(
        self, request: pb.StreamJobLogsRequest, context: Context
    ) -> AsyncIterator[pb.StreamJobLogsResponse]:
        caller = await self.auth.reader(context, "StreamJobLogs", request)
        job_id = job_facts.parse_name(request.name, "jobs")
        structlog.contextvars.bind_contextvars(job_id=job_id)
        if request.offset < 0:
            raise InvalidArgument("offset must not be negative", field="offset")
        async for response in self.operator.StreamJobLogs(
            operator_pb2.StreamJobLogsRequest(
                job_id=job_id, owner=caller.address, offset=request.offset
            )
        ):
            yield pb.StreamJobLogsResponse(chunk=response.chunk)

    async def StopJob(self, request: pb.StopJobRequest, context: Context) -> pb.StopJobResponse:
        caller = await self.auth.signed(context, "StopJob", request)
        job_id = job_facts.parse_name(request.name, "jobs")
        structlog.contextvars.bind_contextvars(job_id=job_id)
        response = await self.operator.StopJob(
            operator_pb2.StopJobRequest(job_id=job_id, owner=caller.address),
            timeout=UNARY_TIMEOUT,
        )
        return pb.StopJobResponse(job=response.job)

    async def DeleteJob(
        self, request: pb.DeleteJobRequest, context: Context
    ) -> pb.DeleteJobResponse:
        caller = await self.auth.signed(context, "DeleteJob", request)
        job_id = job_facts.parse_name(request.name, "jobs")
        structlog.contextvars.bind_contextvars(job_id=job_id)
        await self.operator.DeleteJob(
            operator_pb2.DeleteJobRequest(job_id=job_id, owner=caller.address),
            timeout=UNARY_TIMEOUT,
        )
        return pb.DeleteJobResponse()

    async def DownloadResult(
        self, request: pb.DownloadResultRequest, context: Context
    ) -> AsyncIterator[pb.DownloadResultResponse]:
        caller = await self.auth.reader(context, "DownloadResult", request)
        match = _RESULT_NAME.fullmatch(request.name)
        if match is None:
            raise InvalidArgument("name must look like jobs/{job}/results/{index}", field="name")
        job_id, index = match.group(1), int(match.group(2))
        structlog.contextvars.bind_contextvars(job_id=job_id)
        if request.offset < 0:
            raise InvalidArgument("offset must not be negative", field="offset")
        async for response in self.operator.ReadResult(
            operator_pb2.ReadResultRequest(
                job_id=job_id, owner=caller.address, index=index, offset=request.offset
            )
        ):
            yield pb.DownloadResultResponse(offset=response.offset, data=response.data)
