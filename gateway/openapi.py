"""The OpenAPI 3.1 document of the REST edge, generated from the same descriptors and
`google.api.http` annotations that route requests, so the two cannot disagree.

Descriptions: the generated `_pb2` modules carry no `source_code_info` (protoc drops it), and
compiling `protos/` at run time is not an option. The proto comments do survive as docstrings
in the mypy-protobuf `.pyi` stubs installed beside the generated modules, so `StubComments`
reads those with `ast` (never importing or executing them). When a stub is missing the
descriptions are simply left out."""

from __future__ import annotations

import ast
import importlib.util
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from google.protobuf.descriptor import (
    Descriptor,
    EnumDescriptor,
    FieldDescriptor,
    FileDescriptor,
    ServiceDescriptor,
)

from gateway.routes import CREDENTIAL_HEADERS, Kind, Route, Variable

_SCALARS: dict[int, dict[str, Any]] = {
    FieldDescriptor.TYPE_DOUBLE: {"type": "number", "format": "double"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number", "format": "float"},
    FieldDescriptor.TYPE_INT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_UINT32: {"type": "integer", "format": "uint32", "minimum": 0},
    FieldDescriptor.TYPE_FIXED32: {"type": "integer", "format": "uint32", "minimum": 0},
    # proto3 JSON writes 64-bit integers as strings (JavaScript numbers lose precision past
    # 2^53) and accepts either a string or a number.
    FieldDescriptor.TYPE_INT64: {"type": ["string", "integer"], "format": "int64"},
    FieldDescriptor.TYPE_SINT64: {"type": ["string", "integer"], "format": "int64"},
    FieldDescriptor.TYPE_SFIXED64: {"type": ["string", "integer"], "format": "int64"},
    FieldDescriptor.TYPE_UINT64: {"type": ["string", "integer"], "format": "uint64"},
    FieldDescriptor.TYPE_FIXED64: {"type": ["string", "integer"], "format": "uint64"},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "format": "byte", "contentEncoding": "base64"},
}

# Well-known types have their own JSON forms, not the shape of their fields.
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {
        "type": "string",
        "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$",
        "description": 'Seconds with an "s" suffix, for example "3600s" or "1.5s".',
    },
    "google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
    "google.protobuf.Empty": {"type": "object"},
    "google.protobuf.FieldMask": {"type": "string"},
    "google.protobuf.Any": {
        "type": "object",
        "properties": {"@type": {"type": "string"}},
        "required": ["@type"],
        "additionalProperties": True,
    },
    "google.protobuf.StringValue": {"type": ["string", "null"]},
    "google.protobuf.BytesValue": {"type": ["string", "null"], "contentEncoding": "base64"},
    "google.protobuf.BoolValue": {"type": ["boolean", "null"]},
    "google.protobuf.Int32Value": {"type": ["integer", "null"], "format": "int32"},
    "google.protobuf.UInt32Value": {"type": ["integer", "null"], "format": "uint32"},
    "google.protobuf.Int64Value": {"type": ["string", "integer", "null"], "format": "int64"},
    "google.protobuf.UInt64Value": {"type": ["string", "integer", "null"], "format": "uint64"},
    "google.protobuf.FloatValue": {"type": ["number", "null"], "format": "float"},
    "google.protobuf.DoubleValue": {"type": ["number", "null"], "format": "double"},
}

_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "Every error, in the style of Google's JSON APIs. `status` is the gRPC code's "
    "name; `details` holds google.rpc error details such as ErrorInfo (`reason`, `domain`, "
    "`metadata.field`).",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "status", "message"],
            "properties": {
                "code": {"type": "integer", "description": "The HTTP status code."},
                "status": {"type": "string", "examples": ["NOT_FOUND"]},
                "message": {"type": "string"},
                "details": {"type": "array", "items": _WELL_KNOWN["google.protobuf.Any"]},
            },
        }
    },
}


class StubComments:
    """Proto comments by full proto name, read from the mypy-protobuf stubs' docstrings."""

    def __init__(self) -> None:
        self._by_name: dict[str, str] = {}
        self._loaded: set[str] = set()

    def get(self, full_name: str) -> str:
        return self._by_name.get(full_name, "")

    def load(self, files: Iterable[FileDescriptor]) -> None:
        for file in files:
            if file.name in self._loaded:
                continue
            self._loaded.add(file.name)
            module = file.name.removesuffix(".proto").replace("/", ".")
            for suffix in ("_pb2", "_pb2_grpc"):
                stub = _stub_path(module + suffix)
                if stub is not None:
                    self._read(stub, file.package)
            self.load(file.dependencies)

    def _read(self, path: Path, package: str) -> None:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, ValueError):
            return
        self._walk(tree.body, package)

    def _walk(self, body: Sequence[ast.stmt], prefix: str) -> None:
        for index, node in enumerate(body):
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                name = node.name
                if name.endswith("Stub") and not name.endswith("AsyncStub"):
                    name = name.removesuffix("Stub")
                elif name.endswith(("AsyncStub", "Servicer")):
                    continue
                full = f"{prefix}.{name}"
                self._note(full, ast.get_docstring(node, clean=True))
                self._walk(node.body, full)
            elif isinstance(node, ast.FunctionDef) and _is_property(node):
                self._note(f"{prefix}.{node.name}", ast.get_docstring(node, clean=True))
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                following = body[index + 1] if index + 1 < len(body) else None
                if (
                    isinstance(following, ast.Expr)
                    and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)
                ):
                    self._note(f"{prefix}.{node.target.id}", _clean(following.value.value))

    def _note(self, full_name: str, text: str | None) -> None:
        if text and full_name not in self._by_name:
            self._by_name[full_name] = text


def _is_property(node: ast.FunctionDef) -> bool:
    return any(
        (isinstance(d, ast.Name) and d.id == "property")
        or (isinstance(d, ast.Attribute) and d.attr == "property")
        for d in node.decorator_list
    )


def _clean(text: str) -> str:
    lines = text.expandtabs().splitlines()
    indents = [len(line) - len(line.lstrip()) for line in lines[1:] if line.strip()]
    cut = min(indents, default=0)
    return "\n".join([lines[0].strip(), *(line[cut:] for line in lines[1:])]).strip()


def _stub_path(module: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    stub = Path(spec.origin).with_suffix(".pyi")
    return stub if stub.is_file() else None


def _singular(collection: str) -> str:
    if collection.endswith("ies"):
        return collection[:-3] + "y"
    if collection.endswith("s") and len(collection) > 1:
        return collection[:-1]
    return collection


def openapi_path(route: Route) -> tuple[str, list[tuple[str, Variable, str]]]:
    """The OpenAPI form of a path template, AIP style: `/v1/{name=jobs/*/results/*}:download`
    becomes `/v1/jobs/{job}/results/{result}:download`. Returns the path and, for each
    parameter, its name, its variable and the variable's pattern with the parameter in it."""
    out: list[str] = []
    params: list[tuple[str, Variable, str]] = []
    used: set[str] = set()

    def fresh(base: str) -> str:
        name, n = base, 2
        while name in used:
            name, n = f"{base}{n}", n + 1
        used.add(name)
        return name

    for part in route.template.parts:
        if isinstance(part, str):
            out.append(part)
            continue
        field_name = ".".join(part.field_path)
        pieces: list[str] = []
        names: list[str] = []
        previous = ""
        for segment in part.segments:
            if segment in ("*", "**"):
                # `jobs/*` names its wildcard `job`; a bare `{name}` keeps the field's name.
                name = fresh(_singular(previous) if previous else field_name)
                names.append(name)
                pieces.append(f"{{{name}}}")
            else:
                pieces.append(segment)
            previous = segment
        pattern = "/".join(pieces)
        params += [(name, part, pattern) for name in names]
        out.append(pattern)
    path = "/" + "/".join(out)
    if route.template.verb:
        path += ":" + route.template.verb
    return path, params


class _Builder:
    def __init__(self, comments: StubComments) -> None:
        self.comments = comments
        self.schemas: dict[str, Any] = {"Error": _ERROR_SCHEMA}

    def ref(self, descriptor: Descriptor | EnumDescriptor) -> dict[str, Any]:
        if isinstance(descriptor, EnumDescriptor):
            self._enum(descriptor)
        else:
            well_known = _WELL_KNOWN.get(descriptor.full_name)
            if well_known is not None:
                return dict(well_known)
            self._message(descriptor)
        return {"$ref": f"#/components/schemas/{descriptor.full_name}"}

    def _enum(self, enum: EnumDescriptor) -> None:
        if enum.full_name in self.schemas:
            return
        # Enum values are scoped beside their enum in proto, so their comments are too.
        scope = enum.full_name.rpartition(".")[0]
        lines = [
            f"- `{value.name}`: {self.comments.get(f'{scope}.{value.name}')}".rstrip(": ")
            for value in enum.values
        ]
        doc = self.comments.get(enum.full_name)
        self.schemas[enum.full_name] = {
            "type": "string",
            "enum": [value.name for value in enum.values],
            "description": "\n\n".join(filter(None, [doc, "\n".join(lines)])),
        }

    def _message(self, message: Descriptor) -> None:
        if message.full_name in self.schemas:
            return
        schema: dict[str, Any] = {"type": "object", "properties": {}}
        # Registered before the fields so that recursive messages end in a $ref.
        self.schemas[message.full_name] = schema
        doc = self.comments.get(message.full_name)
        if doc:
            schema["description"] = doc
        for field in message.fields:
            schema["properties"][field.json_name] = self.field(field)
        schema["additionalProperties"] = False

    def field(self, field: FieldDescriptor) -> dict[str, Any]:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value = field.message_type.fields_by_name["value"]
            schema: dict[str, Any] = {
                "type": "object",
                "additionalProperties": self._single(value),
            }
        elif field.is_repeated:
            schema = {"type": "array", "items": self._single(field)}
        else:
            schema = self._single(field)
        doc = self.comments.get(field.full_name)
        if doc:
            schema["description"] = doc
        return schema

    def _single(self, field: FieldDescriptor) -> dict[str, Any]:
        if field.enum_type is not None:
            return self.ref(field.enum_type)
        if field.message_type is not None:
            return self.ref(field.message_type)
        return dict(_SCALARS[field.type])


def _query_parameters(builder: _Builder, route: Route, bound: set[str]) -> list[dict[str, Any]]:
    parameters: list[dict[str, Any]] = []
    for field in route.method.input_type.fields:
        if field.name in bound or field.name == route.body or route.body == "*":
            continue
        map_entry = field.message_type is not None and field.message_type.GetOptions().map_entry
        nested = field.message_type is not None and field.message_type.full_name not in _WELL_KNOWN
        if map_entry or nested:
            # Only scalars (and their lists) fit in a query string.
            continue
        schema = builder.field(field)
        description = schema.pop("description", "")
        parameters.append(
            {
                "name": field.json_name,
                "in": "query",
                "required": False,
                "description": description
                + (f" Also accepted as `{field.name}`." if field.name != field.json_name else ""),
                "schema": schema,
                **({"explode": True} if field.is_repeated else {}),
            }
        )
    return parameters


def _operation(builder: _Builder, route: Route, operation_id: str) -> tuple[str, dict[str, Any]]:
    path, params = openapi_path(route)
    comments = builder.comments
    method = route.method
    doc = comments.get(f"{method.containing_service.full_name}.{method.name}")
    parameters: list[dict[str, Any]] = []
    for name, variable, pattern in params:
        field_path = ".".join(variable.field_path)
        parameters.append(
            {
                "name": name,
                "in": "path",
                "required": True,
                "description": f"Part of the request's `{field_path}`, which is `{pattern}`."
                if pattern != f"{{{name}}}"
                else f"The request's `{field_path}`.",
                "schema": {"type": "string"},
            }
        )
    parameters += _query_parameters(builder, route, {v.field_path[0] for _, v, _ in params})
    operation: dict[str, Any] = {
        "operationId": operation_id,
        "tags": [method.containing_service.name],
        "summary": doc.split("\n\n")[0].replace("\n", " ").split(". ")[0].rstrip(".")
        if doc
        else method.name,
        "description": doc,
        "x-grpc-method": route.grpc_path,
        "x-http-rule": f"{route.http_method.lower()}: {route.template.text}",
    }
    response_ref = builder.ref(route.method.output_type)
    responses: dict[str, Any] = {}
    if route.kind is Kind.UNARY:
        responses["200"] = {
            "description": f"The {route.method.output_type.name}.",
            "content": {"application/json": {"schema": response_ref}},
        }
    elif route.kind is Kind.EVENTS:
        event = route.method.output_type.name
        resumable = "offset" in route.method.input_type.fields_by_name
        if resumable:
            parameters.append(
                {
                    "name": "Last-Event-ID",
                    "in": "header",
                    "required": False,
                    "description": "Resumes the stream: sets the request's `offset` (the `id` of "
                    "the last event received).",
                    "schema": {"type": "string"},
                }
            )
        responses["200"] = {
            "description": (
                f"Server-Sent Events. Each `{event}` event's `data` is one {event} as JSON"
                + (", and its `id` is the offset to resume from" if resumable else "")
                + ". A stream that fails ends with an `error` event whose `data` is an Error. "
                "`: keepalive` comments are sent while there is nothing to say."
            ),
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
            "x-sse-events": {event: response_ref, "error": {"$ref": "#/components/schemas/Error"}},
        }
    else:
        parameters.append(
            {
                "name": "Range",
                "in": "header",
                "required": False,
                "description": "`bytes=N-`, `bytes=N-M` or `bytes=-N`: resumes or slices the "
                "download. Needs a bearer token (the gateway reads the size with GetJob); with "
                "a signature, resume with the `offset` query parameter instead.",
                "schema": {"type": "string"},
            }
        )
        binary = {
            "application/octet-stream": {
                "schema": {"type": "string", "contentMediaType": "application/octet-stream"}
            }
        }
        responses["200"] = {"description": "The file's bytes, as an attachment.", "content": binary}
        responses["206"] = {"description": "The requested range of the file.", "content": binary}
        responses["416"] = {
            "description": "The range starts past the end of the file.",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
    responses["default"] = {
        "description": "An error.",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    operation["parameters"] = parameters
    if route.body:
        body_schema = (
            builder.ref(route.method.input_type)
            if route.body == "*"
            else builder.field(route.method.input_type.fields_by_name[route.body])
        )
        operation["requestBody"] = {
            "required": False,
            "content": {"application/json": {"schema": body_schema}},
        }
    operation["responses"] = responses
    return path, operation


def build_openapi(
    routes: Sequence[Route],
    services: Sequence[ServiceDescriptor],
    *,
    title: str = "c2d Provider API",
    version: str = "v1",
    comments: StubComments | None = None,
) -> dict[str, Any]:
    """The OpenAPI 3.1 document for `routes`."""
    if comments is None:
        comments = StubComments()
        comments.load(service.file for service in services)
    builder = _Builder(comments)
    paths: dict[str, dict[str, Any]] = {}
    seen_ids: dict[str, int] = {}
    for route in routes:
        count = seen_ids.get(route.method.name, 0)
        seen_ids[route.method.name] = count + 1
        operation_id = route.method.name + (str(count + 1) if count else "")
        path, operation = _operation(builder, route, operation_id)
        paths.setdefault(path, {})[route.http_method.lower()] = operation
    description = "\n\n".join(
        filter(None, [comments.get(service.full_name) for service in services])
    )
    credential_schemes = {
        re.sub(r"(?:^|-)(\w)", lambda m: m.group(1).upper(), header): {
            "type": "apiKey",
            "in": "header",
            "name": header,
        }
        for header in CREDENTIAL_HEADERS
        if header != "authorization"
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version, "description": description},
        "paths": paths,
        "components": {
            "schemas": dict(sorted(builder.schemas.items())),
            "securitySchemes": {
                "bearerToken": {"type": "http", "scheme": "bearer"},
                **credential_schemes,
            },
        },
        # A signed call (all three headers), a token call, or an open call (some reads).
        "security": [{"bearerToken": []}, {name: [] for name in credential_schemes}, {}],
    }
