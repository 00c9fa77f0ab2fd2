"""The ProviderService API: authentication, the asset registry, the dataset's policy, and
jobs through the Operator Service. Every decision is written to the audit log, and what a job
was started with to its provenance."""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import structlog
from c2d.common.v1 import container_pb2, job_pb2
from c2d.operator.v1 import operator_pb2, operator_pb2_grpc
from c2d.provider.v1 import provider_pb2 as pb
from c2d.provider.v1 import provider_pb2_grpc
from google.protobuf import json_format, timestamp_pb2

from mesh import containers, delivery
from mesh import jobs as job_facts
from mesh.channels import UNARY_TIMEOUT
from mesh.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from provider import assets, derived, launch, orders, parameters, request_fields, sources
from provider.approvals import ApprovalBook, ApprovalsMixin
from provider.audit import AuditLog, AuditMixin
from provider.auth import Authenticator, require_owner
from provider.config import ProviderConfig
from provider.launch import DecidedDataset, JobPlan
from provider.policy import check_policy, check_trusted, network_allowed
from provider.provenance import ProvenanceBook, ProvenanceMixin
from provider.sources import FileSource
from provider.store import ProviderStore

log = structlog.get_logger()
Context = grpc.aio.ServicerContext[Any, Any]

MAX_ALGORITHM_BYTES = 16 << 20
MAX_RAW_ALGORITHM_BYTES = 1 << 20
MAX_TOKEN_SECONDS = 24 * 3600
# Algorithm code streams in chunks of this size, as results do.
_CHUNK_BYTES = 1 << 20
# The engine's environments are read again after this long; until _ENVIRONMENTS_STALE_S the
# list at hand answers while the new one is fetched.
_ENVIRONMENTS_FRESH_S = 10.0
_ENVIRONMENTS_STALE_S = 60.0
_RESULT_NAME = re.compile(r"jobs/([0-9a-f]{32})/results/([0-9]{1,6})")


def _no_algorithm(name: str) -> NotFound:
    return NotFound(f"no algorithm {name}", reason="ALGORITHM_NOT_FOUND")


def _check_entrypoint(entrypoint: str, field: str) -> None:
    if "$ALGO" not in entrypoint or "\x00" in entrypoint or len(entrypoint) > 1024:
        raise InvalidArgument(
            f"{field} must name the code as $ALGO, for example 'python3 $ALGO'", field=field
        )


def _set_code(
    algorithm: pb.Algorithm,
    code: bytes,
    entrypoint: str,
    specs: Sequence[pb.ParameterSpec],
    container: container_pb2.Container,
) -> None:
    """Checks an algorithm's code, entrypoint, parameter declaration and container
    (INVALID_ARGUMENT naming the field) and sets them on its record, with the checksums and
    size they give."""
    if not code:
        raise InvalidArgument("code must not be empty", field="code")
    if len(code) > MAX_ALGORITHM_BYTES:
        raise InvalidArgument("code must be at most 16 MiB", field="code")
    _check_entrypoint(entrypoint, "entrypoint")
    parameters.check_declaration(specs)
    containers.check_container(container, "container")
    algorithm.entrypoint = entrypoint
    if containers.is_set(container):
        algorithm.container.CopyFrom(container)
    else:
        algorithm.ClearField("container")
    algorithm.files_checksum = assets.files_checksum([code])
    algorithm.container_section_checksum = assets.container_section_checksum(
        entrypoint, container.checksum
    )
    algorithm.size_bytes = len(code)
    del algorithm.parameters[:]
    algorithm.parameters.extend(specs)


def _dataset_ids(request: pb.StartComputeRequest | pb.InitializeComputeRequest) -> list[str]:
    """The ids of the job's datasets, main one first; INVALID_ARGUMENT naming a malformed or
    repeated one."""
    if not request.dataset:
        raise InvalidArgument("dataset is required", field="dataset")
    names = [request.dataset, *request.additional_datasets]
    fields = [
        "dataset",
        *(f"additional_datasets[{i}]" for i in range(len(request.additional_datasets))),
    ]
    if len(set(names)) != len(names):
        raise InvalidArgument("a dataset is listed twice", field="additional_datasets")
    return [job_facts.parse_name(n, "datasets", f) for n, f in zip(names, fields, strict=True)]


def _result_name(name: str) -> tuple[str, int]:
    """The job id and result index of `jobs/{job}/results/{index}`, the job bound to the log
    context; INVALID_ARGUMENT naming `name` otherwise."""
    match = _RESULT_NAME.fullmatch(name)
    if match is None:
        raise InvalidArgument("name must look like jobs/{job}/results/{index}", field="name")
    job_id = match.group(1)
    structlog.contextvars.bind_contextvars(job_id=job_id)
    return job_id, int(match.group(2))


def _start_details(
    algorithm: pb.Algorithm | None,
    datasets: Sequence[DecidedDataset],
    environment: job_pb2.Environment,
) -> dict[str, Any]:
    """What the audit log says of a job's start: the algorithm, the datasets decided so far
    with their policy versions and bases, and the environment."""
    return {
        "algorithm": algorithm.did if algorithm else "raw",
        "datasets": [
            {"name": d.record.name, "policy_version": d.record.policy_version, "decision": d.basis}
            for d in datasets
        ],
        "environment": environment.name,
    }


def _delivery_details(request: pb.StartComputeRequest, job_id: str | None) -> dict[str, Any]:
    """The results asked for and the delivery destination, as the audit log names them: its
    description for `job_id` (never a key or a URL), or only its kind when `job_id` is None."""
    kind = request.delivery.WhichOneof("destination") or ""
    return {
        "result_selection": launch.RESULT_WORDS.get(request.results, str(request.results)),
        "delivery": kind if job_id is None else delivery.describe(request.delivery, job_id),
    }


class ProviderServicer(
    ApprovalsMixin, ProvenanceMixin, AuditMixin, provider_pb2_grpc.ProviderServiceServicer
):
    def __init__(
        self,
        config: ProviderConfig,
        store: ProviderStore,
        operator: operator_pb2_grpc.OperatorServiceAsyncStub,
        *,
        audit: AuditLog,
        provenance: ProvenanceBook,
        approvals: ApprovalBook,
        payments: orders.Payments,
    ) -> None:
        self.config = config
        self.store = store
        self.operator = operator
        self.auth = Authenticator(store)
        self.audit = audit
        self.provenance = provenance
        self.approvals = approvals
        self.payments = payments
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
        async with self.audit.refusals(caller.address, "dataset.publish", "datasets"):
            require_owner(caller, self.config.owners, "publish datasets")
        request_fields.check_request_id(request.request_id)
        previous = await self.store.request_resource(caller.address, request.request_id)
        if previous is not None:
            return pb.PublishDatasetResponse(dataset=await self._dataset(previous))
        requested = sources.requested_files(request)
        check_policy(request.policy)
        if request.sample_of:
            # Checked before the files are hashed, and again as the dataset is added.
            refusal = self.store.sample_refusal(
                job_facts.parse_name(request.sample_of, "datasets", "sample_of")
            )
            if refusal is not None:
                raise refusal
        # One thread for every local file: the data root is resolved once, not per file.
        checked = await asyncio.to_thread(sources.measure, requested, self.config.data_root)
        pricing = await self.payments.pricing(request.pricing, caller.address)
        dataset = sources.new_dataset(
            assets.derive_id(caller.address, caller.nonce),
            caller.address,
            request.metadata,
            request.policy,
            checked,
            sample_of=request.sample_of,
            pricing=pricing,
        )
        async with self._selling(dataset.name, pricing):
            await self.store.add_dataset(dataset, checked)
        await self.store.remember_request(caller.address, request.request_id, dataset.name)
        await self.audit.record(
            caller.address,
            "dataset.publish",
            dataset.name,
            allowed=True,
            details={
                "policy_version": 1,
                # How many, never where: the log is read by every owner, locations by none.
                "files": len(checked),
                "remote_files": sum(f.remote for f in checked),
                "sample_of": request.sample_of,
                "datatoken": pricing.datatoken if pricing else "",
            },
        )
        log.info(
            "dataset published",
            dataset=dataset.did,
            files=len(checked),
            remote_files=sum(f.remote for f in checked),
        )
        return pb.PublishDatasetResponse(dataset=dataset)

    @contextlib.asynccontextmanager
    async def _selling(self, asset: str, pricing: pb.Pricing | None) -> AsyncIterator[None]:
        """Binds the datatoken's service to the asset being added, and frees it again when
        the asset is not added after all."""
        if pricing is None:
            yield
            return
        self.payments.claim_service(asset, pricing)
        try:
            yield
        except BaseException:
            self.payments.release_service(pricing)
            raise

    async def UpdateDatasetPolicy(
        self, request: pb.UpdateDatasetPolicyRequest, context: Context
    ) -> pb.UpdateDatasetPolicyResponse:
        caller = await self.auth.signed(context, "UpdateDatasetPolicy", request)
        dataset_id = job_facts.parse_name(request.name, "datasets")
        action = "dataset.policy.update"
        async with self.audit.refusals(caller.address, action, request.name):
            # The node's owners, and for a dataset made from a job's outputs its publisher.
            await derived.require_policy_editor(self.store, caller, self.config.owners, dataset_id)
            check_policy(request.policy)
            if request.expected_policy_version < 0:
                raise InvalidArgument(
                    "expected_policy_version must not be negative",
                    field="expected_policy_version",
                )
            dataset = await self.store.update_dataset_policy(
                dataset_id, request.policy, request.expected_policy_version
            )
        await self.audit.record(
            caller.address,
            action,
            dataset.name,
            allowed=True,
            details={
                "old_policy_version": dataset.policy_version - 1,
                "new_policy_version": dataset.policy_version,
            },
        )
        log.info("dataset policy changed", dataset=dataset.did, version=dataset.policy_version)
        return pb.UpdateDatasetPolicyResponse(dataset=dataset)

    async def _dataset(self, name: str, field: str = "name") -> pb.Dataset:
        found = await self.store.dataset_record(job_facts.parse_name(name, "datasets", field))
        if found is None:
            raise NotFound(f"no dataset {name}", reason="DATASET_NOT_FOUND")
        return found

    async def GetDataset(
        self, request: pb.GetDatasetRequest, context: Context
    ) -> pb.GetDatasetResponse:
        return pb.GetDatasetResponse(dataset=await self._dataset(request.name))

    async def ListDatasets(
        self, request: pb.ListDatasetsRequest, context: Context
    ) -> pb.ListDatasetsResponse:
        size = request_fields.page_size(request.page_size)
        rows = await self.store.datasets(
            size + 1, request_fields.page_position(request.page_token) or 0
        )
        datasets, token = request_fields.one_page(rows, size)
        return pb.ListDatasetsResponse(datasets=datasets, next_page_token=token)

    # -- algorithms ----------------------------------------------------------------------

    async def PublishAlgorithm(
        self, request: pb.PublishAlgorithmRequest, context: Context
    ) -> pb.PublishAlgorithmResponse:
        caller = await self.auth.signed(context, "PublishAlgorithm", request)
        request_fields.check_request_id(request.request_id)
        previous = await self.store.request_resource(caller.address, request.request_id)
        if previous is not None:
            return pb.PublishAlgorithmResponse(algorithm=await self._algorithm(previous))
        access = request.access or pb.ALGORITHM_ACCESS_PRIVATE
        if access not in assets.ACCESS_WORDS:
            raise InvalidArgument("access must be PUBLIC or PRIVATE", field="access")
        algorithm_id = assets.derive_id(caller.address, caller.nonce)
        algorithm = pb.Algorithm(
            name=f"algorithms/{algorithm_id}",
            did=assets.did(algorithm_id),
            publisher=caller.address,
            metadata=request.metadata,
            access=access,
            version=1,
        )
        # The code is checked before the chain is asked about the price.
        _set_code(
            algorithm, request.code, request.entrypoint, request.parameters, request.container
        )
        pricing = await self.payments.pricing(request.pricing, caller.address)
        if pricing is not None:
            algorithm.pricing.CopyFrom(pricing)
        algorithm.create_time.GetCurrentTime()
        algorithm.update_time.CopyFrom(algorithm.create_time)
        async with self._selling(algorithm.name, pricing):
            await self.store.add_algorithm(algorithm, request.code)
        await self.store.remember_request(caller.address, request.request_id, algorithm.name)
        await self.audit.record(
            caller.address,
            "algorithm.publish",
            algorithm.name,
            allowed=True,
            details={
                "access": assets.ACCESS_WORDS[access],
                "files_checksum": algorithm.files_checksum,
            },
        )
        log.info("algorithm published", algorithm=algorithm.did)
        return pb.PublishAlgorithmResponse(algorithm=algorithm)

    async def UpdateAlgorithm(
        self, request: pb.UpdateAlgorithmRequest, context: Context
    ) -> pb.UpdateAlgorithmResponse:
        caller = await self.auth.signed(context, "UpdateAlgorithm", request)
        async with self.audit.refusals(caller.address, "algorithm.update", request.name):
            algorithm = await self._algorithm(request.name)
            if algorithm.publisher != caller.address:
                raise PermissionDenied(
                    f"only the publisher of {algorithm.name} may update it",
                    reason="NOT_THE_PUBLISHER",
                )
            _set_code(
                algorithm, request.code, request.entrypoint, request.parameters, request.container
            )
        algorithm.update_time.GetCurrentTime()
        algorithm = await self.store.update_algorithm(algorithm, request.code)
        await self.audit.record(
            caller.address,
            "algorithm.update",
            algorithm.name,
            allowed=True,
            details={"version": algorithm.version, "files_checksum": algorithm.files_checksum},
        )
        log.info("algorithm updated", algorithm=algorithm.did, version=algorithm.version)
        return pb.UpdateAlgorithmResponse(algorithm=algorithm)

    async def DownloadAlgorithm(
        self, request: pb.DownloadAlgorithmRequest, context: Context
    ) -> AsyncIterator[pb.DownloadAlgorithmResponse]:
        # The record first: a refused caller never makes the node read the code (16 MiB).
        reader = await self._code_reader(await self._algorithm(request.name), request, context)
        algorithm, code = await self._algorithm_with_code(request.name)
        if not 0 <= request.offset <= len(code):
            raise InvalidArgument("offset is outside the code", field="offset")
        await self.audit.record(
            reader,
            "algorithm.download",
            algorithm.name,
            allowed=True,
            details={"offset": request.offset},
        )
        for start in range(request.offset, len(code), _CHUNK_BYTES):
            yield pb.DownloadAlgorithmResponse(
                offset=start, data=code[start : start + _CHUNK_BYTES]
            )

    async def _code_reader(
        self, algorithm: pb.Algorithm, request: pb.DownloadAlgorithmRequest, context: Context
    ) -> str:
        """Who reads the algorithm's code ("" for anyone without credentials): anyone for a
        public algorithm; for a private one its publisher, or a data owner while an approval
        request for it is pending. PERMISSION_DENIED (audited) for anyone else."""
        public = algorithm.access == pb.ALGORITHM_ACCESS_PUBLIC
        try:
            caller = await self.auth.reader(context, "DownloadAlgorithm", request)
        except Unauthenticated as error:
            if public and error.reason == "CREDENTIALS_REQUIRED":
                return ""
            raise
        if public or caller.address == algorithm.publisher:
            return caller.address
        if caller.address in self.config.owners and await self.approvals.pending_for(
            algorithm.name
        ):
            return caller.address
        await self.audit.record(
            caller.address,
            "algorithm.download",
            algorithm.name,
            allowed=False,
            reason="ALGORITHM_PRIVATE",
        )
        raise PermissionDenied(
            f"{algorithm.name} is private: its code is usable only inside jobs",
            reason="ALGORITHM_PRIVATE",
        )

    async def _algorithm(self, name: str, field: str = "name") -> pb.Algorithm:
        found = await self.store.algorithm(job_facts.parse_name(name, "algorithms", field))
        if found is None:
            raise _no_algorithm(name)
        return found

    async def GetAlgorithm(
        self, request: pb.GetAlgorithmRequest, context: Context
    ) -> pb.GetAlgorithmResponse:
        return pb.GetAlgorithmResponse(algorithm=await self._algorithm(request.name))

    async def ListAlgorithms(
        self, request: pb.ListAlgorithmsRequest, context: Context
    ) -> pb.ListAlgorithmsResponse:
        size = request_fields.page_size(request.page_size)
        rows = await self.store.algorithms(
            size + 1, request_fields.page_position(request.page_token) or 0
        )
        algorithms, token = request_fields.one_page(rows, size)
        return pb.ListAlgorithmsResponse(algorithms=algorithms, next_page_token=token)

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
        request_fields.check_request_id(request.request_id)
        previous = await self.store.request_resource(caller.address, request.request_id)
        if previous is not None:
            return pb.StartComputeResponse(job=await self._job(previous, caller.address))
        await self._check_results_and_delivery(caller.address, request)
        viewers = job_facts.check_viewers(caller.address, request.viewers, at_the_edge=True)
        dataset_ids = _dataset_ids(request)
        algorithm, code = await self._resolve_algorithm(request)
        environment = await self._environment(request.environment or "default")
        decided: list[DecidedDataset] = []
        try:
            allow_network, values = await self._decide(
                request, dataset_ids, algorithm, environment, decided, request.require_network
            )
            paid = orders.paid_assets([d.record for d in decided], algorithm)
            paid_by = await self.payments.verify(
                caller.address, paid, environment, list(request.orders)
            )
        except (PermissionDenied, InvalidArgument, FailedPrecondition) as refusal:
            await self.audit.record(
                caller.address,
                "compute.start",
                request.dataset,
                allowed=False,
                reason=refusal.reason,
                details={
                    **_start_details(algorithm, decided, environment),
                    "message": refusal.message,
                },
            )
            raise

        job = await self._launch(
            JobPlan(
                owner=caller,
                datasets=decided,
                algorithm=algorithm,
                code=code,
                entrypoint=algorithm.entrypoint if algorithm else request.raw_algorithm.entrypoint,
                container=algorithm.container if algorithm else request.raw_algorithm.container,
                parameters=values,
                environment=environment,
                allow_network=allow_network,
                viewers=viewers,
                resources=request.resources,
                orders=paid_by,
                results=request.results,
                delivery=request.delivery,
            )
        )
        await self.store.remember_request(caller.address, request.request_id, job.name)
        await self.audit.record(
            caller.address,
            "compute.start",
            job.name,
            allowed=True,
            reason=",".join(d.basis for d in decided),
            details={
                **_start_details(algorithm, decided, environment),
                "orders": paid_by,
                **_delivery_details(request, job_facts.parse_name(job.name, "jobs")),
            },
        )
        log.info(
            "compute started",
            datasets=len(decided),
            algorithm=algorithm.did if algorithm else "raw",
            results=launch.RESULT_WORDS[request.results],
            delivery=request.delivery.WhichOneof("destination") or "none",
        )
        return pb.StartComputeResponse(job=job)

    async def _check_results_and_delivery(
        self, caller: str, request: pb.StartComputeRequest
    ) -> None:
        """The consumer's choice of results and its delivery destination, checked before any
        lookup, chain or payment work (a destination's host is resolved, never connected to):
        INVALID_ARGUMENT naming the field, or PERMISSION_DENIED (DELIVERY_NOT_ALLOWED). Each
        refusal is audited, the destination named by its description only."""
        try:
            delivery.check_results(request.results)
            delivery.check_delivery(request.delivery)
            await delivery.check_destination(request.delivery, self.config.delivery_allow_hosts)
        except (InvalidArgument, PermissionDenied) as refusal:
            # Malformed (INVALID_ARGUMENT), a destination is named by its kind alone: its
            # fields are unchecked. Refused (PERMISSION_DENIED), it was well formed.
            well_formed = isinstance(refusal, PermissionDenied)
            await self.audit.record(
                caller,
                "compute.start",
                request.dataset,
                allowed=False,
                reason=refusal.reason,
                details={
                    **_delivery_details(request, "{job}" if well_formed else None),
                    "field": refusal.field or "",
                    "message": refusal.message,
                },
            )
            raise

    async def _decide(
        self,
        request: pb.StartComputeRequest | pb.InitializeComputeRequest,
        dataset_ids: list[str],
        algorithm: pb.Algorithm | None,
        environment: job_pb2.Environment,
        decided: list[DecidedDataset],
        require_network: bool,
    ) -> tuple[bool, dict[str, Any]]:
        """Checks the job against every dataset's policy, the parameters and the resources,
        adding each dataset to `decided` as its policy allows it. Returns whether the job gets
        the network and the parameters it runs with."""
        job_facts.check_resources(request.resources, environment)
        names = [request.dataset, *request.additional_datasets]
        for name, dataset_id in zip(names, dataset_ids, strict=True):
            found = await self.store.dataset(dataset_id)
            if found is None:
                raise NotFound(f"no dataset {name}", reason="DATASET_NOT_FOUND")
            # Decided on this very record, with no await in between: the policy version the
            # job records is the one that allowed it, whatever changes the policy next.
            dataset, files = found
            decided.append(DecidedDataset(dataset, files, check_trusted(dataset, algorithm)))
        records = [d.record for d in decided]
        allow_network = network_allowed(records, environment, required=require_network)
        given = json_format.MessageToDict(request.parameters)
        return allow_network, parameters.job_values(algorithm, given, records)

    async def InitializeCompute(
        self, request: pb.InitializeComputeRequest, context: Context
    ) -> pb.InitializeComputeResponse:
        caller = await self.auth.reader(context, "InitializeCompute", request)
        dataset_ids = _dataset_ids(request)
        algorithm, _ = await self._resolve_algorithm(request)
        environment = await self._environment(request.environment or "default")
        valid_for = orders.check_valid_for(request.valid_for.seconds, environment)
        decided: list[DecidedDataset] = []
        await self._decide(request, dataset_ids, algorithm, environment, decided, False)
        paid = orders.paid_assets([d.record for d in decided], algorithm)
        return await self.payments.quote(caller.address, paid, environment, valid_for)

    async def _environment(self, name: str) -> job_pb2.Environment:
        for environment in await self._environment_list():
            if environment.name == name:
                return environment
        raise NotFound(f"no environment named {name!r}", reason="ENVIRONMENT_NOT_FOUND")

    async def _launch(self, plan: JobPlan) -> job_pb2.Job:
        """Hands a job whose every check has passed to the Operator Service, then keeps what
        it was started with for its provenance. Binds the job's id to the request's log lines."""
        spec = launch.job_spec(plan)
        structlog.contextvars.bind_contextvars(job_id=spec.job_id)
        response = await self.operator.CreateJob(
            operator_pb2.CreateJobRequest(spec=spec), timeout=UNARY_TIMEOUT
        )
        await self.provenance.job_started(
            response.job.name, launch.provenance_facts(plan, spec.job_id)
        )
        return response.job

    async def _dataset_with_files(
        self, name: str, field: str = "name"
    ) -> tuple[pb.Dataset, list[FileSource]]:
        """The dataset with where its files are (for the engine only)."""
        found = await self.store.dataset(job_facts.parse_name(name, "datasets", field))
        if found is None:
            raise NotFound(f"no dataset {name}", reason="DATASET_NOT_FOUND")
        return found

    async def _algorithm_with_code(
        self, name: str, field: str = "name"
    ) -> tuple[pb.Algorithm, bytes]:
        """The algorithm with its code (for jobs, and for those who may read it)."""
        found = await self.store.algorithm_with_code(
            job_facts.parse_name(name, "algorithms", field)
        )
        if found is None:
            raise _no_algorithm(name)
        return found

    async def _resolve_algorithm(
        self, request: pb.StartComputeRequest | pb.InitializeComputeRequest
    ) -> tuple[pb.Algorithm | None, bytes]:
        raw = request.raw_algorithm
        if request.algorithm:
            if raw.code or raw.entrypoint or containers.is_set(raw.container):
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
        containers.check_container(raw.container, "raw_algorithm.container")
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
        async with self.audit.refusals(caller.address, "job.stop", request.name):
            response = await self.operator.StopJob(
                operator_pb2.StopJobRequest(job_id=job_id, owner=caller.address),
                timeout=UNARY_TIMEOUT,
            )
        await self.audit.record(caller.address, "job.stop", request.name, allowed=True)
        return pb.StopJobResponse(job=response.job)

    async def DeleteJob(
        self, request: pb.DeleteJobRequest, context: Context
    ) -> pb.DeleteJobResponse:
        caller = await self.auth.signed(context, "DeleteJob", request)
        await self.provenance_before_delete(request.name, caller)
        job_id = job_facts.parse_name(request.name, "jobs")
        structlog.contextvars.bind_contextvars(job_id=job_id)
        async with self.audit.refusals(caller.address, "job.delete", request.name):
            await self.operator.DeleteJob(
                operator_pb2.DeleteJobRequest(job_id=job_id, owner=caller.address),
                timeout=UNARY_TIMEOUT,
            )
        await self.audit.record(caller.address, "job.delete", request.name, allowed=True)
        return pb.DeleteJobResponse()

    async def DownloadResult(
        self, request: pb.DownloadResultRequest, context: Context
    ) -> AsyncIterator[pb.DownloadResultResponse]:
        caller = await self.auth.reader(context, "DownloadResult", request)
        job_id, index = _result_name(request.name)
        if request.offset < 0:
            raise InvalidArgument("offset must not be negative", field="offset")
        # Audited once per download, at its start (offset 0), not again at each resumption:
        # allowed once the first bytes come (or the result proves empty), refused otherwise.
        audited = request.offset != 0
        try:
            async for response in self.operator.ReadResult(
                operator_pb2.ReadResultRequest(
                    job_id=job_id, owner=caller.address, index=index, offset=request.offset
                )
            ):
                if not audited:
                    audited = True
                    await self.audit.record(
                        caller.address, "result.download", request.name, allowed=True
                    )
                yield pb.DownloadResultResponse(offset=response.offset, data=response.data)
        except grpc.aio.AioRpcError as error:
            if not audited:
                await self.audit.record(
                    caller.address,
                    "result.download",
                    request.name,
                    allowed=False,
                    reason=error.code().name,
                )
            raise
        if not audited:
            await self.audit.record(caller.address, "result.download", request.name, allowed=True)

    async def GetResultUrl(
        self, request: pb.GetResultUrlRequest, context: Context
    ) -> pb.GetResultUrlResponse:
        caller = await self.auth.reader(context, "GetResultUrl", request)
        job_id, index = _result_name(request.name)
        async with self.audit.refusals(caller.address, "result.url", request.name):
            response = await self.operator.GetResultUrl(
                operator_pb2.GetResultUrlRequest(job_id=job_id, owner=caller.address, index=index),
                timeout=UNARY_TIMEOUT,
            )
        # A URL is as good as a download: audited as one.
        await self.audit.record(caller.address, "result.url", request.name, allowed=True)
        return pb.GetResultUrlResponse(
            url=response.url, expire_time=response.expire_time, result=response.result
        )

    async def PublishJobOutputs(
        self, request: pb.PublishJobOutputsRequest, context: Context
    ) -> pb.PublishJobOutputsResponse:
        caller = await self.auth.signed(context, "PublishJobOutputs", request)
        request_fields.check_request_id(request.request_id)
        previous = await self.store.request_resource(caller.address, request.request_id)
        if previous is not None:
            return pb.PublishJobOutputsResponse(dataset=await self._dataset(previous))
        dataset = await derived.publish_outputs(
            store=self.store,
            operator=self.operator,
            audit=self.audit,
            caller=caller,
            request=request,
        )
        return pb.PublishJobOutputsResponse(dataset=dataset)
