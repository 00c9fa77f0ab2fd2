"""How the CLI prints: human lines, or one JSON document with --json."""

from __future__ import annotations

import json
import sys
from typing import Any

from c2d.common.v1 import job_pb2
from google.protobuf import json_format
from google.protobuf.message import Message

from mesh import jobs as job_facts


def to_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message)


def print_json(document: Any) -> None:
    json.dump(document, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def state_name(state: int) -> str:
    return job_pb2.Job.State.Name(state).removeprefix("STATE_").lower()  # type: ignore[arg-type]


def describe(job: job_pb2.Job) -> str:
    text = state_name(job.state)
    if job.state == job_pb2.Job.STATE_FAILED:
        text += f" ({job_facts.format_reason(job.failure_reason)})"
    if job.state == job_pb2.Job.STATE_QUEUED and job.queue_position:
        text += f" (position {job.queue_position})"
    if job.message and job.state != job_pb2.Job.STATE_SUCCEEDED:
        text += f": {job.message}"
    return text


def kind_name(kind: int) -> str:
    return job_pb2.ResultFile.Kind.Name(kind).removeprefix("KIND_").lower()  # type: ignore[arg-type]


_SELECTIONS: dict[int, str] = {
    job_pb2.RESULT_SELECTION_OUTPUTS: "outputs only",
    job_pb2.RESULT_SELECTION_LOGS: "logs only",
}


_DELIVERY_STATES: dict[int, str] = {
    job_pb2.DeliveryStatus.STATE_PENDING: "pending",
    job_pb2.DeliveryStatus.STATE_DELIVERED: "delivered",
    job_pb2.DeliveryStatus.STATE_FAILED: "failed",
}


def selection_text(selection: int) -> str:
    """Which results a job keeps, as `c2d compute status` shows it."""
    return _SELECTIONS.get(selection, "outputs and logs")


def delivery_text(job: job_pb2.Job) -> str:
    """How the job's delivery to the consumer's storage went; "" when it asked for none."""
    if not job.HasField("delivery"):
        return ""
    status = job.delivery
    text = f"delivery to {status.destination}: {_DELIVERY_STATES.get(status.state, 'not started')}"
    if status.delivered_count:
        text += f" ({status.delivered_count} delivered)"
    if status.message:
        text += f": {status.message}"
    return text
