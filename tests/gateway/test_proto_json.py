"""gateway.proto_json writes what json_format.MessageToDict writes, for every message the REST
edge can send, filled in every field, and for the values json_format treats specially."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from c2d.common.v1 import job_pb2
from c2d.provider.v1 import provider_pb2
from google.protobuf import any_pb2, json_format, struct_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from gateway.proto_json import to_dict


def _sample(field: FieldDescriptor, index: int) -> Any:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return f"{field.name}-{index} é\n\"'"
    if kind == FieldDescriptor.TYPE_BYTES:
        return bytes(range(index, index + 7))
    if kind == FieldDescriptor.TYPE_BOOL:
        return True
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return 1.5 + index
    if field.enum_type is not None:
        values = field.enum_type.values
        return values[min(index + 1, len(values) - 1)].number
    if kind in (
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_SFIXED64,
    ):
        return -(2**40) - index
    if kind in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return 2**60 + index
    return 7 + index


def _fill(message: Message, depth: int = 0) -> Message:
    """Sets every field (two entries in repeated and map fields), nested messages too."""
    descriptor: Descriptor = message.DESCRIPTOR  # type: ignore[assignment]
    if descriptor.full_name == "google.protobuf.Timestamp":
        message.FromNanoseconds(1_763_700_000_123_456_789)  # type: ignore[attr-defined]
        return message
    if descriptor.full_name == "google.protobuf.Duration":
        message.FromNanoseconds(90_500_000_000)  # type: ignore[attr-defined]
        return message
    if descriptor.full_name == "google.protobuf.Struct":
        message.update({"x": 1, "y": [True, None, "z"], "n": {"a": 2.5}})  # type: ignore[attr-defined]
        return message
    for field in descriptor.fields:
        if field.containing_oneof is not None and message.WhichOneof(field.containing_oneof.name):
            continue
        target: Any = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            for i in range(2):
                key = f"k{i}"
                if value_field.message_type is not None:
                    _fill(target[key], depth + 1)
                else:
                    target[key] = _sample(value_field, i)
        elif field.message_type is not None:
            if depth > 3:
                continue
            if field.is_repeated:
                for _ in range(2):
                    _fill(target.add(), depth + 1)
            else:
                _fill(target, depth + 1)
        elif field.is_repeated:
            target.extend(_sample(field, i) for i in range(2))
        else:
            setattr(message, field.name, _sample(field, 0))
    return message


def _messages() -> list[type[Message]]:
    classes: list[type[Message]] = []
    for module in (provider_pb2, job_pb2):
        for descriptor in module.DESCRIPTOR.message_types_by_name.values():
            classes.append(getattr(module, descriptor.name))
    return classes


def _same(message: Message) -> None:
    expected = json_format.MessageToDict(message)
    assert to_dict(message) == expected
    # Key order too: the SSE data is the dict as json.dumps writes it.
    assert json.dumps(to_dict(message)) == json.dumps(expected)


@pytest.mark.parametrize("cls", _messages(), ids=lambda c: c.DESCRIPTOR.full_name)
def test_every_message_filled_in(cls: type[Message]) -> None:
    _same(cls())
    _same(_fill(cls()))


def test_special_values() -> None:
    job = job_pb2.Job(name="jobs/x", state=99, results=[job_pb2.ResultFile(size_bytes=2**63 - 1)])  # type: ignore[arg-type]
    _same(job)
    _same(provider_pb2.WatchJobResponse(job=job))
    for value in (math.inf, -math.inf, math.nan, 0.1, 1e300, -0.0):
        _same(job_pb2.Environment(cpus=value))
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason="R", domain="d", metadata={"field": "f"}))
    _same(status_pb2.Status(code=5, message="m", details=[detail]))
    _same(struct_pb2.Struct())
    parameters = struct_pb2.Struct()
    parameters.update({"a": [1, {"b": None}]})
    _same(provider_pb2.StartComputeRequest(parameters=parameters))
