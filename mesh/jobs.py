"""Facts about jobs that every hop shares: ids, names, viewers, final states, and the reference
system's numeric status codes that market integrations read."""

from __future__ import annotations

import math
import re
import secrets
from collections.abc import Sequence
from typing import Any

from c2d.common.v1 import job_pb2
from google.protobuf import duration_pb2

from mesh.errors import InvalidArgument

State = job_pb2.Job.State
FINAL_STATES = frozenset({State.STATE_SUCCEEDED, State.STATE_FAILED, State.STATE_CANCELLED})

# Ids become path segments (on the host and in the sandbox), so only these exact shapes pass
# (fullmatch: not even a trailing newline).
_JOB_ID = re.compile(r"[0-9a-f]{32}")
_ASSET_ID = re.compile(r"[0-9a-f]{64}")
MAX_VIEWERS = 20
# The least memory and disk a job can run with (a sandboxed Python needs about 10 MiB).
MIN_MEMORY_BYTES = 16 << 20
MIN_DISK_BYTES = 1 << 20
_NANOS = 1_000_000_000


def is_job_id(value: str) -> bool:
    """True for 32 lowercase hex digits."""
    return _JOB_ID.fullmatch(value) is not None


def is_asset_id(value: str) -> bool:
    """True for a dataset or algorithm id: 64 lowercase hex digits."""
    return _ASSET_ID.fullmatch(value) is not None


def is_sha256_hex(value: str) -> bool:
    """True for a sha256 digest as the contract writes it: 64 lowercase hex digits."""
    return _ASSET_ID.fullmatch(value) is not None


# Reference status codes by state; provisioning failures have codes of their own.
_STATUS = {
    State.STATE_QUEUED: (1, "Warming up"),
    State.STATE_CONFIGURING: (20, "Configuring volumes"),
    State.STATE_RUNNING: (40, "Running algorithm"),
    State.STATE_PUBLISHING: (60, "Publishing results"),
    State.STATE_SUCCEEDED: (70, "Job finished"),
    State.STATE_FAILED: (70, "Job finished"),
    State.STATE_CANCELLED: (70, "Job finished"),
}
_FAILURE_STATUS = {
    job_pb2.FAILURE_REASON_DATA_PROVISIONING_FAILED: (31, "Data provisioning failed"),
    job_pb2.FAILURE_REASON_ALGORITHM_PROVISIONING_FAILED: (32, "Algorithm provisioning failed"),
}


def is_final(state: int) -> bool:
    return state in FINAL_STATES


def new_job_id() -> str:
    return secrets.token_hex(16)


def set_status_code(job: job_pb2.Job) -> None:
    """Fills `status_code` and `status_text` from the state and failure reason."""
    code, text = _FAILURE_STATUS.get(job.failure_reason) or _STATUS.get(job.state, (0, ""))
    job.status_code = code
    job.status_text = text


def check_job_id(job_id: str, field: str = "job_id") -> str:
    if not is_job_id(job_id):
        raise InvalidArgument(f"{field} must be 32 lowercase hex digits", field=field)
    return job_id


def check_viewers(owner: str, viewers: Sequence[str], *, at_the_edge: bool = False) -> list[str]:
    """The viewers in EIP-55 form; INVALID_ARGUMENT unless each is a 0x address other than
    the job's owner, at most MAX_VIEWERS of them. At the edge (the Provider, where consumers
    write the list) an address named twice counts once and a refusal names the entry
    (`viewers[i]`); inside the mesh, where lists come from the Provider, a repeat is refused
    and every refusal names `viewers`."""
    if not viewers:
        return []
    if len(viewers) > MAX_VIEWERS:
        raise InvalidArgument(f"viewers lists at most {MAX_VIEWERS} addresses", field="viewers")
    # Here, not at the top: the signature library takes most of a second to import, and
    # every service and stage program imports this module; only jobs with viewers pay.
    from mesh.auth import checksum

    checked: list[str] = []
    for index, viewer in enumerate(viewers):
        entry = f"viewers[{index}]"
        field = entry if at_the_edge else "viewers"
        try:
            address = checksum(viewer)
        except ValueError:
            raise InvalidArgument(
                f"{entry} is not a 0x-prefixed 20-byte hex address", field=field
            ) from None
        if address.lower() == owner.lower():
            raise InvalidArgument(
                f"{entry} is the job's owner, who may read it anyway", field=field
            )
        if address in checked:
            if not at_the_edge:
                raise InvalidArgument(f"{entry} is named twice", field=field)
            continue
        checked.append(address)
    return checked


def parse_name(name: str, collection: str, field: str = "name") -> str:
    """The id in a resource name `{collection}/{id}`; INVALID_ARGUMENT naming `field` else."""
    prefix = f"{collection}/"
    if not name.startswith(prefix):
        raise InvalidArgument(f"{field} must look like {collection}/{{id}}", field=field)
    ident = name.removeprefix(prefix)
    valid = is_job_id if collection == "jobs" else is_asset_id
    if not valid(ident):
        digits = 32 if collection == "jobs" else 64
        raise InvalidArgument(
            f"{field} must look like {collection}/{{id}} with {digits} lowercase hex digits",
            field=field,
        )
    return ident


def job_name(job_id: str) -> str:
    return f"jobs/{job_id}"


def format_reason(reason: int) -> str:
    """`FAILURE_REASON_OUT_OF_MEMORY` -> `out of memory`."""
    name = job_pb2.FailureReason.Name(reason)  # type: ignore[arg-type]
    return name.removeprefix("FAILURE_REASON_").replace("_", " ").lower()


def _duration_ns(duration: duration_pb2.Duration, field: str) -> int:
    if duration.seconds < 0 or duration.nanos < 0:
        raise InvalidArgument(f"{field} must not be negative", field=field)
    if duration.nanos >= _NANOS:
        raise InvalidArgument(f"{field}.nanos must be below 1e9", field=field)
    return duration.seconds * _NANOS + duration.nanos


def check_resources(asked: job_pb2.Resources, environment: job_pb2.Environment) -> None:
    """INVALID_ARGUMENT naming `resources.<field>` for a limit a job asks for that is negative,
    above its environment's, or too small to run anything. Zero means the environment's. The
    Provider checks it up front, the engine (which knows the environments for sure) again."""
    where = f"the limit of environment {environment.name!r}"
    if math.isnan(asked.cpus) or asked.cpus < 0:
        raise InvalidArgument("resources.cpus must not be negative", field="resources.cpus")
    if asked.cpus > environment.cpus:
        raise InvalidArgument(
            f"resources.cpus ({asked.cpus:g}) is above {where} ({environment.cpus:g})",
            field="resources.cpus",
        )
    sizes = (
        ("memory_bytes", asked.memory_bytes, environment.memory_bytes, MIN_MEMORY_BYTES),
        ("disk_bytes", asked.disk_bytes, environment.disk_bytes, MIN_DISK_BYTES),
    )
    for name, value, limit, least in sizes:
        field = f"resources.{name}"
        if value < 0:
            raise InvalidArgument(f"{field} must not be negative", field=field)
        if value > limit:
            raise InvalidArgument(
                f"{field} ({value} bytes) is above {where} ({limit} bytes)", field=field
            )
        if 0 < value < least:
            raise InvalidArgument(f"{field} must be at least {least} (or 0)", field=field)
    asked_ns = _duration_ns(asked.max_duration, "resources.max_duration")
    limit_ns = _duration_ns(environment.max_duration, "max_duration")
    if asked_ns > limit_ns:
        raise InvalidArgument(
            f"resources.max_duration ({asked_ns / _NANOS:g} s) is above {where} "
            f"({limit_ns / _NANOS:g} s)",
            field="resources.max_duration",
        )


def whole_numbers(value: Any) -> Any:
    """JSON from a google.protobuf.Struct with whole numbers as integers: Struct numbers are
    doubles, and an algorithm given {"x": 1} expects 1, not 1.0."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: whole_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [whole_numbers(v) for v in value]
    return value


def chosen_outputs(
    job: job_pb2.Job, indexes: Sequence[int], field: str
) -> list[job_pb2.ResultFile]:
    """The job's outputs at `indexes`, in that order (every output, by index, when empty);
    INVALID_ARGUMENT naming `field` (or `field[i]`) for a job without outputs, an index that
    is not an output's, or one given twice."""
    outputs = {r.index: r for r in job.results if r.kind == job_pb2.ResultFile.KIND_OUTPUT}
    if not outputs:
        raise InvalidArgument("the job has no outputs", field=field)
    if not indexes:
        return [outputs[index] for index in sorted(outputs)]
    for i, index in enumerate(indexes):
        if index not in outputs:
            raise InvalidArgument(
                f"result {index} is not one of the job's outputs", field=f"{field}[{i}]"
            )
        if index in indexes[:i]:
            raise InvalidArgument(f"result {index} is listed twice", field=f"{field}[{i}]")
    return [outputs[index] for index in indexes]
