"""An async client of the Provider: signs requests, keeps a read token, and wraps the RPCs
in plain methods."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from c2d.common.v1 import container_pb2, job_pb2
from c2d.provider.v1 import provider_pb2 as pb
from c2d.provider.v1 import provider_pb2_grpc
from google.protobuf import duration_pb2, struct_pb2
from google.protobuf.message import Message

from mesh import auth
from mesh.channels import open_channel
from mesh.delivery import SELECTION_BY_WORD
from mesh.digests import digest_for
from sdk.keys import Key

TIMEOUT = 60.0
# PublishJobOutputs waits for the outputs' copies (provider.derived.EXPORT_TIMEOUT_S).
PUBLISH_OUTPUTS_TIMEOUT = 960.0
DID_PREFIX = "did:c2d:"


def asset_name(collection: str, ref: str) -> str:
    """`datasets/{id}` from a DID, a resource name or a bare id."""
    ident = ref.removeprefix(DID_PREFIX).removeprefix(f"{collection}/")
    return f"{collection}/{ident}"


def asset_did(collection: str, ref: str) -> str:
    """`did:c2d:{id}` from a DID, a resource name or a bare id."""
    return DID_PREFIX + asset_name(collection, ref).removeprefix(f"{collection}/")


def approval_ref(ref: str) -> str:
    """`approvalRequests/{id}` from the name or its id."""
    return asset_name("approvalRequests", ref.strip())


def job_ref(ref: str) -> str:
    """`jobs/{id}` from a job name or a bare id."""
    return ref if ref.startswith("jobs/") else f"jobs/{ref}"


def _struct(values: dict[str, Any] | None) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    if values:
        struct.update(values)
    return struct


def _job_fields(
    datasets: Sequence[str],
    algorithm: str,
    raw_code: str,
    raw_entrypoint: str,
    parameters: dict[str, Any] | None,
) -> dict[str, Any]:
    """The fields that say what a job runs, as StartCompute and InitializeCompute take them."""
    if not datasets:
        raise ValueError("at least one dataset")
    return {
        "dataset": asset_name("datasets", datasets[0]),
        "additional_datasets": [asset_name("datasets", d) for d in datasets[1:]],
        "algorithm": asset_name("algorithms", algorithm) if algorithm else "",
        "raw_algorithm": pb.RawAlgorithm(code=raw_code, entrypoint=raw_entrypoint)
        if raw_code
        else None,
        "parameters": _struct(parameters),
    }


def remote_file(
    url: str, *, size_bytes: int, sha256: str, credentials: str = ""
) -> pb.DatasetFileLocation:
    """A dataset file the node's jobs fetch: `s3://bucket/key` or an http(s) URL, with the
    size and lowercase hex sha256 it must have, and the name of a source credential the
    node's engine holds for it (the secret itself never leaves the node)."""
    return pb.DatasetFileLocation(
        url=url, size_bytes=size_bytes, sha256=sha256, credentials=credentials
    )


# The words for a ResultSelection, as `start_compute(results=...)` and `c2d compute start
# --results` take them.
RESULT_SELECTIONS: dict[str, job_pb2.ResultSelection.ValueType] = {
    **SELECTION_BY_WORD,
    "outputs_and_logs": job_pb2.RESULT_SELECTION_OUTPUTS_AND_LOGS,
}


def result_selection(results: str | int) -> job_pb2.ResultSelection.ValueType:
    """The ResultSelection of a word (`outputs`, `logs`, `both`), or of an enum value as it
    is (the Provider refuses one it does not know). ValueError for another word."""
    if isinstance(results, int):
        return results  # type: ignore[return-value]
    try:
        return RESULT_SELECTIONS[results.lower()]
    except KeyError:
        raise ValueError(
            f"results is one of {', '.join(RESULT_SELECTIONS)}, not {results!r}"
        ) from None


def s3_delivery(
    bucket: str,
    prefix: str = "",
    *,
    endpoint: str = "",
    region: str = "",
    access_key_id: str,
    secret_access_key: str,
    session_token: str = "",
) -> job_pb2.ResultDelivery:
    """Delivery of a job's kept results to the consumer's S3 bucket (or an S3-compatible
    store at `endpoint`, such as `https://s3.example.org`; empty for AWS), each at
    `{prefix}{job id}/{result name}`, with keys that may write there. The keys go to the node
    for this job only, never stored or shown."""
    return job_pb2.ResultDelivery(
        s3=job_pb2.S3Delivery(
            endpoint=endpoint,
            region=region,
            bucket=bucket,
            prefix=prefix,
            access_key_id=access_key_id,
            secret_access_key=secret_access_key,
            session_token=session_token,
        )
    )


def upload_urls(urls: Mapping[str, str]) -> job_pb2.ResultDelivery:
    """Delivery of a job's kept results to presigned upload (HTTP PUT) URLs, by result name
    (`out.csv`, `logs/algorithm.log`...): a result without a URL is not delivered."""
    return job_pb2.ResultDelivery(upload_urls=job_pb2.UploadUrls(urls=dict(urls)))


def _node_path(path: str | Path) -> str:
    return str(Path(path).absolute())


def _file_location(file: str | Path | pb.DatasetFileLocation) -> pb.DatasetFileLocation:
    if isinstance(file, pb.DatasetFileLocation):
        return file
    return pb.DatasetFileLocation(path=_node_path(file))


class Client:
    def __init__(self, target: str, key: Key) -> None:
        self.key = key
        self.channel = open_channel(target)
        self.stub = provider_pb2_grpc.ProviderServiceStub(self.channel)
        self._last_nonce = 0
        # Nonces must arrive in increasing order: signed calls go one at a time.
        self._signing = asyncio.Lock()
        self._token: tuple[str, float] | None = None

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- credentials ---------------------------------------------------------------------

    def _next_nonce(self) -> int:
        self._last_nonce = max(time.time_ns() // 1000, self._last_nonce + 1)
        return self._last_nonce

    def signature_metadata(self, command: str, request: Message) -> list[tuple[str, str]]:
        nonce = self._next_nonce()
        signature = auth.sign(
            self.key.private_key, self.key.address, nonce, command, digest_for(command, request)
        )
        return [
            (auth.ADDRESS_HEADER, self.key.address),
            (auth.NONCE_HEADER, str(nonce)),
            (auth.SIGNATURE_HEADER, signature),
        ]

    async def _signed(self, command: str, request: Message, deadline_s: float = TIMEOUT) -> Any:
        async with self._signing:
            method = getattr(self.stub, command)
            return await method(
                request, metadata=self.signature_metadata(command, request), timeout=deadline_s
            )

    async def token_metadata(self) -> list[tuple[str, str]]:
        """A bearer token for reads and streams, created on first use and renewed early."""
        if self._token is None or self._token[1] - time.time() < 60:
            response = await self._signed(
                "CreateAuthToken",
                pb.CreateAuthTokenRequest(valid_for=duration_pb2.Duration(seconds=3600)),
            )
            self._token = (response.token, float(response.expire_time.seconds))
        return [(auth.AUTHORIZATION_HEADER, f"Bearer {self._token[0]}")]

    # -- assets --------------------------------------------------------------------------

    async def publish_dataset(
        self,
        paths: Sequence[str | Path] = (),
        *,
        files: Sequence[str | Path | pb.DatasetFileLocation] = (),
        metadata: pb.AssetMetadata | None = None,
        policy: pb.ComputePolicy | None = None,
        request_id: str = "",
        sample_of: str = "",
        pricing: pb.Pricing | None = None,
    ) -> pb.Dataset:
        """Publishes a dataset of local files (`paths`, on the node, under its data root), or
        of `files`, in order: local paths too, or remote ones (`remote_file`). With
        `sample_of` (a dataset's DID, name or id), as the sample of that dataset; with
        `pricing` (its datatoken), for sale."""
        if paths and files:
            raise ValueError("give the dataset's files as paths or as files, not both")
        request = pb.PublishDatasetRequest(
            request_id=request_id or uuid.uuid4().hex,
            metadata=metadata,
            file_paths=[_node_path(p) for p in paths],
            files=[_file_location(f) for f in files],
            policy=policy,
            sample_of=asset_name("datasets", sample_of) if sample_of else "",
            pricing=pricing,
        )
        response = await self._signed("PublishDataset", request)
        return response.dataset  # type: ignore[no-any-return]

    async def update_policy(
        self, ref: str, policy: pb.ComputePolicy, *, expected_version: int = 0
    ) -> pb.Dataset:
        """Replaces a dataset's policy; with `expected_version`, only if it is still at that
        version (ABORTED otherwise)."""
        request = pb.UpdateDatasetPolicyRequest(
            name=asset_name("datasets", ref),
            policy=policy,
            expected_policy_version=expected_version,
        )
        response = await self._signed("UpdateDatasetPolicy", request)
        return response.dataset  # type: ignore[no-any-return]

    async def trust(self, algorithm_ref: str) -> pb.TrustedAlgorithm:
        """A trusted-algorithm entry pinned to the algorithm's current checksums."""
        algorithm = await self.get_algorithm(algorithm_ref)
        return pb.TrustedAlgorithm(
            did=algorithm.did,
            files_checksum=algorithm.files_checksum,
            container_section_checksum=algorithm.container_section_checksum,
        )

    async def publish_algorithm(
        self,
        code: bytes,
        entrypoint: str,
        *,
        metadata: pb.AssetMetadata | None = None,
        request_id: str = "",
        access: pb.AlgorithmAccess.ValueType = pb.ALGORITHM_ACCESS_UNSPECIFIED,
        parameters: Sequence[pb.ParameterSpec] = (),
        pricing: pb.Pricing | None = None,
        container: container_pb2.Container | None = None,
    ) -> pb.Algorithm:
        """Publishes an algorithm: private unless `access` says public; with `pricing` (its
        datatoken), for sale; with `container`, run in that image instead of the host
        runtime."""
        request = pb.PublishAlgorithmRequest(
            request_id=request_id or uuid.uuid4().hex,
            metadata=metadata,
            code=code,
            entrypoint=entrypoint,
            access=access,
            parameters=parameters,
            pricing=pricing,
            container=container,
        )
        response = await self._signed("PublishAlgorithm", request)
        return response.algorithm  # type: ignore[no-any-return]

    async def update_algorithm(
        self,
        ref: str,
        code: bytes,
        entrypoint: str,
        *,
        parameters: Sequence[pb.ParameterSpec] = (),
        container: container_pb2.Container | None = None,
    ) -> pb.Algorithm:
        """Replaces an algorithm's code, entrypoint, parameter declaration and container (its
        checksums change with them)."""
        request = pb.UpdateAlgorithmRequest(
            name=asset_name("algorithms", ref),
            code=code,
            entrypoint=entrypoint,
            parameters=parameters,
            container=container,
        )
        response = await self._signed("UpdateAlgorithm", request)
        return response.algorithm  # type: ignore[no-any-return]

    async def download_algorithm(
        self,
        ref: str,
        *,
        offset: int = 0,
        credentials: Literal["token", "signature", "none"] = "token",
    ) -> bytes:
        """An algorithm's code from `offset`. A public one's needs no credentials; a private
        one's only its publisher (or an owner reviewing it) may read."""
        request = pb.DownloadAlgorithmRequest(name=asset_name("algorithms", ref), offset=offset)
        if credentials == "signature":
            async with self._signing:
                metadata = self.signature_metadata("DownloadAlgorithm", request)
                call = self.stub.DownloadAlgorithm(request, metadata=metadata, timeout=TIMEOUT)
                # Until the server has taken the nonce: nonces must arrive in order.
                await call.initial_metadata()
        else:
            metadata = await self.token_metadata() if credentials == "token" else []
            call = self.stub.DownloadAlgorithm(request, metadata=metadata, timeout=TIMEOUT)
        return b"".join([response.data async for response in call])

    async def get_dataset(self, ref: str) -> pb.Dataset:
        response = await self.stub.GetDataset(
            pb.GetDatasetRequest(name=asset_name("datasets", ref)), timeout=TIMEOUT
        )
        return response.dataset

    async def get_algorithm(self, ref: str) -> pb.Algorithm:
        response = await self.stub.GetAlgorithm(
            pb.GetAlgorithmRequest(name=asset_name("algorithms", ref)), timeout=TIMEOUT
        )
        return response.algorithm

    async def list_environments(self) -> list[job_pb2.Environment]:
        response = await self.stub.ListEnvironments(pb.ListEnvironmentsRequest(), timeout=TIMEOUT)
        return list(response.environments)

    # -- jobs ----------------------------------------------------------------------------

    async def start_compute(
        self,
        datasets: Sequence[str],
        *,
        algorithm: str = "",
        raw_code: str = "",
        raw_entrypoint: str = "python3 $ALGO",
        parameters: dict[str, Any] | None = None,
        environment: str = "",
        request_id: str = "",
        viewers: Sequence[str] = (),
        resources: job_pb2.Resources | None = None,
        require_network: bool = False,
        orders: Sequence[str] = (),
        results: str | int = job_pb2.RESULT_SELECTION_UNSPECIFIED,
        delivery: job_pb2.ResultDelivery | None = None,
    ) -> job_pb2.Job:
        """Starts a job on `datasets` (the main one first). `viewers` may read it too;
        `resources` lowers the environment's limits; `require_network` refuses up front
        unless the job will have the network; `orders` are the transactions that paid for its
        paid assets. `results` picks what is kept: `outputs`, `logs` or `both` (the default),
        or a ResultSelection; `delivery` (`s3_delivery`, `upload_urls`) also writes the kept
        results to the consumer's own storage."""
        request = pb.StartComputeRequest(
            request_id=request_id or uuid.uuid4().hex,
            **_job_fields(datasets, algorithm, raw_code, raw_entrypoint, parameters),
            environment=environment,
            viewers=viewers,
            resources=resources,
            require_network=require_network,
            orders=orders,
            results=result_selection(results),
            delivery=delivery,
        )
        response = await self._signed("StartCompute", request)
        return response.job  # type: ignore[no-any-return]

    async def initialize_compute(
        self,
        datasets: Sequence[str],
        *,
        algorithm: str = "",
        raw_code: str = "",
        raw_entrypoint: str = "python3 $ALGO",
        parameters: dict[str, Any] | None = None,
        environment: str = "",
        resources: job_pb2.Resources | None = None,
        valid_for_s: int = 0,
    ) -> pb.InitializeComputeResponse:
        """What the job would cost: the orders to make (datatoken and amount of each paid
        asset) and the provider fee they carry. Refused as StartCompute would refuse it."""
        request = pb.InitializeComputeRequest(
            **_job_fields(datasets, algorithm, raw_code, raw_entrypoint, parameters),
            environment=environment,
            resources=resources,
            valid_for=duration_pb2.Duration(seconds=valid_for_s) if valid_for_s else None,
        )
        response: pb.InitializeComputeResponse = await self.stub.InitializeCompute(
            request, metadata=await self.token_metadata(), timeout=TIMEOUT
        )
        return response

    async def get_job(self, ref: str) -> job_pb2.Job:
        response = await self.stub.GetJob(
            pb.GetJobRequest(name=job_ref(ref)),
            metadata=await self.token_metadata(),
            timeout=TIMEOUT,
        )
        return response.job

    async def list_jobs(self, page_size: int = 50) -> list[job_pb2.Job]:
        """The jobs the caller owns or views, newest first."""
        request = pb.ListJobsRequest(page_size=page_size)
        return [job async for page in self.pages("ListJobs", request, "jobs") for job in page]

    async def watch_job(self, ref: str) -> AsyncIterator[job_pb2.Job]:
        call = self.stub.WatchJob(
            pb.WatchJobRequest(name=job_ref(ref)), metadata=await self.token_metadata()
        )
        async for response in call:
            yield response.job

    async def stream_logs(self, ref: str, offset: int = 0) -> AsyncIterator[job_pb2.LogChunk]:
        call = self.stub.StreamJobLogs(
            pb.StreamJobLogsRequest(name=job_ref(ref), offset=offset),
            metadata=await self.token_metadata(),
        )
        async for response in call:
            yield response.chunk

    async def stop_job(self, ref: str) -> job_pb2.Job:
        response = await self._signed("StopJob", pb.StopJobRequest(name=job_ref(ref)))
        return response.job  # type: ignore[no-any-return]

    async def delete_job(self, ref: str) -> None:
        await self._signed("DeleteJob", pb.DeleteJobRequest(name=job_ref(ref)))

    async def download_result(self, ref: str, result: job_pb2.ResultFile, dest: Path) -> Path:
        """Downloads one result to `dest` (resuming a partial file) and checks its sha256."""
        partial = dest.with_name(dest.name + ".part")
        offset = partial.stat().st_size if partial.exists() else 0
        if offset > result.size_bytes:
            partial.unlink()
            offset = 0
        call = self.stub.DownloadResult(
            pb.DownloadResultRequest(name=f"{job_ref(ref)}/results/{result.index}", offset=offset),
            metadata=await self.token_metadata(),
        )
        with open(partial, "ab") as f:
            async for response in call:
                f.write(response.data)
        with open(partial, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if digest != result.sha256:
            partial.unlink()
            raise ValueError(f"result {result.index} failed its sha256 check; download again")
        partial.replace(dest)
        return dest

    async def result_url(self, ref: str, result: job_pb2.ResultFile) -> pb.GetResultUrlResponse:
        """A short-lived URL that downloads one result straight from the node's object store
        (FAILED_PRECONDITION on a node that keeps results on local disk). Check what it
        downloads against `result.sha256`."""
        response: pb.GetResultUrlResponse = await self.stub.GetResultUrl(
            pb.GetResultUrlRequest(name=f"{job_ref(ref)}/results/{result.index}"),
            metadata=await self.token_metadata(),
            timeout=TIMEOUT,
        )
        return response

    async def publish_job_outputs(
        self,
        ref: str,
        *,
        metadata: pb.AssetMetadata | None = None,
        result_indexes: Sequence[int] = (),
        policy: pb.ComputePolicy | None = None,
        request_id: str = "",
    ) -> pb.Dataset:
        """Publishes outputs of a succeeded job of yours as a new dataset on this node, owned
        by you: the results at `result_indexes` (every output when empty), in that order, as
        its files 0, 1, ... The outputs never leave the node. `policy` is its compute policy
        (unset: it trusts no algorithm; change it later with `update_policy`). Every dataset
        the job read must allow it (`allow_derived_datasets`): PERMISSION_DENIED otherwise."""
        request = pb.PublishJobOutputsRequest(
            name=job_ref(ref),
            request_id=request_id or uuid.uuid4().hex,
            metadata=metadata,
            result_indexes=result_indexes,
            policy=policy,
        )
        # Longer than other calls: the node copies the outputs within its storage first.
        response = await self._signed("PublishJobOutputs", request, PUBLISH_OUTPUTS_TIMEOUT)
        return response.dataset  # type: ignore[no-any-return]

    # -- owner's control: approval requests, audit log, provenance ---------------------------

    async def get_provider_info(self) -> pb.GetProviderInfoResponse:
        """Who the provider is: pin its `address` before trusting a provenance record."""
        return await self.stub.GetProviderInfo(pb.GetProviderInfoRequest(), timeout=TIMEOUT)

    async def get_provenance(self, ref: str) -> bytes:
        """A final job's signed provenance document, as bytes to save or to check with
        mesh.provenance.verify_document."""
        response = await self.stub.GetProvenance(
            pb.GetProvenanceRequest(name=job_ref(ref)),
            metadata=await self.token_metadata(),
            timeout=TIMEOUT,
        )
        return response.document.encode()

    async def create_approval_request(
        self,
        dataset: str,
        algorithm: str,
        *,
        message: str = "",
        parameters: dict[str, Any] | None = None,
        request_id: str = "",
    ) -> pb.ApprovalRequest:
        request = pb.CreateApprovalRequestRequest(
            request_id=request_id or uuid.uuid4().hex,
            dataset=asset_name("datasets", dataset),
            algorithm=asset_name("algorithms", algorithm),
            message=message,
            parameters=_struct(parameters),
        )
        response = await self._signed("CreateApprovalRequest", request)
        return response.approval_request  # type: ignore[no-any-return]

    async def pages(self, method: str, request: Any, field: str) -> AsyncIterator[list[Any]]:
        """The items of a paginated read, a page at a time, following `next_page_token` to the
        last page."""
        while True:
            response = await getattr(self.stub, method)(
                request, metadata=await self.token_metadata(), timeout=TIMEOUT
            )
            yield list(getattr(response, field))
            if not response.next_page_token:
                return
            request.page_token = response.next_page_token

    async def list_approval_requests(
        self,
        *,
        dataset: str = "",
        state: pb.ApprovalState.ValueType = pb.APPROVAL_STATE_UNSPECIFIED,
        page_size: int = 50,
    ) -> list[pb.ApprovalRequest]:
        """All requests for an owner, the caller's own for anyone else; newest first."""
        request = pb.ListApprovalRequestsRequest(
            dataset=asset_name("datasets", dataset) if dataset else "",
            state=state,
            page_size=page_size,
        )
        pages = self.pages("ListApprovalRequests", request, "approval_requests")
        return [item async for page in pages for item in page]

    async def get_approval_request(self, name: str) -> pb.ApprovalRequest:
        response = await self.stub.GetApprovalRequest(
            pb.GetApprovalRequestRequest(name=approval_ref(name)),
            metadata=await self.token_metadata(),
            timeout=TIMEOUT,
        )
        return response.approval_request

    async def approve(
        self, name: str, files_checksum: str, container_section_checksum: str, *, note: str = ""
    ) -> pb.ApproveApprovalRequestResponse:
        """Approves a request at the checksums the owner reviewed (they must be the request's)."""
        response = await self._signed(
            "ApproveApprovalRequest",
            pb.ApproveApprovalRequestRequest(
                name=approval_ref(name),
                files_checksum=files_checksum,
                container_section_checksum=container_section_checksum,
                note=note,
            ),
        )
        return response  # type: ignore[no-any-return]

    async def reject(self, name: str, reason: str) -> pb.ApprovalRequest:
        response = await self._signed(
            "RejectApprovalRequest",
            pb.RejectApprovalRequestRequest(name=approval_ref(name), reason=reason),
        )
        return response.approval_request  # type: ignore[no-any-return]

    async def run_approval_sample(
        self, name: str, *, environment: str = "", request_id: str = ""
    ) -> job_pb2.Job:
        response = await self._signed(
            "RunApprovalSample",
            pb.RunApprovalSampleRequest(
                name=approval_ref(name),
                request_id=request_id or uuid.uuid4().hex,
                environment=environment,
            ),
        )
        return response.job  # type: ignore[no-any-return]

    async def list_audit_events(
        self, *, action: str = "", resource: str = "", page_size: int = 100
    ) -> list[pb.AuditEvent]:
        """The audit log, oldest first (owners only)."""
        request = pb.ListAuditEventsRequest(action=action, resource=resource, page_size=page_size)
        return [
            event
            async for page in self.pages("ListAuditEvents", request, "events")
            for event in page
        ]
