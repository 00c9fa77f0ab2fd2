"""Proto3 JSON exactly as `json_format.MessageToDict` writes it, several times faster.

`json_format` decides how to write each field anew for every value it meets; here the decision
is made once per message type and kept, so a message costs one loop over its set fields. Types
with special JSON forms other than Timestamp and Duration (Any, Struct, Value, wrappers,
FieldMask, ...) and 32-bit floats are handed to `json_format` itself, so every output is the
same as its output (tests/gateway compare the two)."""

from __future__ import annotations

import base64
import functools
import math
from collections.abc import Callable
from typing import Any, cast

from google.protobuf import descriptor_pool, json_format, timestamp_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

Convert = Callable[[Any], Any]
# A message type's plan: for each field (the descriptor objects ListFields returns, so the
# lookup needs no attribute of theirs), its JSON name and how to write a value.
Plan = dict[FieldDescriptor, tuple[str, Convert]]

_INT64 = frozenset(
    {
        FieldDescriptor.CPPTYPE_INT64,
        FieldDescriptor.CPPTYPE_UINT64,
    }
)
_AS_IS = frozenset(
    {
        FieldDescriptor.CPPTYPE_INT32,
        FieldDescriptor.CPPTYPE_UINT32,
        FieldDescriptor.CPPTYPE_BOOL,
        FieldDescriptor.CPPTYPE_STRING,
    }
)

_plans: dict[str, Plan | None] = {}


def _delegate(message: Message) -> Any:
    return json_format.MessageToDict(message)


def _to_json_string(message: Any) -> Any:
    return message.ToJsonString()


@functools.lru_cache(maxsize=4096)
def _timestamp_text(seconds: int, nanos: int) -> str:
    return str(timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos).ToJsonString())


def _timestamp(message: Any) -> str:
    # A job's times repeat in every message about it: each is written once.
    return _timestamp_text(message.seconds, message.nanos)


# Written by their ToJsonString method, as json_format does.
_TO_JSON_STRING = {
    "google.protobuf.Timestamp": _timestamp,
    "google.protobuf.Duration": _to_json_string,
}


def _as_is(value: Any) -> Any:
    return value


def _int64(value: int) -> str:
    return str(value)


def _bytes(value: bytes) -> str:
    return base64.b64encode(value).decode("utf-8")


def _double(value: float) -> Any:
    if math.isinf(value):
        return "-Infinity" if value < 0 else "Infinity"
    if math.isnan(value):
        return "NaN"
    return value


def _enum(enum_type: EnumDescriptor) -> Convert:
    names = {number: value.name for number, value in enum_type.values_by_number.items()}

    def convert(value: int) -> Any:
        # An open enum keeps a number it does not know as the number.
        return names.get(value, value)

    return convert


def _message(descriptor: Descriptor) -> Convert:
    special = _TO_JSON_STRING.get(descriptor.full_name)
    if special is not None:
        return special
    if _plan(descriptor) is None:
        return _delegate
    return to_dict


def _scalar(field: FieldDescriptor) -> Convert | None:
    """How to write one value of `field`; None when only json_format knows."""
    cpp_type = field.cpp_type
    if field.message_type is not None:
        return _message(field.message_type)
    if field.enum_type is not None:
        if field.enum_type.full_name == "google.protobuf.NullValue":
            return None
        return _enum(field.enum_type)
    if field.type == FieldDescriptor.TYPE_BYTES:
        return _bytes
    if cpp_type in _AS_IS:
        return _as_is
    if cpp_type in _INT64:
        return _int64
    if cpp_type == FieldDescriptor.CPPTYPE_DOUBLE:
        return _double
    return None  # 32-bit floats: json_format rounds them to their shortest form


def _repeated(convert: Convert) -> Convert:
    return lambda values: [convert(v) for v in values]


def _map(key: FieldDescriptor, convert: Convert) -> Convert:
    if key.cpp_type == FieldDescriptor.CPPTYPE_BOOL:
        return lambda entries: {("true" if k else "false"): convert(entries[k]) for k in entries}
    return lambda entries: {str(k): convert(entries[k]) for k in entries}


def _compile(descriptor: Descriptor) -> Plan | None:
    if descriptor.full_name.startswith("google.protobuf."):
        return None  # the well-known types have JSON forms of their own
    plan: Plan = {}
    for field in descriptor.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key = field.message_type.fields_by_name["key"]
            value = _scalar(field.message_type.fields_by_name["value"])
            if value is None:
                return None
            plan[field] = (field.json_name, _map(key, value))
            continue
        convert = _scalar(field)
        if convert is None:
            return None
        plan[field] = (field.json_name, _repeated(convert) if field.is_repeated else convert)
    return plan


def _plan(descriptor: Descriptor) -> Plan | None:
    name = descriptor.full_name
    if name not in _plans:
        _plans[name] = None  # a type that contains itself delegates at the inner level
        _plans[name] = _compile(descriptor)
    return _plans[name]


def _enum_json_names_exist() -> bool:
    # An enum value may carry its own JSON name (`pb.enumvalue.json`); json_format honours it.
    try:
        descriptor_pool.Default().FindExtensionByName("pb.enumvalue.json")
    except KeyError:
        return False
    return True


_FAST = not _enum_json_names_exist()


def to_dict(message: Message) -> Any:
    """`json_format.MessageToDict(message)`, with the default options."""
    plan = _plan(cast(Descriptor, message.DESCRIPTOR)) if _FAST else None
    if plan is None:
        return json_format.MessageToDict(message)
    out: dict[str, Any] = {}
    try:
        for field, value in message.ListFields():
            step = plan.get(field)
            if step is None:  # an extension
                return json_format.MessageToDict(message)
            out[step[0]] = step[1](value)
    except ValueError:
        return json_format.MessageToDict(message)  # raises json_format's own error
    return out
