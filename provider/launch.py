"""What a job is started with: the plan StartCompute (or an owner's sample run) decided, the
job spec the engine gets from it, and the facts its provenance keeps."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import rfc8785
from c2d.common.v1 import container_pb2, job_pb2
from c2d.engine.v1 import engine_pb2
from c2d.provider.v1 import provider_pb2 as pb
from google.protobuf import json_format

from mesh import containers, delivery
from mesh import jobs as job_facts
from provider import assets
from provider.auth import Caller
from provider.sources import FileSource

# A result selection as the provenance record and the audit log write it.
RESULT_WORDS: dict[int, str] = {
    job_pb2.RESULT_SELECTION_UNSPECIFIED: "outputs_and_logs",
    job_pb2.RESULT_SELECTION_OUTPUTS_AND_LOGS: "outputs_and_logs",
    job_pb2.RESULT_SELECTION_OUTPUTS: "outputs",
    job_pb2.RESULT_SELECTION_LOGS: "logs",
}


@dataclass(frozen=True)
class DecidedDataset:
    """A dataset a job reads, as it was when its policy was checked."""

    record: pb.Dataset
    # Where its files are; only the engine's job spec carries them on.
    files: list[FileSource]
    # Why it lets the algorithm run: a provider.policy.Basis, or another (an owner's sample run).
    basis: str


@dataclass(frozen=True)
class JobPlan:
    """Everything a job runs with, once every check has passed."""

    owner: Caller
    datasets: list[DecidedDataset]
    # None for raw code.
    algorithm: pb.Algorithm | None
    code: bytes
    entrypoint: str
    # The image it runs in; unset for the host runtime.
    container: container_pb2.Container
    # The values checked and completed with defaults (provider.parameters.job_values).
    parameters: dict[str, Any]
    environment: job_pb2.Environment
    # Whether every dataset lets the job use the network (the engine asks the environment too).
    allow_network: bool
    viewers: list[str] = dataclasses.field(default_factory=list)
    resources: job_pb2.Resources = dataclasses.field(default_factory=job_pb2.Resources)
    # The order transaction that paid for each paid asset, by asset name.
    orders: dict[str, str] = dataclasses.field(default_factory=dict)
    # Which results the job keeps, as the consumer asked (checked: a known value).
    results: job_pb2.ResultSelection.ValueType = job_pb2.RESULT_SELECTION_UNSPECIFIED
    # Where they are delivered besides this node's storage (checked); unset for nowhere. It
    # holds the consumer's secrets: the spec carries it to the engine, nothing else keeps it.
    delivery: job_pb2.ResultDelivery = dataclasses.field(default_factory=job_pb2.ResultDelivery)

    @functools.cached_property
    def values(self) -> Any:
        """The parameters as the algorithm reads them and the provenance hashes them."""
        return job_facts.whole_numbers(self.parameters)

    @functools.cached_property
    def code_sha256(self) -> str:
        # A published algorithm's files checksum is its one file's sha256, computed when it
        # was published: not again at every job (up to 16 MiB on the event loop).
        if self.algorithm is not None:
            return self.algorithm.files_checksum
        return hashlib.sha256(self.code).hexdigest()


def job_spec(plan: JobPlan) -> engine_pb2.JobSpec:
    """The job as the Operator Service hands it to the engine, under a new id."""
    algorithm = plan.algorithm
    return engine_pb2.JobSpec(
        job_id=job_facts.new_job_id(),
        owner=plan.owner.address,
        datasets=[
            engine_pb2.DatasetInput(
                id=d.record.name.removeprefix("datasets/"),
                files=[f.to_engine() for f in d.files],
                ddo_json=_ddo_json(d.record.SerializeToString(deterministic=True)),
            )
            for d in plan.datasets
        ],
        algorithm=engine_pb2.AlgorithmInput(
            id=algorithm.name.removeprefix("algorithms/") if algorithm else "",
            code=plan.code,
            code_sha256=plan.code_sha256,
            entrypoint=plan.entrypoint,
            # Unset, not empty, for the host runtime: the engine asks whether it is set.
            container=plan.container if containers.is_set(plan.container) else None,
            private=algorithm is not None and algorithm.access != pb.ALGORITHM_ACCESS_PUBLIC,
        ),
        parameters_json=json.dumps(plan.values) if plan.values else "",
        environment=plan.environment.name,
        allow_network=plan.allow_network,
        viewers=plan.viewers,
        resources=plan.resources,
        results=plan.results,
        delivery=plan.delivery if delivery.is_set(plan.delivery) else None,
    )


def provenance_facts(plan: JobPlan, job_id: str) -> dict[str, Any]:
    """What the job's provenance record says it was started with (ProvenanceBook.job_started).
    Of a delivery only its description (mesh.delivery.describe): never a key or a URL."""
    return {
        "consumer": plan.owner.address,
        "viewers": plan.viewers,
        "algorithm": _algorithm_facts(plan),
        "datasets": [
            {
                "name": d.record.name,
                "did": d.record.did,
                "files": [f.sha256 for f in d.record.files],
                "policy_version": d.record.policy_version,
                "decision": d.basis,
            }
            for d in plan.datasets
        ],
        "parameters_sha256": hashlib.sha256(rfc8785.dumps(plan.values)).hexdigest(),
        "environment": _limits(plan.environment, plan.resources, plan.allow_network),
        # The order transaction that paid for each paid asset (none for a free job).
        "orders": plan.orders,
        # Not "results": the record's outcome lists the results themselves under that key.
        "result_selection": RESULT_WORDS[plan.results],
        "delivery": delivery.describe(plan.delivery, job_id),
    }


def _limits(
    environment: job_pb2.Environment, asked: job_pb2.Resources, network: bool
) -> dict[str, Any]:
    """The limits a job runs under (its environment's, lowered where the consumer asked), as
    its provenance records them."""
    duration = (
        asked.max_duration if asked.max_duration.ToNanoseconds() else environment.max_duration
    )
    return {
        "name": environment.name,
        "cpu_millis": round((asked.cpus or environment.cpus) * 1000),
        "memory_bytes": asked.memory_bytes or environment.memory_bytes,
        "disk_bytes": asked.disk_bytes or environment.disk_bytes,
        "max_processes": environment.max_processes,
        "max_duration_seconds": math.ceil(duration.ToNanoseconds() / 1e9),
        "network": network and environment.network_allowed,
    }


def _algorithm_facts(plan: JobPlan) -> dict[str, Any]:
    """The algorithm as a job's provenance records it: digests, never code."""
    algorithm = plan.algorithm
    image = containers.reference(plan.container) if containers.is_set(plan.container) else ""
    if algorithm is None:
        return {
            "name": "",
            "did": "",
            "version": 0,
            "access": "raw",
            "files_checksum": plan.code_sha256,
            "container_section_checksum": assets.container_section_checksum(
                plan.entrypoint, plan.container.checksum
            ),
            "code_sha256": plan.code_sha256,
            "entrypoint": plan.entrypoint,
            "image": image,
        }
    return {
        "name": algorithm.name,
        "did": algorithm.did,
        "version": algorithm.version,
        "access": assets.ACCESS_WORDS[algorithm.access],
        "files_checksum": algorithm.files_checksum,
        "container_section_checksum": algorithm.container_section_checksum,
        "code_sha256": plan.code_sha256,
        "entrypoint": plan.entrypoint,
        "image": image,
    }


@functools.lru_cache(maxsize=64)
def _ddo_json(record: bytes) -> str:
    """The dataset's description as its jobs see it. A dataset's record changes only with its
    policy (or when it gets a sample), so each version is written once, not at every job."""
    return json_format.MessageToJson(pb.Dataset.FromString(record), indent=2)
