"""What the Kubernetes API stand-in (kube_standin.py) does to objects, as plain functions:
the kinds it serves, Status errors, label and field selectors, patches, validation,
server-side defaults, pod status as the kubelet writes it, and log selection."""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from aiohttp import web

from tests.kube_schemas import validate_strict

Obj = dict[str, Any]

NODE_NAME = "kube-standin-node"
DEADLINE_MESSAGE = "Pod was active on the node longer than the specified deadline"


class UnsupportedByStandIn(Exception):
    """The test asked for something the stand-in deliberately does not emulate."""


# --- resources -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resource:
    """One kind the stand-in serves, as its URL and its objects name it."""

    group: str
    version: str
    plural: str
    kind: str
    # Kinds with a status subresource keep their stored status on writes to the main resource.
    has_status: bool
    # DELETE answers with the object for these kinds (what the typed client expects), else a
    # Status.
    delete_returns_object: bool
    # Extra field selectors besides metadata.name and metadata.namespace: name -> JSON path.
    fields: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def details(self, name: str) -> Obj:
        details: Obj = {"name": name, "kind": self.plural}
        if self.group:
            details["group"] = self.group
        return details

    def qualified(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural


POD = Resource(
    "",
    "v1",
    "pods",
    "Pod",
    has_status=True,
    delete_returns_object=True,
    fields=(("status.phase", ("status", "phase")), ("spec.nodeName", ("spec", "nodeName"))),
)
SECRET = Resource("", "v1", "secrets", "Secret", False, False, fields=(("type", ("type",)),))
CONFIG_MAP = Resource("", "v1", "configmaps", "ConfigMap", False, False)
PVC = Resource("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", True, True)
SERVICE = Resource("", "v1", "services", "Service", True, True)
NETWORK_POLICY = Resource(
    "networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", False, False
)
JOB = Resource("batch", "v1", "jobs", "Job", True, False)
RESOURCES = (POD, SECRET, CONFIG_MAP, PVC, SERVICE, NETWORK_POLICY, JOB)
RESOURCES_BY_URL = {(r.group, r.version, r.plural): r for r in RESOURCES}


def resource_for(kind: str) -> Resource:
    """The resource a test names by kind ("Pod"), singular or plural ("pods")."""
    wanted = kind.lower()
    for resource in RESOURCES:
        if wanted in (resource.kind.lower(), resource.plural, resource.plural.rstrip("s")):
            return resource
    raise ValueError(f"the stand-in does not serve {kind!r}")


# --- errors ----------------------------------------------------------------------------------

_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


class ApiError(Exception):
    """A refusal, answered as the Status object the real server sends."""

    def __init__(
        self,
        code: int,
        message: str,
        *,
        reason: str | None = None,
        details: Obj | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or _REASONS.get(code, "Unknown")
        self.details = details
        self.headers = dict(headers or {})

    def status(self) -> Obj:
        status: Obj = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details is not None:
            status["details"] = self.details
        return status

    def response(self) -> web.Response:
        return web.json_response(self.status(), status=self.code, headers=self.headers)


def not_found(resource: Resource, name: str) -> ApiError:
    return ApiError(
        404, f'{resource.qualified()} "{name}" not found', details=resource.details(name)
    )


def already_exists(resource: Resource, name: str) -> ApiError:
    return ApiError(
        409,
        f'{resource.qualified()} "{name}" already exists',
        reason="AlreadyExists",
        details=resource.details(name),
    )


def conflict(resource: Resource, name: str, why: str) -> ApiError:
    return ApiError(
        409,
        f'Operation cannot be fulfilled on {resource.qualified()} "{name}": {why}',
        details=resource.details(name),
    )


def bad_request(message: str) -> ApiError:
    return ApiError(400, message)


@dataclass(frozen=True)
class Cause:
    field: str
    message: str
    reason: str = "FieldValueInvalid"


def invalid(resource: Resource, name: str, causes: Sequence[Cause]) -> ApiError:
    texts = [f"{cause.field}: {cause.message}" for cause in causes]
    summary = texts[0] if len(texts) == 1 else "[" + ", ".join(texts) + "]"
    details: Obj = {
        "name": name,
        "kind": resource.kind,
        "causes": [
            {"reason": cause.reason, "message": cause.message, "field": cause.field}
            for cause in causes
        ],
    }
    if resource.group:
        details["group"] = resource.group
    return ApiError(422, f'{resource.kind} "{name}" is invalid: {summary}', details=details)


def injected_error(code: int, verb: str, key: str, namespace: str | None) -> ApiError:
    reason = _REASONS.get(code, "Unknown")
    where = f' in the namespace "{namespace}"' if namespace else ""
    messages = {
        403: f'{key} is forbidden: User "kube-standin" cannot {verb} resource "{key}"{where}',
        429: "the server has received too many requests and has asked us to try again later",
        500: "an error on the server (injected by the kube stand-in) has prevented the request",
        503: "the server is currently unable to handle the request",
    }
    headers = {"Retry-After": "1"} if code == 429 else None
    details: Obj | None = {"retryAfterSeconds": 1} if code == 429 else None
    return ApiError(
        code,
        messages.get(code, f"{reason} (injected by the kube stand-in)"),
        reason=reason,
        details=details,
        headers=headers,
    )


# --- time ------------------------------------------------------------------------------------


def utc_now() -> datetime:
    return datetime.now(UTC)


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rfc3339_nano(moment: datetime) -> str:
    """Go's RFC3339Nano, as the kubelet stamps log lines: trailing zeros of the fraction go."""
    fraction = f"{moment.microsecond:06d}000".rstrip("0")
    base = moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{base}.{fraction}Z" if fraction else f"{base}Z"


def _parse_time(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as error:
        raise bad_request(f'invalid time "{text}": {error}') from error
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


# --- selectors -------------------------------------------------------------------------------

_SELECTOR_KEY = r"[A-Za-z0-9][-A-Za-z0-9_./]*"
_SELECTOR_VALUE = r"[-A-Za-z0-9_.]*"
_SET_REQUIREMENT = re.compile(rf"^({_SELECTOR_KEY})\s+(in|notin)\s*\(([^()]*)\)$")
_EQUALITY_REQUIREMENT = re.compile(rf"^({_SELECTOR_KEY})\s*(==|=|!=)\s*({_SELECTOR_VALUE})$")
_EXISTS_REQUIREMENT = re.compile(rf"^(!?)\s*({_SELECTOR_KEY})$")


@dataclass(frozen=True)
class Requirement:
    """One term of a label selector; `!=` and `notin` also match objects without the key."""

    key: str
    operator: Literal["exists", "!exists", "in", "notin"]
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "exists":
            return self.key in labels
        if self.operator == "!exists":
            return self.key not in labels
        if self.operator == "in":
            return labels.get(self.key) in self.values
        return labels.get(self.key) not in self.values


def _split_terms(text: str) -> list[str]:
    """Splits a selector at the commas outside parentheses."""
    terms: list[str] = []
    depth = 0
    current = ""
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += char
    terms.append(current)
    return [term.strip() for term in terms if term.strip()]


def parse_label_selector(text: str) -> list[Requirement]:
    """The requirements of a label selector as the API takes it; 400 when it does not parse."""
    requirements: list[Requirement] = []
    for term in _split_terms(text):
        if match := _SET_REQUIREMENT.match(term):
            values = frozenset(v.strip() for v in match[3].split(",") if v.strip())
            operator: Literal["in", "notin"] = "in" if match[2] == "in" else "notin"
            requirements.append(Requirement(match[1], operator, values))
        elif match := _EQUALITY_REQUIREMENT.match(term):
            negated = match[2] == "!="
            requirements.append(
                Requirement(match[1], "notin" if negated else "in", frozenset({match[3]}))
            )
        elif match := _EXISTS_REQUIREMENT.match(term):
            requirements.append(Requirement(match[2], "!exists" if match[1] else "exists"))
        else:
            raise bad_request(f"unable to parse requirement: {term!r}")
    return requirements


def labels_match(obj: Obj, requirements: Sequence[Requirement]) -> bool:
    labels = obj.get("metadata", {}).get("labels") or {}
    return all(requirement.matches(labels) for requirement in requirements)


@dataclass(frozen=True)
class FieldRequirement:
    path: tuple[str, ...]
    value: str
    negated: bool

    def matches(self, obj: Obj) -> bool:
        found: Any = obj
        for part in self.path:
            found = found.get(part) if isinstance(found, dict) else None
        equal = str(found if found is not None else "") == self.value
        return equal != self.negated


def parse_field_selector(text: str, resource: Resource) -> list[FieldRequirement]:
    known = {
        "metadata.name": ("metadata", "name"),
        "metadata.namespace": ("metadata", "namespace"),
        **dict(resource.fields),
    }
    requirements: list[FieldRequirement] = []
    for term in _split_terms(text):
        match = re.match(r"^([\w.]+)\s*(==|=|!=)\s*(.*)$", term)
        if match is None:
            raise bad_request(f"invalid selector: {term!r}; can't understand it")
        if match[1] not in known:
            names = ", ".join(f'"{name}"' for name in known)
            raise bad_request(
                f'field label not supported: "{match[1]}" is not a known field selector: '
                f"only {names}"
            )
        requirements.append(FieldRequirement(known[match[1]], match[3], match[2] == "!="))
    return requirements


@dataclass(frozen=True)
class Selection:
    """What a list or watch selects: a namespace (or all), labels and fields."""

    resource: Resource
    namespace: str | None
    labels: tuple[Requirement, ...] = ()
    fields: tuple[FieldRequirement, ...] = ()

    def matches(self, obj: Obj) -> bool:
        metadata = obj.get("metadata", {})
        if self.namespace is not None and metadata.get("namespace") != self.namespace:
            return False
        return labels_match(obj, self.labels) and all(f.matches(obj) for f in self.fields)


# --- patches ---------------------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: maps merge key by key, null removes a key, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _pointer(path: Any) -> list[str]:
    if not isinstance(path, str) or (path and not path.startswith("/")):
        raise ApiError(422, f"invalid JSON pointer {path!r}")
    return [part.replace("~1", "/").replace("~0", "~") for part in path.split("/")[1:]]


def _child(container: Any, token: str, path: str) -> Any:
    if isinstance(container, dict) and token in container:
        return container[token]
    if isinstance(container, list) and token.isdigit() and int(token) < len(container):
        return container[int(token)]
    raise ApiError(422, f"the path {path!r} does not exist in the object")


def _parent(doc: Any, parts: list[str], path: str) -> Any:
    container = doc
    for token in parts[:-1]:
        container = _child(container, token, path)
    return container


def _list_index(container: list[Any], token: str, path: str, *, inserting: bool) -> int:
    if inserting and token == "-":
        return len(container)
    limit = len(container) + (1 if inserting else 0)
    if not token.isdigit() or int(token) >= limit:
        raise ApiError(422, f"the index in {path!r} is out of range")
    return int(token)


def _pointer_add(doc: Any, path: str, value: Any) -> Any:
    parts = _pointer(path)
    if not parts:
        return copy.deepcopy(value)
    container = _parent(doc, parts, path)
    if isinstance(container, dict):
        container[parts[-1]] = copy.deepcopy(value)
    elif isinstance(container, list):
        container.insert(_list_index(container, parts[-1], path, inserting=True), value)
    else:
        raise ApiError(422, f"the parent of {path!r} is not an object or a list")
    return doc


def _pointer_remove(doc: Any, path: str) -> Any:
    parts = _pointer(path)
    if not parts:
        raise ApiError(422, "cannot remove the whole document")
    container = _parent(doc, parts, path)
    _child(container, parts[-1], path)
    if isinstance(container, dict):
        del container[parts[-1]]
    else:
        del container[_list_index(container, parts[-1], path, inserting=False)]
    return doc


def _pointer_get(doc: Any, path: str) -> Any:
    found = doc
    for token in _pointer(path):
        found = _child(found, token, path)
    return found


def json_patch(doc: Any, operations: Any) -> Any:
    """RFC 6902 on a copy of `doc`: add, remove, replace, test, move and copy."""
    if not isinstance(operations, list):
        raise bad_request("a JSON patch must be a list of operations")
    doc = copy.deepcopy(doc)
    for operation in operations:
        if not isinstance(operation, dict):
            raise bad_request(f"invalid JSON patch operation {operation!r}")
        op, path = operation.get("op"), operation.get("path", "")
        if op in ("add", "replace", "test") and "value" not in operation:
            raise ApiError(422, f"{op} operation does not apply: missing value")
        if op == "add":
            doc = _pointer_add(doc, path, operation["value"])
        elif op == "remove":
            doc = _pointer_remove(doc, path)
        elif op == "replace":
            _pointer_get(doc, path)
            doc = _pointer_add(_pointer_remove(doc, path), path, operation["value"])
        elif op == "test":
            if _pointer_get(doc, path) != operation["value"]:
                raise ApiError(422, f"testing value {path} failed")
        elif op in ("move", "copy"):
            value = copy.deepcopy(_pointer_get(doc, operation.get("from", "")))
            if op == "move":
                doc = _pointer_remove(doc, operation.get("from", ""))
            doc = _pointer_add(doc, path, value)
        else:
            raise bad_request(f"unexpected JSON patch operation {op!r}")
    return doc


def apply_patch(content_type: str, current: Obj, patch: Any) -> Any:
    kind = content_type.split(";")[0].strip().lower()
    if kind == "application/json-patch+json":
        return json_patch(current, patch)
    if kind in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
        if not isinstance(patch, dict):
            raise bad_request("a merge patch must be a JSON object")
        return merge_patch(copy.deepcopy(current), patch)
    raise ApiError(
        415,
        f"the body of the request was in an unknown format - accepted media types include: "
        f"application/json-patch+json, application/merge-patch+json, "
        f'application/strategic-merge-patch+json (the stand-in has no apply for "{kind}")',
    )


# --- validation ------------------------------------------------------------------------------

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_DNS_1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_CONFIG_KEY = re.compile(r"[-._a-zA-Z0-9]+")
_DNS_LABEL_TEXT = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', "
    "and must start and end with an alphanumeric character"
)
_DNS_SUBDOMAIN_TEXT = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' "
    "or '.', and must start and end with an alphanumeric character"
)
_DNS_1035_TEXT = (
    "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with "
    "an alphabetic character, and end with an alphanumeric character"
)


def _name_causes(
    field_path: str, value: Any, kind: Literal["label", "subdomain", "1035"]
) -> list[Cause]:
    pattern, text, limit = {
        "label": (_DNS_LABEL, _DNS_LABEL_TEXT, 63),
        "subdomain": (_DNS_SUBDOMAIN, _DNS_SUBDOMAIN_TEXT, 253),
        "1035": (_DNS_1035_LABEL, _DNS_1035_TEXT, 63),
    }[kind]
    if not isinstance(value, str) or not pattern.fullmatch(value):
        return [Cause(field_path, f"Invalid value: {json.dumps(value)}: {text}")]
    if len(value) > limit:
        return [
            Cause(
                field_path,
                f"Invalid value: {json.dumps(value)}: must be no more than {limit} characters",
            )
        ]
    return []


def _qualified_name_causes(field_path: str, key: str) -> list[Cause]:
    prefix, _, name = key.rpartition("/")
    causes = []
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.fullmatch(prefix)):
        causes.append(
            Cause(
                field_path, f"Invalid value: {json.dumps(key)}: prefix part {_DNS_SUBDOMAIN_TEXT}"
            )
        )
    if len(name) > 63 or not _QUALIFIED_NAME.fullmatch(name):
        causes.append(
            Cause(
                field_path,
                f"Invalid value: {json.dumps(key)}: name part must consist of alphanumeric "
                "characters, '-', '_' or '.', must start and end with an alphanumeric character, "
                "and be no more than 63 characters",
            )
        )
    return causes


def _metadata_causes(resource: Resource, obj: Obj) -> list[Cause]:
    metadata = obj.get("metadata") or {}
    causes = _name_causes(
        "metadata.name", metadata.get("name"), "1035" if resource is SERVICE else "subdomain"
    )
    for key, value in (metadata.get("labels") or {}).items():
        causes += _qualified_name_causes("metadata.labels", key)
        if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.fullmatch(value):
            causes.append(
                Cause(
                    "metadata.labels",
                    f"Invalid value: {json.dumps(value)}: a valid label must be an empty string "
                    "or consist of alphanumeric characters, '-', '_' or '.', and must start and "
                    "end with an alphanumeric character, and be no more than 63 characters",
                )
            )
    annotations = metadata.get("annotations") or {}
    for key in annotations:
        causes += _qualified_name_causes("metadata.annotations", key)
    if len(json.dumps(annotations)) > 256 * 1024:
        causes.append(
            Cause(
                "metadata.annotations",
                "Too long: must have at most 262144 bytes",
                "FieldValueTooLong",
            )
        )
    return causes


def _unique_name_causes(field_path: str, entries: Sequence[Obj]) -> list[Cause]:
    causes: list[Cause] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        name = entry.get("name")
        causes += _name_causes(f"{field_path}[{index}].name", name, "label")
        if name in seen:
            causes.append(
                Cause(
                    f"{field_path}[{index}].name",
                    f"Duplicate value: {json.dumps(name)}",
                    "FieldValueDuplicate",
                )
            )
        seen.add(str(name))
    return causes


def _mount_causes(field_path: str, container: Obj, volumes: set[str]) -> list[Cause]:
    causes: list[Cause] = []
    seen: set[str] = set()
    for index, mount in enumerate(container.get("volumeMounts") or []):
        where = f"{field_path}.volumeMounts[{index}]"
        if mount.get("name") not in volumes:
            causes.append(
                Cause(
                    f"{where}.name",
                    f"Not found: {json.dumps(mount.get('name'))}",
                    "FieldValueNotFound",
                )
            )
        if mount.get("mountPath") in seen:
            causes.append(Cause(f"{where}.mountPath", "Invalid value: must be unique"))
        seen.add(str(mount.get("mountPath")))
        sub_path = mount.get("subPath") or ""
        if sub_path.startswith("/") or ".." in sub_path.split("/"):
            causes.append(
                Cause(
                    f"{where}.subPath",
                    f"Invalid value: {json.dumps(sub_path)}: must be a relative path without '..'",
                )
            )
    return causes


def _pod_spec_causes(field_path: str, spec: Obj) -> list[Cause]:
    volumes = spec.get("volumes") or []
    causes = _unique_name_causes(f"{field_path}.volumes", volumes)
    names = {str(volume.get("name")) for volume in volumes}
    if not spec.get("containers"):
        causes.append(Cause(f"{field_path}.containers", "Required value", "FieldValueRequired"))
    for group in ("initContainers", "containers"):
        containers = spec.get(group) or []
        causes += _unique_name_causes(f"{field_path}.{group}", containers)
        for index, container in enumerate(containers):
            causes += _mount_causes(f"{field_path}.{group}[{index}]", container, names)
    return causes


def _data_key_causes(obj: Obj) -> list[Cause]:
    causes: list[Cause] = []
    for section in ("data", "stringData", "binaryData"):
        for key in obj.get(section) or {}:
            if len(key) > 253 or not _CONFIG_KEY.fullmatch(key):
                causes.append(
                    Cause(
                        f"{section}[{key}]",
                        f"Invalid value: {json.dumps(key)}: a valid config key must consist of "
                        "alphanumeric characters, '-', '_' or '.'",
                    )
                )
    return causes


# How tests/kube_schemas.py words a refusal: the version, the object, the path and the error.
_SCHEMA_ERROR = re.compile(r"^Kubernetes (\S+): .* is invalid at (\S+): (.*)$", re.DOTALL)


def _schema_causes(obj: Obj) -> list[Cause]:
    """The project's strict schema check (every supported Kubernetes version), as a cause."""
    try:
        validate_strict(obj)
    except AssertionError as error:
        match = _SCHEMA_ERROR.match(str(error))
        if match is None:
            return [Cause("<object>", str(error))]
        version, where, message = match.groups()
        # "spec.containers.0" -> "spec.containers[0]", as the real server names fields.
        field = re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", where)
        return [
            Cause(
                "<object>" if field == "(top level)" else field, f"{message} (Kubernetes {version})"
            )
        ]
    return []


def validation_causes(resource: Resource, obj: Obj) -> list[Cause]:
    """Everything the real server would refuse in `obj` (a whole object, as sent or merged)."""
    causes = _metadata_causes(resource, obj)
    if resource is POD:
        causes += _pod_spec_causes("spec", obj.get("spec") or {})
    elif resource is JOB:
        template = (obj.get("spec") or {}).get("template") or {}
        causes += _pod_spec_causes("spec.template.spec", template.get("spec") or {})
    elif resource in (SECRET, CONFIG_MAP):
        causes += _data_key_causes(obj)
    return causes + _schema_causes(obj)


def pod_spec_change_causes(old: Obj, new: Obj) -> list[Cause]:
    """A pod's spec is immutable but for images, activeDeadlineSeconds and tolerations."""

    def mutable_parts_removed(spec: Obj) -> Obj:
        spec = copy.deepcopy(spec)
        for key in ("activeDeadlineSeconds", "tolerations"):
            spec.pop(key, None)
        for group in ("containers", "initContainers"):
            for container in spec.get(group) or []:
                container.pop("image", None)
        return spec

    if mutable_parts_removed(old.get("spec") or {}) == mutable_parts_removed(new.get("spec") or {}):
        return []
    return [
        Cause(
            "spec",
            "Forbidden: pod updates may not change fields other than `spec.containers[*].image`,"
            "`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` "
            "(only additions to existing tolerations)",
            "FieldValueForbidden",
        )
    ]


# --- defaults --------------------------------------------------------------------------------


def _image_pull_policy(image: str) -> str:
    last = image.rsplit("/", 1)[-1]
    if "@" in last:
        return "IfNotPresent"
    return "Always" if ":" not in last or last.endswith(":latest") else "IfNotPresent"


def _default_pod_spec(spec: Obj) -> None:
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("securityContext", {})
    for group in ("initContainers", "containers"):
        for container in spec.get(group) or []:
            container.setdefault("terminationMessagePath", "/dev/termination-log")
            container.setdefault("terminationMessagePolicy", "File")
            container.setdefault("imagePullPolicy", _image_pull_policy(container.get("image", "")))
            container.setdefault("resources", {})
    for volume in spec.get("volumes") or []:
        for source in ("secret", "configMap"):
            if source in volume:
                volume[source].setdefault("defaultMode", 0o644)


def qos_class(spec: Obj) -> str:
    containers = (spec.get("containers") or []) + (spec.get("initContainers") or [])
    resources = [c.get("resources") or {} for c in containers]
    compute = ("cpu", "memory")
    if not any(
        name in (r.get(part) or {})
        for r in resources
        for part in ("requests", "limits")
        for name in compute
    ):
        return "BestEffort"
    for r in resources:
        limits, requests = r.get("limits") or {}, r.get("requests") or {}
        if any(
            name not in limits or requests.get(name, limits[name]) != limits[name]
            for name in compute
        ):
            return "Burstable"
    return "Guaranteed"


class Allocator:
    """Hands out cluster IPs for services, as the real service IP allocator would."""

    def __init__(self) -> None:
        self._next = 1

    def cluster_ip(self) -> str:
        index, self._next = self._next, self._next + 1
        return f"10.96.{index // 250}.{index % 250 + 1}"


def apply_defaults(resource: Resource, obj: Obj, old: Obj | None, allocator: Allocator) -> None:
    """Fills in what the real server's defaulting would (idempotent: updates go through it)."""
    metadata = obj.setdefault("metadata", {})
    for omitted_when_empty in ("labels", "annotations", "finalizers", "ownerReferences"):
        if metadata.get(omitted_when_empty) in ({}, []):
            del metadata[omitted_when_empty]
    spec = obj.setdefault("spec", {}) if resource in (POD, PVC, SERVICE, JOB) else None
    if resource is POD and spec is not None:
        _default_pod_spec(spec)
    elif resource is JOB and spec is not None:
        spec.setdefault("backoffLimit", 6)
        spec.setdefault("completions", 1)
        spec.setdefault("parallelism", 1)
        _default_pod_spec(spec.setdefault("template", {}).setdefault("spec", {}))
    elif resource is SERVICE and spec is not None:
        spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        old_ip = (old or {}).get("spec", {}).get("clusterIP")
        spec.setdefault("clusterIP", old_ip or allocator.cluster_ip())
        spec.setdefault("clusterIPs", [spec["clusterIP"]])
        for port in spec.get("ports") or []:
            port.setdefault("protocol", "TCP")
            port.setdefault("targetPort", port.get("port"))
    elif resource is PVC and spec is not None:
        spec.setdefault("volumeMode", "Filesystem")
    elif resource is SECRET:
        obj.setdefault("type", "Opaque")
        _fold_string_data(obj)


def _fold_string_data(secret: Obj) -> None:
    """The real server stores stringData as base64 data and never returns stringData."""
    data = secret.get("data") or {}
    for key, value in data.items():
        try:
            base64.b64decode(value, validate=True)
        except (binascii.Error, TypeError) as error:
            raise bad_request(f"illegal base64 data in Secret data[{key}]") from error
    for key, value in (secret.pop("stringData", None) or {}).items():
        data[key] = base64.b64encode(str(value).encode()).decode()
    if data:
        secret["data"] = data


def initial_status(resource: Resource, obj: Obj) -> Obj | None:
    if resource is POD:
        return {"phase": "Pending", "qosClass": qos_class(obj.get("spec") or {})}
    if resource is PVC:
        return {"phase": "Pending"}
    if resource is SERVICE:
        return {"loadBalancer": {}}
    if resource is JOB:
        return {}
    return None


# --- pod status, as the kubelet writes it ----------------------------------------------------


@dataclass(frozen=True)
class Waiting:
    """A container not started yet (ContainerCreating, PodInitializing, ErrImagePull...)."""

    reason: str = "ContainerCreating"
    message: str | None = None


@dataclass(frozen=True)
class Running:
    """A started container; `started_at` defaults to when it was first seen running."""

    started_at: datetime | None = None


@dataclass(frozen=True)
class Terminated:
    """A finished container. `reason` defaults to Completed for exit 0 and Error otherwise;
    the kubelet also writes OOMKilled, DeadlineExceeded, ContainerCannotRun..."""

    exit_code: int = 0
    reason: str | None = None
    message: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None


ContainerState = Waiting | Running | Terminated
PodPhase = Literal["Pending", "Running", "Succeeded", "Failed", "Unknown"]


def default_state(phase: str, init: bool, has_init: bool) -> ContainerState:
    """What the kubelet reports for a container of a pod in `phase` when the test says no more;
    `init` for an init container, `has_init` when the pod has any."""
    if phase == "Pending":
        return Waiting("PodInitializing" if init or has_init else "ContainerCreating")
    if phase == "Running" and not init:
        return Running()
    if phase == "Failed" and not init:
        return Terminated(1)
    return Terminated(0)


def _container_id(pod_uid: str, name: str) -> str:
    return "containerd://" + hashlib.sha256(f"{pod_uid}/{name}".encode()).hexdigest()


def _state_json(state: ContainerState, previous: Obj, container_id: str, now: datetime) -> Obj:
    before = previous.get("state") or {}
    started = (before.get("running") or before.get("terminated") or {}).get("startedAt")
    if isinstance(state, Waiting):
        waiting: Obj = {"reason": state.reason}
        if state.message:
            waiting["message"] = state.message
        return {"waiting": waiting}
    if isinstance(state, Running):
        return {
            "running": {
                "startedAt": rfc3339(state.started_at)
                if state.started_at
                else started or rfc3339(now)
            }
        }
    finished = rfc3339(state.finished_at or now)
    terminated: Obj = {
        "exitCode": state.exit_code,
        "reason": state.reason or ("Completed" if state.exit_code == 0 else "Error"),
        "startedAt": rfc3339(state.started_at) if state.started_at else started or finished,
        "finishedAt": finished,
        "containerID": container_id,
    }
    if state.message:
        terminated["message"] = state.message
    return {"terminated": terminated}


def container_status(
    pod: Obj, container: Obj, state: ContainerState, previous: Obj, now: datetime
) -> Obj:
    image = container.get("image", "")
    container_id = _container_id(pod["metadata"]["uid"], container["name"])
    status: Obj = {
        "name": container["name"],
        "image": image,
        "imageID": ""
        if isinstance(state, Waiting)
        else f"{image}@sha256:" + hashlib.sha256(image.encode()).hexdigest(),
        "ready": isinstance(state, Running),
        "started": isinstance(state, Running),
        "restartCount": 0,
        "state": _state_json(state, previous, container_id, now),
        "lastState": {},
    }
    if not isinstance(state, Waiting):
        status["containerID"] = container_id
    return status


def pod_conditions(phase: str, init_done: bool, ready: bool, now: datetime) -> list[Obj]:
    stamp = rfc3339(now)

    def condition(kind: str, true: bool) -> Obj:
        return {"type": kind, "status": "True" if true else "False", "lastTransitionTime": stamp}

    return [
        condition("PodReadyToStartContainers", phase != "Pending" or init_done),
        condition("Initialized", init_done),
        condition("Ready", ready),
        condition("ContainersReady", ready),
        condition("PodScheduled", True),
    ]


# --- logs ------------------------------------------------------------------------------------


@dataclass
class LogLine:
    time: datetime
    data: bytes


def select_log_lines(lines: list[LogLine], query: Mapping[str, str]) -> list[LogLine]:
    selected = lines
    if "sinceTime" in query:
        since = _parse_time(query["sinceTime"])
        selected = [line for line in selected if line.time >= since]
    if "sinceSeconds" in query:
        since = utc_now() - timedelta(seconds=int_param(query, "sinceSeconds"))
        selected = [line for line in selected if line.time >= since]
    if "tailLines" in query:
        tail = int_param(query, "tailLines")
        selected = selected[-tail:] if tail > 0 else []
    return selected


def int_param(query: Mapping[str, str], name: str) -> int:
    try:
        return int(query[name])
    except ValueError as error:
        raise bad_request(f"invalid {name}: {query[name]!r}") from error


def is_true(query: Mapping[str, str], name: str) -> bool:
    return query.get(name, "").lower() in ("true", "1")


def pod_ip(uid: str) -> str:
    digest = hashlib.sha256(uid.encode()).digest()
    return f"10.244.{digest[0]}.{digest[1] % 254 + 1}"


def log_bytes(lines: Sequence[LogLine], stamps: bool, budget: int | None) -> bytes:
    data = b"".join(
        (rfc3339_nano(line.time).encode() + b" " if stamps else b"") + line.data for line in lines
    )
    return data if budget is None else data[: max(budget, 0)]
