"""HTTP routes read from the `google.api.http` annotations of the services' descriptors, and the
building of a request message from a path, a query string and a JSON body.

There is no second, hand-written route list: a new RPC with an annotation is served as soon
as the generated code is rebuilt."""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.api import annotations_pb2, http_pb2
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import (
    Descriptor,
    FieldDescriptor,
    MethodDescriptor,
    ServiceDescriptor,
)
from google.protobuf.message import Message

from gateway.errors import HttpError

# Credentials travel only in headers: a URL ends up in logs, histories and Referer headers.
CREDENTIAL_HEADERS = ("x-c2d-address", "x-c2d-nonce", "x-c2d-signature", "authorization")

# Well-known types that proto3 JSON writes as a string, so a query parameter can set them.
_STRING_LIKE_WKT = frozenset(
    {
        "google.protobuf.Timestamp",
        "google.protobuf.Duration",
        "google.protobuf.FieldMask",
        "google.protobuf.StringValue",
        "google.protobuf.BytesValue",
        "google.protobuf.Int32Value",
        "google.protobuf.Int64Value",
        "google.protobuf.UInt32Value",
        "google.protobuf.UInt64Value",
        "google.protobuf.FloatValue",
        "google.protobuf.DoubleValue",
    }
)
_INTEGER_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED32,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED32,
        FieldDescriptor.TYPE_SFIXED64,
    }
)
_FLOAT_TYPES = frozenset({FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE})


class Kind(enum.Enum):
    """How a method's responses travel over HTTP."""

    UNARY = "unary"
    # A server stream, sent as Server-Sent Events.
    EVENTS = "events"
    # A server stream of `{offset, data}` chunks, sent as the raw bytes of a file.
    DOWNLOAD = "download"


@dataclass(frozen=True)
class Variable:
    """A `{field.path=pattern}` part of a path template."""

    field_path: tuple[str, ...]
    # The segments it matches, for example ("jobs", "*"); ("*",) when the template gave none.
    segments: tuple[str, ...]


@dataclass(frozen=True)
class PathTemplate:
    """A parsed `google.api.HttpRule` path such as `/v1/{name=jobs/*/results/*}:download`."""

    text: str
    # Literal strings and variables, in order, as they appear between slashes at the top level.
    parts: tuple[str | Variable, ...]
    verb: str
    regex: re.Pattern[str] = field(compare=False)

    @property
    def variables(self) -> tuple[Variable, ...]:
        return tuple(p for p in self.parts if isinstance(p, Variable))

    def match(self, path: str) -> dict[tuple[str, ...], str] | None:
        """The variables' values when `path` (without its verb) matches, else None."""
        found = self.regex.fullmatch(path)
        if found is None:
            return None
        return {v.field_path: found.group(f"v{i}") for i, v in enumerate(self.variables)}


def _split_top(text: str, separator: str) -> list[str]:
    """Splits at `separator` outside braces."""
    pieces: list[str] = []
    depth = 0
    current: list[str] = []
    for char in text:
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        if char == separator and depth == 0:
            pieces.append("".join(current))
            current = []
        else:
            current.append(char)
    pieces.append("".join(current))
    return pieces


def _segment_regex(segment: str) -> str:
    if segment == "*":
        return "[^/]+"
    if segment == "**":
        return ".+"
    return re.escape(segment)


def parse_template(text: str) -> PathTemplate:
    """Parses the HttpRule path grammar: `/` segments, `{var}` or `{var=segments}`, `*`,
    `**` and an optional `:verb` after the last segment."""
    if not text.startswith("/"):
        raise ValueError(f"path template must start with '/': {text!r}")
    segments = _split_top(text[1:], "/")
    verb = ""
    last = _split_top(segments[-1], ":")
    if len(last) > 2:
        raise ValueError(f"path template has more than one verb: {text!r}")
    if len(last) == 2:
        segments[-1], verb = last
    parts: list[str | Variable] = []
    pattern: list[str] = []
    for segment in segments:
        if segment.startswith("{") and segment.endswith("}"):
            name, _, sub = segment[1:-1].partition("=")
            sub_segments = tuple(sub.split("/")) if sub else ("*",)
            variable = Variable(tuple(name.split(".")), sub_segments)
            index = sum(isinstance(p, Variable) for p in parts)
            inner = "/".join(_segment_regex(s) for s in sub_segments)
            pattern.append(f"(?P<v{index}>{inner})")
            parts.append(variable)
        else:
            pattern.append(_segment_regex(segment))
            parts.append(segment)
    return PathTemplate(text, tuple(parts), verb, re.compile("/" + "/".join(pattern)))


def split_verb(path: str) -> tuple[str, str]:
    """Splits a request path into the path and its custom verb (after a colon in the last
    segment), so that `/v1/jobs/1:watch` and `/v1/jobs/1` reach different methods."""
    head, slash, last = path.rpartition("/")
    name, colon, verb = last.rpartition(":")
    if not colon:
        return path, ""
    return f"{head}{slash}{name}", verb


@dataclass(frozen=True)
class Route:
    http_method: str
    template: PathTemplate
    # "" (fields from the query), "*" (the whole request is the body) or a field name.
    body: str
    method: MethodDescriptor
    request_class: type[Message]
    response_class: type[Message]
    kind: Kind

    @property
    def grpc_path(self) -> str:
        return f"/{self.method.containing_service.full_name}/{self.method.name}"

    @property
    def bound_fields(self) -> frozenset[tuple[str, ...]]:
        return frozenset(v.field_path for v in self.template.variables)


def _kind(method: MethodDescriptor) -> Kind:
    if not method.server_streaming:
        return Kind.UNARY
    fields = method.output_type.fields_by_name
    data, offset = fields.get("data"), fields.get("offset")
    # A stream of byte chunks with their offsets is a file: served as bytes, not as events.
    if (
        data is not None
        and data.type == FieldDescriptor.TYPE_BYTES
        and offset is not None
        and offset.type == FieldDescriptor.TYPE_INT64
    ):
        return Kind.DOWNLOAD
    return Kind.EVENTS


def _rule_method_and_path(rule: http_pb2.HttpRule) -> tuple[str, str] | None:
    pattern = rule.WhichOneof("pattern")
    if pattern is None:
        return None
    if pattern == "custom":
        return rule.custom.kind.upper(), rule.custom.path
    return pattern.upper(), str(getattr(rule, pattern))


def routes_for(services: Iterable[ServiceDescriptor]) -> list[Route]:
    """Every route of every annotated method, additional bindings included."""
    routes: list[Route] = []
    for service in services:
        for method in service.methods:
            if method.client_streaming:
                # HTTP/1.1 with JSON has no way to send a stream of requests.
                continue
            options = method.GetOptions()
            if not options.HasExtension(annotations_pb2.http):
                continue
            rule: http_pb2.HttpRule = options.Extensions[annotations_pb2.http]
            for binding in [rule, *rule.additional_bindings]:
                method_and_path = _rule_method_and_path(binding)
                if method_and_path is None:
                    continue
                http_method, path = method_and_path
                routes.append(
                    Route(
                        http_method=http_method,
                        template=parse_template(path),
                        body=binding.body,
                        method=method,
                        request_class=message_factory.GetMessageClass(method.input_type),
                        response_class=message_factory.GetMessageClass(method.output_type),
                        kind=_kind(method),
                    )
                )
    return routes


class RouteTable:
    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = list(routes)

    def find(self, http_method: str, path: str) -> tuple[Route, dict[tuple[str, ...], str]]:
        """The route for a request, with its path variables; 404 or 405 as JSON errors."""
        bare, verb = split_verb(path)
        allowed: set[str] = set()
        for route in self.routes:
            if route.template.verb != verb:
                continue
            values = route.template.match(bare)
            if values is None:
                continue
            if route.http_method == http_method:
                return route, values
            allowed.add(route.http_method)
        if allowed:
            raise HttpError.local(
                grpc.StatusCode.UNIMPLEMENTED,
                f"{http_method} is not allowed on {path}; allowed: {', '.join(sorted(allowed))}",
                reason="METHOD_NOT_ALLOWED",
                http_code=405,
                headers={"Allow": ", ".join(sorted(allowed))},
            )
        raise HttpError.local(
            grpc.StatusCode.NOT_FOUND,
            f"no such route: {http_method} {path}",
            reason="ROUTE_NOT_FOUND",
        )


def find_field(descriptor: Descriptor, name: str) -> FieldDescriptor | None:
    """A field by its proto name or its JSON (lowerCamel) name."""
    found = descriptor.fields_by_name.get(name)
    if found is not None:
        return found
    for candidate in descriptor.fields:
        if candidate.json_name == name:
            return candidate
    return None


def _bad_request(message: str, field_name: str | None, reason: str) -> HttpError:
    return HttpError.local(
        grpc.StatusCode.INVALID_ARGUMENT, message, reason=reason, field=field_name
    )


def _put(
    target: dict[str, Any],
    descriptor: Descriptor,
    path: Sequence[str],
    value: Any,
    *,
    append: bool,
) -> None:
    """Sets `path` in a JSON-shaped dict under the proto field names, dropping any spelling of
    the same field already there (a body's `pageSize` must not clash with `page_size`)."""
    found = find_field(descriptor, path[0])
    if found is None:
        raise _bad_request(f"unknown field {path[0]!r}", path[0], "UNKNOWN_FIELD")
    if found.json_name != found.name and found.json_name in target:
        target[found.name] = target.pop(found.json_name)
    if len(path) > 1:
        if found.message_type is None or found.is_repeated:
            raise _bad_request(
                f"{found.name} has no subfield {path[1]!r}", ".".join(path), "UNKNOWN_FIELD"
            )
        child = target.setdefault(found.name, {})
        if not isinstance(child, dict):
            raise _bad_request(f"{found.name} must be an object", found.name, "INVALID_FIELD")
        _put(child, found.message_type, path[1:], value, append=append)
        return
    if append:
        target.setdefault(found.name, []).append(value)
    else:
        target[found.name] = value


def _leaf(descriptor: Descriptor, path: Sequence[str]) -> FieldDescriptor:
    current = descriptor
    found: FieldDescriptor | None = None
    for index, part in enumerate(path):
        found = find_field(current, part)
        name = ".".join(path[: index + 1])
        if found is None:
            raise _bad_request(f"unknown query parameter {name!r}", name, "UNKNOWN_FIELD")
        if index < len(path) - 1:
            if found.message_type is None or found.is_repeated:
                raise _bad_request(f"unknown query parameter {name!r}", name, "UNKNOWN_FIELD")
            current = found.message_type
    assert found is not None
    return found


def _query_value(leaf: FieldDescriptor, name: str, raw: str) -> Any:
    """Turns a query string value into what proto3 JSON expects for the field."""

    def bad(kind: str) -> HttpError:
        return _bad_request(
            f"query parameter {name!r} must be {kind}, not {raw!r}", name, "INVALID_FIELD"
        )

    if leaf.message_type is not None:
        full_name = leaf.message_type.full_name
        if full_name == "google.protobuf.BoolValue":
            leaf_type = FieldDescriptor.TYPE_BOOL
        elif full_name in _STRING_LIKE_WKT:
            return raw
        else:
            raise _bad_request(
                f"{name!r} is a message; set its fields (as {name}.<field>) instead",
                name,
                "INVALID_FIELD",
            )
    else:
        leaf_type = leaf.type
    if leaf_type == FieldDescriptor.TYPE_BOOL:
        lowered = raw.lower()
        if lowered in ("true", "1"):
            return True
        if lowered in ("false", "0"):
            return False
        raise bad("true or false")
    if leaf_type in _INTEGER_TYPES:
        try:
            return int(raw, 10)
        except ValueError:
            raise bad("an integer") from None
    if leaf_type in _FLOAT_TYPES:
        try:
            return float(raw)
        except ValueError:
            raise bad("a number") from None
    # Strings, enums (by name or number) and bytes (base64): proto3 JSON parses them.
    return raw


_UNKNOWN_FIELD = re.compile(r'has no field named "([^"]+)" at "([^"]+)"')
_PARSE_FIELD = re.compile(r"Failed to parse (\S+) field")


def _field_of_parse_error(text: str) -> str | None:
    unknown = _UNKNOWN_FIELD.search(text)
    if unknown is not None:
        # `at "StartComputeRequest.rawAlgorithm"`: drop the message name, keep the path.
        _, _, parent = unknown.group(2).partition(".")
        return f"{parent}.{unknown.group(1)}" if parent else unknown.group(1)
    chain = _PARSE_FIELD.findall(text)
    return ".".join(chain) if chain else None


def build_request(
    route: Route,
    path_values: Mapping[tuple[str, ...], str],
    query: Sequence[tuple[str, str]],
    body: bytes,
) -> Message:
    """The request message: the body (per the rule's `body`), then query parameters for the
    fields the body does not carry, then the path variables, which always win."""
    descriptor = route.method.input_type
    fields: dict[str, Any] = {}
    if route.body:
        try:
            parsed = json.loads(body) if body.strip() else {}
        except (ValueError, UnicodeDecodeError) as error:
            raise _bad_request(
                f"the body is not valid JSON: {error}", None, "INVALID_JSON"
            ) from None
        if route.body == "*":
            if not isinstance(parsed, dict):
                raise _bad_request("the body must be a JSON object", None, "INVALID_JSON")
            fields = parsed
        else:
            body_field = find_field(descriptor, route.body)
            if body_field is None:  # pragma: no cover - a broken annotation
                raise ValueError(f"{route.grpc_path}: body field {route.body!r} is unknown")
            if body.strip():
                fields[body_field.name] = parsed

    for raw_name, raw_value in query:
        if raw_name.lower() in CREDENTIAL_HEADERS:
            raise _bad_request(
                f"{raw_name!r} is accepted only as an HTTP header, never in the URL",
                raw_name,
                "CREDENTIALS_IN_URL",
            )
        if route.body == "*":
            raise _bad_request(
                f"unknown query parameter {raw_name!r}: this method takes its request as the body",
                raw_name,
                "UNKNOWN_FIELD",
            )
        path = tuple(raw_name.split("."))
        leaf = _leaf(descriptor, path)
        top = find_field(descriptor, path[0])
        assert top is not None
        proto_path = _proto_path(descriptor, path)
        if proto_path in route.bound_fields or (route.body and top.name == route.body):
            raise _bad_request(
                f"query parameter {raw_name!r} sets a field the path or body already sets",
                raw_name,
                "UNKNOWN_FIELD",
            )
        if leaf.message_type is not None and leaf.message_type.GetOptions().map_entry:
            raise _bad_request(
                f"map field {raw_name!r} cannot be set from the query", raw_name, "INVALID_FIELD"
            )
        value = _query_value(leaf, raw_name, raw_value)
        _put(
            fields,
            descriptor,
            path,
            value,
            append=leaf.is_repeated,
        )

    for field_path, value in path_values.items():
        _put(fields, descriptor, field_path, value, append=False)

    request = route.request_class()
    try:
        json_format.ParseDict(fields, request, ignore_unknown_fields=False)
    except json_format.ParseError as error:
        text = str(error)
        raise _bad_request(
            text.splitlines()[0], _field_of_parse_error(text), "INVALID_FIELD"
        ) from None
    return request


def _proto_path(descriptor: Descriptor, path: Sequence[str]) -> tuple[str, ...]:
    """`path` with each part spelled as its proto field name."""
    names: list[str] = []
    current: Descriptor | None = descriptor
    for part in path:
        found = find_field(current, part) if current is not None else None
        if found is None:
            names.append(part)
            current = None
            continue
        names.append(found.name)
        current = found.message_type
    return tuple(names)
