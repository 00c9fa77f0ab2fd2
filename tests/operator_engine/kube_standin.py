"""A stand-in for the Kubernetes API server, for contract tests of the Kubernetes backend.

No cluster can run on these machines, so the backend's tests talk to this instead: a real HTTP
server on 127.0.0.1 that kubernetes_asyncio reaches through an ordinary kubeconfig (plain http,
a bearer token), answering as kube-apiserver 1.34 does for the few resources the backend uses.
It is a stand-in, not a fake of the backend's own code: the backend's client, serialisation,
retries and watch handling all run for real.

What it emulates:
- Namespaced pods, secrets, configmaps, persistentvolumeclaims and services (core/v1),
  networkpolicies (networking.k8s.io/v1) and jobs (batch/v1), in any namespace (namespaces
  are not objects here and need not exist).
- create (generateName, dryRun, 409 AlreadyExists), get, list (label selectors with `=`, `==`,
  `!=`, `in`, `notin`, exists, `!`; field selectors on metadata.name, metadata.namespace and a
  few per-kind fields; limit/continue), update (PUT, resourceVersion preconditions), patch
  (merge, strategic merge as a plain deep merge, JSON patch), delete (preconditions; the
  options are accepted and recorded), deletecollection, the status subresource, and watch
  (ADDED/MODIFIED/DELETED, BOOKMARK on request, replay after a resourceVersion, 410 Expired as
  an ERROR event once that version has been compacted, timeoutSeconds). Every error is a
  Status object with the reason and code the real server uses.
- Server-owned fields (uid, resourceVersion from one global counter, creationTimestamp,
  generation), the defaults a backend may read back (restartPolicy, terminationMessagePath,
  imagePullPolicy, a service's clusterIP...), a new pod's `status.phase: Pending` and qosClass,
  Secret.stringData folded into data, and on every write the status of kinds with a status
  subresource kept as stored (only /status changes it), as the real server does.
- Validation of every created or updated object in strict mode against the schemas of every
  Kubernetes version the project supports (tests/kube_schemas.py, on kubernetes-validate's
  schemas): unknown fields are refused where a real server would drop them with a warning, so
  the backend cannot rely on a field that does not exist in some version. Plus the checks the real
  server makes beyond the schema on what a backend generates: object names, label and
  annotation keys and values, container and volume names, volume mounts naming a volume,
  subPaths, Secret and ConfigMap keys, and the immutable parts of a pod's spec. A refusal is
  422 Invalid with the field and message.
- Pod logs (container, follow, timestamps, tailLines, sinceTime, sinceSeconds, limitBytes;
  400 while a container is waiting to start or the pod has no node).
- A kubelet of the test's making: `set_pod_phase` writes container states as the kubelet does,
  `on_pod` runs a script for each new pod, and `RunLocally` runs a pod's containers as local
  processes so that the project's own stage programs (`python -m pods.configure`, ...) run
  behind the backend's pods.

What it does not do: no scheduling, no controllers (a Job never creates pods; nothing
garbage-collects by owner reference), no admission beyond the validation above (no service
account token volume, no quota, no LimitRange, no PodSecurity), no authorization (one token is
all-powerful), no graceful deletion (a delete removes the object at once and emits DELETED),
no server-side apply, no strategic merge of lists by key (lists are replaced), no protobuf, and
no isolation whatsoever: `RunLocally` runs containers as this process's user on this host.

Layout: this module holds the server, its store and the control API; the rules it applies to
objects (selectors, patches, validation, defaults, pod status) are in kube_standin_api.py and
the kubelets (`run_and_exit`, `RunLocally`) in kube_standin_kubelet.py. Tests import all they
need from here."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import secrets
import shutil
import tempfile
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import structlog
from aiohttp import web

from tests.operator_engine.kube_standin_api import (
    DEADLINE_MESSAGE,
    JOB,
    NODE_NAME,
    POD,
    PVC,
    RESOURCES_BY_URL,
    Allocator,
    ApiError,
    Cause,
    ContainerState,
    LogLine,
    Obj,
    PodPhase,
    Resource,
    Running,
    Selection,
    Terminated,
    UnsupportedByStandIn,
    Waiting,
    already_exists,
    apply_defaults,
    apply_patch,
    bad_request,
    conflict,
    container_status,
    default_state,
    initial_status,
    injected_error,
    int_param,
    invalid,
    is_true,
    log_bytes,
    not_found,
    parse_field_selector,
    parse_label_selector,
    pod_conditions,
    pod_ip,
    pod_spec_change_causes,
    qos_class,
    resource_for,
    rfc3339,
    select_log_lines,
    utc_now,
    validation_causes,
)
from tests.operator_engine.kube_standin_kubelet import RunLocally, run_and_exit

__all__ = [
    "ApiError",
    "ContainerState",
    "KubeStandIn",
    "PodScript",
    "Predicate",
    "RecordedRequest",
    "RunLocally",
    "Running",
    "Terminated",
    "UnsupportedByStandIn",
    "Waiting",
    "resource_for",
    "run_and_exit",
    "validation_causes",
]

Predicate = Callable[[Obj], bool]
PodScript = Callable[["KubeStandIn", Obj], Awaitable[None]]
# How many events a watch can replay by default (the real server keeps a few minutes' worth).
DEFAULT_HISTORY = 10_000

log = structlog.get_logger(__name__)

# --- the store -------------------------------------------------------------------------------


@dataclass
class _Event:
    type: str
    resource_version: int
    resource: Resource
    obj: Obj
    old: Obj | None


@dataclass(frozen=True)
class _Drop:
    """Tells a watch to end: cleanly (EOF) or by cutting the connection."""

    abort: bool


@dataclass(frozen=True)
class RecordedRequest:
    """One HTTP call the stand-in answered. Unpacks as (method, path, query, body); the body
    is the parsed JSON (or the raw text when it was not JSON, None when empty)."""

    method: str
    path: str
    query: dict[str, str]
    body: Any
    content_type: str = ""

    def __iter__(self) -> Iterator[Any]:
        return iter((self.method, self.path, self.query, self.body))


@dataclass
class _Failure:
    verb: str
    key: str
    code: int
    times: int


@dataclass(frozen=True)
class _Target:
    resource: Resource
    namespace: str | None
    name: str | None
    subresource: str | None

    @property
    def key(self) -> str:
        plural = self.resource.plural
        return f"{plural}/{self.subresource}" if self.subresource else plural


def _parse_path(path: str) -> _Target | None:
    parts = [part for part in path.split("/") if part]
    if parts[:2] == ["api", "v1"]:
        group, version, rest = "", "v1", parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    namespace = None
    if len(rest) >= 3 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    resource = RESOURCES_BY_URL.get((group, version, rest[0])) if 1 <= len(rest) <= 3 else None
    if resource is None or (namespace is None and len(rest) > 1):
        return None
    name = rest[1] if len(rest) > 1 else None
    subresource = rest[2] if len(rest) > 2 else None
    if subresource == "status" and not resource.has_status:
        return None
    if subresource not in (None, "status") and not (resource is POD and subresource == "log"):
        return None
    return _Target(resource, namespace, name, subresource)


_VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete", "GET": "get"}


def _verb(method: str, target: _Target, query: Mapping[str, str]) -> str:
    verb = _VERBS.get(method)
    if verb is None or (target.name is None and verb in ("update", "patch")):
        raise ApiError(
            405, f"the server does not allow this method on the requested resource ({method})"
        )
    if target.name is None:
        if verb == "get":
            return "watch" if is_true(query, "watch") else "list"
        return "deletecollection" if verb == "delete" else verb
    if verb == "create":
        raise ApiError(
            405, "the server does not allow this method on the requested resource (POST)"
        )
    return verb


class KubeStandIn:
    """The stand-in API server: its HTTP side, its object store and the control API tests use
    to play the kubelet and to see and steer what the backend does.

        async with KubeStandIn() as kube:
            client = await kubernetes_asyncio.config.new_client_from_config(kube.kubeconfig_path)
    """

    def __init__(self, directory: Path | None = None, *, history: int = DEFAULT_HISTORY) -> None:
        self._own_directory = directory is None
        self.directory = (
            Path(tempfile.mkdtemp(prefix="kube-standin-")) if directory is None else directory
        )
        self.kubeconfig_path = self.directory / "kubeconfig"
        self.token = secrets.token_urlsafe(24)
        self.url = ""
        # Every HTTP call, in order, so tests can assert what the backend sent.
        self.requests: list[RecordedRequest] = []
        self._objects: dict[tuple[str, str, str], Obj] = {}
        self._resource_version = 0
        self._history: deque[_Event] = deque(maxlen=history)
        self._compacted = 0
        self._watches: set[asyncio.Queue[_Event | _Drop]] = set()
        self._logs: dict[tuple[str, str], list[LogLine]] = {}
        self._changed = asyncio.Event()
        self._closing = False
        self._failures: list[_Failure] = []
        self._scripts: list[tuple[Predicate, PodScript]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.script_errors: list[Exception] = []
        self._allocator = Allocator()
        self._runner: web.AppRunner | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        app = web.Application(client_max_size=16 << 20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # Cancelled with their client, so a watch the backend drops does not linger.
        self._runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        self._write_kubeconfig()

    def _write_kubeconfig(self) -> None:
        # JSON is YAML: the client's kubeconfig loader reads it as is.
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "kube-standin", "cluster": {"server": self.url}}],
            "users": [{"name": "kube-standin", "user": {"token": self.token}}],
            "contexts": [
                {
                    "name": "kube-standin",
                    "context": {
                        "cluster": "kube-standin",
                        "user": "kube-standin",
                        "namespace": "default",
                    },
                }
            ],
            "current-context": "kube-standin",
        }
        self.kubeconfig_path.write_text(json.dumps(config, indent=2))
        self.kubeconfig_path.chmod(0o600)

    async def close(self) -> None:
        """Ends every stream, cancels the kubelet scripts and stops the server."""
        self._closing = True
        self.drop_watches()
        self._notify()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._own_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    async def __aenter__(self) -> KubeStandIn:
        await self.start()
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
        if error is None and self.script_errors:
            raise ExceptionGroup(
                "a kubelet script of the kube stand-in failed", list(self.script_errors)
            )

    # -- store -------------------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _commit(self, kind: str, resource: Resource, obj: Obj, old: Obj | None) -> Obj:
        self._resource_version += 1
        metadata = obj["metadata"]
        metadata["resourceVersion"] = str(self._resource_version)
        key = (resource.plural, metadata["namespace"], metadata["name"])
        if kind == "DELETED":
            self._objects.pop(key, None)
            self._logs = {k: v for k, v in self._logs.items() if k[0] != metadata["uid"]}
        else:
            self._objects[key] = obj
        event = _Event(kind, self._resource_version, resource, copy.deepcopy(obj), old)
        if self._history.maxlen is not None and len(self._history) == self._history.maxlen:
            self._compacted = self._history[0].resource_version
        self._history.append(event)
        for queue in self._watches:
            queue.put_nowait(event)
        if kind == "ADDED" and resource is POD:
            self._start_script(copy.deepcopy(obj))
        self._notify()
        return copy.deepcopy(obj)

    def _stored(self, resource: Resource, namespace: str, name: str) -> Obj | None:
        return self._objects.get((resource.plural, namespace, name))

    def _select(self, selection: Selection) -> list[Obj]:
        found = [
            obj
            for (plural, _, _), obj in sorted(self._objects.items())
            if plural == selection.resource.plural and selection.matches(obj)
        ]
        return [copy.deepcopy(obj) for obj in found]

    def _new_object(self, resource: Resource, namespace: str, body: Obj, *, dry_run: bool) -> Obj:
        obj = copy.deepcopy(body)
        metadata = obj.setdefault("metadata", {})
        if not metadata.get("name") and metadata.get("generateName"):
            metadata["name"] = self._generate_name(resource, namespace, metadata["generateName"])
        if not metadata.get("name"):
            raise invalid(
                resource,
                "",
                [
                    Cause(
                        "metadata.name",
                        "Required value: name or generateName is required",
                        "FieldValueRequired",
                    )
                ],
            )
        if causes := validation_causes(resource, obj):
            raise invalid(resource, metadata["name"], causes)
        if self._stored(resource, namespace, metadata["name"]) is not None:
            raise already_exists(resource, metadata["name"])
        apply_defaults(resource, obj, None, self._allocator)
        for server_owned in (
            "resourceVersion",
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "managedFields",
        ):
            metadata.pop(server_owned, None)
        metadata.update(
            namespace=namespace, uid=str(uuid.uuid4()), creationTimestamp=rfc3339(utc_now())
        )
        if resource in (POD, JOB):
            metadata["generation"] = 1
        status = initial_status(resource, obj)
        if resource.has_status:
            obj["status"] = status
        if dry_run:
            metadata["resourceVersion"] = str(self._resource_version)
            return obj
        return self._commit("ADDED", resource, obj, None)

    def _generate_name(self, resource: Resource, namespace: str, prefix: str) -> str:
        alphabet = "bcdfghjklmnpqrstvwxz2456789"
        while True:
            name = prefix + "".join(secrets.choice(alphabet) for _ in range(5))
            if self._stored(resource, namespace, name) is None:
                return name

    def _update(self, target: _Target, old: Obj, candidate: Obj, *, dry_run: bool) -> Obj:
        resource, name = target.resource, old["metadata"]["name"]
        wanted_version = (candidate.get("metadata") or {}).get("resourceVersion")
        if wanted_version and wanted_version != old["metadata"]["resourceVersion"]:
            raise conflict(
                resource,
                name,
                "the object has been modified; please apply your changes to the latest version "
                "and try again",
            )
        if target.subresource == "status":
            new = copy.deepcopy(old)
            new["status"] = copy.deepcopy(candidate.get("status"))
        else:
            new = copy.deepcopy(candidate)
            metadata = new.setdefault("metadata", {})
            for owned in (
                "uid",
                "creationTimestamp",
                "generation",
                "namespace",
                "deletionTimestamp",
            ):
                if owned in old["metadata"]:
                    metadata[owned] = old["metadata"][owned]
            if resource.has_status:
                new["status"] = copy.deepcopy(old.get("status"))
            apply_defaults(resource, new, old, self._allocator)
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        causes = validation_causes(resource, new)
        if resource is POD and target.subresource is None:
            causes += pod_spec_change_causes(old, new)
        if causes:
            raise invalid(resource, name, causes)
        if new == old or dry_run:
            return copy.deepcopy(new)
        if "generation" in new["metadata"] and new.get("spec") != old.get("spec"):
            new["metadata"]["generation"] += 1
        return self._commit("MODIFIED", resource, new, copy.deepcopy(old))

    def _delete(self, resource: Resource, old: Obj, grace: int | None) -> Obj:
        deleted = copy.deepcopy(old)
        deleted["metadata"]["deletionTimestamp"] = rfc3339(utc_now())
        if resource is POD:
            default = (old.get("spec") or {}).get("terminationGracePeriodSeconds", 30)
            deleted["metadata"]["deletionGracePeriodSeconds"] = default if grace is None else grace
        return self._commit("DELETED", resource, deleted, copy.deepcopy(old))

    # -- HTTP --------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode(errors="replace")
        query = {key: request.query[key] for key in request.query}
        self.requests.append(
            RecordedRequest(
                request.method, request.path, query, body, request.headers.get("Content-Type", "")
            )
        )
        try:
            if request.headers.get("Authorization") != f"Bearer {self.token}":
                raise ApiError(401, "Unauthorized")
            return await self._route(request, query, body, raw)
        except ApiError as error:
            return error.response()

    async def _route(
        self, request: web.Request, query: dict[str, str], body: Any, raw: bytes
    ) -> web.StreamResponse:
        if request.path.rstrip("/") in ("/healthz", "/readyz", "/livez"):
            return web.Response(text="ok")
        if request.path.rstrip("/") == "/version":
            return web.json_response(
                {
                    "major": "1",
                    "minor": "34",
                    "gitVersion": "v1.34.0-kube-standin",
                    "gitCommit": "0" * 40,
                    "gitTreeState": "clean",
                    "buildDate": "2025-08-27T00:00:00Z",
                    "goVersion": "go1.24.6",
                    "compiler": "gc",
                    "platform": "linux/amd64",
                }
            )
        target = _parse_path(request.path)
        if target is None:
            raise ApiError(404, "the server could not find the requested resource")
        verb = _verb(request.method, target, query)
        expire = self._inject(verb, target)
        if raw and not isinstance(body, dict | list):
            raise bad_request("the body of the request is not valid JSON")
        if target.subresource == "log":
            if verb != "get":
                raise ApiError(
                    405, "the server does not allow this method on the requested resource"
                )
            return await self._logs_response(request, target, query)
        handler = {
            "create": self._create,
            "get": self._get,
            "list": self._list,
            "update": self._replace,
            "patch": self._patch,
            "delete": self._delete_one,
            "deletecollection": self._delete_collection,
        }.get(verb)
        if handler is None:
            return await self._watch(request, target, query, expire=expire)
        return await handler(request, target, query, body)

    def _inject(self, verb: str, target: _Target) -> bool:
        """Raises the failure `fail_next` asked for, if any; True for a watch to expire."""
        for failure in self._failures:
            if failure.verb == verb and failure.key == target.key:
                failure.times -= 1
                if failure.times <= 0:
                    self._failures.remove(failure)
                # A watch learns of an expired version through an ERROR event, not a status.
                if verb == "watch" and failure.code == 410:
                    return True
                log.info(
                    "kube_standin.injected_failure",
                    verb=verb,
                    resource=target.key,
                    code=failure.code,
                )
                raise injected_error(failure.code, verb, target.key, target.namespace)
        return False

    def _body_object(self, target: _Target, body: Any) -> Obj:
        if not isinstance(body, dict):
            raise bad_request(f"the body of the request must be a {target.resource.kind} object")
        # The recorded request keeps the body as sent.
        body = copy.deepcopy(body)
        resource = target.resource
        body.setdefault("apiVersion", resource.api_version)
        body.setdefault("kind", resource.kind)
        if body["apiVersion"] != resource.api_version or body["kind"] != resource.kind:
            what, sent, expected = (
                ("API version", body["apiVersion"], resource.api_version)
                if body["apiVersion"] != resource.api_version
                else ("kind", body["kind"], resource.kind)
            )
            raise bad_request(
                f"the {what} in the data ({sent}) does not match the expected {what} ({expected})"
            )
        metadata = body.setdefault("metadata", {})
        if not isinstance(metadata, dict):
            raise bad_request("metadata must be an object")
        if metadata.get("namespace") not in (None, "", target.namespace):
            raise bad_request(
                "the namespace of the provided object does not match the namespace sent on the "
                "request"
            )
        if target.name is not None and metadata.setdefault("name", target.name) != target.name:
            raise bad_request(
                f"the name of the object ({metadata['name']}) does not match the name on the URL "
                f"({target.name})"
            )
        checked: Obj = body
        return checked

    def _existing(self, target: _Target) -> Obj:
        assert target.namespace is not None and target.name is not None
        obj = self._stored(target.resource, target.namespace, target.name)
        if obj is None:
            raise not_found(target.resource, target.name)
        return copy.deepcopy(obj)

    async def _create(
        self, request: web.Request, target: _Target, query: dict[str, str], body: Any
    ) -> web.StreamResponse:
        if target.namespace is None or target.subresource is not None:
            raise ApiError(405, "the server does not allow this method on the requested resource")
        obj = self._new_object(
            target.resource,
            target.namespace,
            self._body_object(target, body),
            dry_run=query.get("dryRun") == "All",
        )
        return web.json_response(obj, status=201)

    async def _get(
        self, request: web.Request, target: _Target, query: dict[str, str], body: Any
    ) -> web.StreamResponse:
        return web.json_response(self._existing(target))

    def _filter(self, target: _Target, query: Mapping[str, str]) -> Selection:
        return Selection(
            target.resource,
            target.namespace,
            tuple(parse_label_selector(query.get("labelSelector", ""))),
            tuple(parse_field_selector(query.get("fieldSelector", ""), target.resource)),
        )

    async def _list(
        self, request: web.Request, target: _Target, query: dict[str, str], body: Any
    ) -> web.StreamResponse:
        items = self._select(self._filter(target, query))
        metadata: Obj = {"resourceVersion": str(self._resource_version)}
        if token := query.get("continue"):
            try:
                after = tuple(json.loads(base64.urlsafe_b64decode(token)))
            except ValueError as error:
                raise bad_request("invalid continue token") from error
            items = [
                obj
                for obj in items
                if (obj["metadata"]["namespace"], obj["metadata"]["name"]) > after
            ]
        limit = int_param(query, "limit") if query.get("limit") else 0
        if 0 < limit < len(items):
            last = items[limit - 1]["metadata"]
            metadata["continue"] = base64.urlsafe_b64encode(
                json.dumps([last["namespace"], last["name"]]).encode()
            ).decode()
            metadata["remainingItemCount"] = len(items) - limit
            items = items[:limit]
        for item in items:
            # Items of a typed list carry no kind or apiVersion on a real server either.
            item.pop("kind", None)
            item.pop("apiVersion", None)
        resource = target.resource
        return web.json_response(
            {
                "kind": f"{resource.kind}List",
                "apiVersion": resource.api_version,
                "metadata": metadata,
                "items": items,
            }
        )

    async def _replace(
        self, request: web.Request, target: _Target, query: dict[str, str], body: Any
    ) -> web.StreamResponse:
        old = self._existing(target)
        candidate = self._body_object(target, body)
        return web.json_response(
            self._update(target, old, candidate, dry_run=query.get("dryRun") == "All")
        )

    async def _patch(
        self, request: web.Request, target: _Target, query: dict[str, str], body: Any
    ) -> web.StreamResponse:
        old = self._existing(target)
        patched = apply_patch(request.headers.get("Content-Type", ""), old, body)
        if not isinstance(patched, dict):
            raise ApiError(422, "the patch turned the object into something that is not an object")
        candidate = self._body_object(target, patched)
        if candidate["metadata"].get("resourceVersion") == old["metadata"]["resourceVersion"]:
            # Unchanged by the patch: no precondition was asked for.
            candidate["metadata"].pop("resourceVersion")
        return web.json_response(
            self._update(target, old, candidate, dry_run=query.get("dryRun") == "All")
        )

    def _delete_options(self, query: Mapping[str, str], body: Any) -> tuple[int | None, Obj]:
        options = body if isinstance(body, dict) else {}
        policy = query.get("propagationPolicy", options.get("propagationPolicy"))
        if policy not in (None, "Orphan", "Background", "Foreground"):
            raise bad_request(
                f'Unsupported value: "{policy}": supported values: "Foreground", "Background", '
                '"Orphan"'
            )
        grace: Any = query.get("gracePeriodSeconds", options.get("gracePeriodSeconds"))
        try:
            grace = None if grace is None else int(grace)
        except ValueError as error:
            raise bad_request(f"invalid gracePeriodSeconds: {grace!r}") from error
        return grace, options.get("preconditions") or {}

    async def _delete_one(
        self, request: web.Request, target: _Target, query: dict[str, str], body: Any
    ) -> web.StreamResponse:
        old = self._existing(target)
        grace, preconditions = self._delete_options(query, body)
        metadata, resource = old["metadata"], target.resource
        for field_name, wanted in preconditions.items():
            if wanted and metadata.get(field_name) != wanted:
                label = "UID" if field_name == "uid" else "ResourceVersion"
                raise conflict(
                    resource,
                    metadata["name"],
                    f"Precondition failed: {label} in precondition: {wanted}, {label} in object "
                    f"meta: {metadata.get(field_name)}",
                )
        deleted = self._delete(resource, old, grace)
        if resource.delete_returns_object:
            return web.json_response(deleted)
        return web.json_response(self._success(resource, deleted))

    @staticmethod
    def _success(resource: Resource, deleted: Obj) -> Obj:
        details = resource.details(deleted["metadata"]["name"])
        details["uid"] = deleted["metadata"]["uid"]
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": details,
        }

    async def _delete_collection(
        self, request: web.Request, target: _Target, query: dict[str, str], body: Any
    ) -> web.StreamResponse:
        grace, _ = self._delete_options(query, body)
        for obj in self._select(self._filter(target, query)):
            self._delete(target.resource, obj, grace)
        return web.json_response(
            {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}
        )

    # -- watch -------------------------------------------------------------------------------

    @staticmethod
    def _as_seen(event: _Event, selection: Selection) -> tuple[str, Obj] | None:
        """The event as a watch with `selection` sees it: an object leaving the selection is
        DELETED for it, one entering it ADDED."""
        now = selection.matches(event.obj)
        before = event.old is not None and selection.matches(event.old)
        if event.type == "MODIFIED":
            kind = {(True, True): "MODIFIED", (True, False): "ADDED", (False, True): "DELETED"}.get(
                (now, before)
            )
            return (kind, event.obj) if kind else None
        return (event.type, event.obj) if now else None

    def _initial_events(
        self, selection: Selection, version: str, expire: bool
    ) -> list[tuple[str, Obj]]:
        if expire or (version not in ("", "0") and int(version) < self._compacted):
            status = ApiError(
                410, f"too old resource version: {version or 0} ({self._compacted + 1})"
            ).status()
            return [("ERROR", status)]
        if version in ("", "0"):
            return [("ADDED", obj) for obj in self._select(selection)]
        since = int(version)
        replay = (
            self._as_seen(e, selection)
            for e in self._history
            if e.resource_version > since and e.resource is selection.resource
        )
        return [seen for seen in replay if seen is not None]

    async def _watch(
        self, request: web.Request, target: _Target, query: dict[str, str], *, expire: bool
    ) -> web.StreamResponse:
        selection = self._filter(target, query)
        # Absent or 0: the server's own choice, which here is never.
        timeout = int_param(query, "timeoutSeconds") if query.get("timeoutSeconds") else None
        timeout = timeout or None
        version = query.get("resourceVersion", "")
        if version and not version.isdigit():
            raise bad_request(f"invalid resourceVersion {version!r}")
        # The snapshot and the subscription happen with no await between: nothing is missed.
        initial = self._initial_events(selection, version, expire)
        queue: asyncio.Queue[_Event | _Drop] = asyncio.Queue()
        expired = bool(initial) and initial[0][0] == "ERROR"
        if not expired and not self._closing:
            self._watches.add(queue)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        try:
            await response.prepare(request)
            for kind, obj in initial:
                await _write_event(response, kind, obj)
            if expired or self._closing:
                return response
            if is_true(query, "allowWatchBookmarks"):
                await _write_event(response, "BOOKMARK", self._bookmark(target.resource))
            await self._stream_events(request, response, queue, selection, timeout)
        finally:
            self._watches.discard(queue)
        return response

    def _bookmark(self, resource: Resource) -> Obj:
        return {
            "kind": resource.kind,
            "apiVersion": resource.api_version,
            "metadata": {"resourceVersion": str(self._resource_version)},
        }

    async def _stream_events(
        self,
        request: web.Request,
        response: web.StreamResponse,
        queue: asyncio.Queue[_Event | _Drop],
        selection: Selection,
        timeout: int | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            remaining = None if deadline is None else deadline - loop.time()
            try:
                item = await asyncio.wait_for(queue.get(), remaining)
            except TimeoutError:
                return
            if isinstance(item, _Drop):
                if item.abort and request.transport is not None:
                    request.transport.abort()
                return
            if item.resource is selection.resource and (seen := self._as_seen(item, selection)):
                await _write_event(response, *seen)

    # -- logs --------------------------------------------------------------------------------

    def _log_container(self, pod: Obj, query: Mapping[str, str]) -> Obj:
        spec, name = pod.get("spec") or {}, pod["metadata"]["name"]
        containers = spec.get("containers") or []
        everything = (spec.get("initContainers") or []) + containers
        wanted = query.get("container")
        if not wanted:
            if len(containers) != 1:
                choices = " ".join(c["name"] for c in containers)
                raise bad_request(
                    f"a container name must be specified for pod {name}, choose one of: [{choices}]"
                )
            return dict(containers[0])
        for container in everything:
            if container["name"] == wanted:
                return dict(container)
        raise bad_request(f"container {wanted} is not valid for pod {name}")

    @staticmethod
    def _container_state(pod: Obj, container: str) -> Obj | None:
        status = pod.get("status") or {}
        for entry in (status.get("initContainerStatuses") or []) + (
            status.get("containerStatuses") or []
        ):
            if entry.get("name") == container:
                state: Obj = entry.get("state") or {}
                return state
        return None

    def _log_ended(self, namespace: str, name: str, uid: str, container: str) -> bool:
        pod = self._stored(POD, namespace, name)
        if self._closing or pod is None or pod["metadata"]["uid"] != uid:
            return True
        state = self._container_state(pod, container) or {}
        return "terminated" in state or (pod.get("status") or {}).get("phase") in (
            "Succeeded",
            "Failed",
        )

    async def _logs_response(
        self, request: web.Request, target: _Target, query: dict[str, str]
    ) -> web.StreamResponse:
        pod = self._existing(target)
        name, uid = pod["metadata"]["name"], pod["metadata"]["uid"]
        container = self._log_container(pod, query)["name"]
        if is_true(query, "previous"):
            raise bad_request(
                f'previous terminated container "{container}" in pod "{name}" not found'
            )
        if not (pod.get("spec") or {}).get("nodeName"):
            raise bad_request(f"pod {name} does not have a host assigned")
        state = self._container_state(pod, container) or {
            "waiting": {"reason": "ContainerCreating"}
        }
        if "waiting" in state:
            reason = state["waiting"].get("reason", "ContainerCreating")
            raise bad_request(
                f'container "{container}" in pod "{name}" is waiting to start: {reason}'
            )
        lines = self._logs.setdefault((uid, container), [])
        budget = int_param(query, "limitBytes") if query.get("limitBytes") else None
        stamps = is_true(query, "timestamps")
        first = select_log_lines(lines, query)
        if not is_true(query, "follow"):
            return web.Response(body=log_bytes(first, stamps, budget), content_type="text/plain")
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        await self._follow(response, target, uid, container, stamps, budget, first, len(lines))
        return response

    async def _follow(
        self,
        response: web.StreamResponse,
        target: _Target,
        uid: str,
        container: str,
        stamps: bool,
        budget: int | None,
        first: list[LogLine],
        sent: int,
    ) -> None:
        assert target.namespace is not None and target.name is not None
        pending = first
        while True:
            changed = self._changed
            data = log_bytes(pending, stamps, budget)
            if data:
                await response.write(data)
                if budget is not None:
                    budget -= len(data)
                    if budget <= 0:
                        return
            lines = self._logs.get((uid, container), [])
            if sent < len(lines):
                pending, sent = lines[sent:], len(lines)
                continue
            if self._log_ended(target.namespace, target.name, uid, container):
                return
            await changed.wait()
            pending = []

    # -- the control API ---------------------------------------------------------------------

    def objects(
        self, kind: str, namespace: str | None = None, label_selector: str | None = None
    ) -> list[Obj]:
        """Copies of the stored objects of `kind` (all namespaces when None), sorted by name."""
        selection = Selection(
            resource_for(kind), namespace, tuple(parse_label_selector(label_selector or ""))
        )
        return self._select(selection)

    def get(self, kind: str, namespace: str, name: str) -> Obj | None:
        found = self._stored(resource_for(kind), namespace, name)
        return copy.deepcopy(found) if found is not None else None

    def add(self, obj: Obj, namespace: str = "default") -> Obj:
        """Creates `obj` as a POST would (validated, defaulted), without a recorded request:
        for what exists before the backend runs."""
        resource = resource_for(obj.get("kind", ""))
        target = _Target(
            resource, obj.get("metadata", {}).get("namespace") or namespace, None, None
        )
        assert target.namespace is not None
        return self._new_object(
            resource, target.namespace, self._body_object(target, copy.deepcopy(obj)), dry_run=False
        )

    def set_pod_phase(
        self,
        namespace: str,
        name: str,
        phase: PodPhase,
        *,
        container_states: Mapping[str, ContainerState] | None = None,
        reason: str | None = None,
        message: str | None = None,
    ) -> Obj:
        """Writes the pod's status as the kubelet would for `phase`: the pod is bound to the
        stand-in's node, and each container (init containers too) gets `container_states[name]`
        or the phase's usual state (Pending: waiting; Running: running, init containers
        terminated with 0; Succeeded: terminated with 0; Failed: terminated with 1, reason
        Error). `reason`/`message` are the pod-level ones, e.g. DeadlineExceeded."""
        pod = self._stored(POD, namespace, name)
        if pod is None:
            raise LookupError(f"no pod {namespace}/{name}")
        old, pod = pod, copy.deepcopy(pod)
        spec, now = pod["spec"], utc_now()
        states = dict(container_states or {})
        known = {c["name"] for c in (spec.get("initContainers") or []) + spec["containers"]}
        if unknown := set(states) - known:
            raise ValueError(f"pod {name} has no container {sorted(unknown)}")
        previous_status = old.get("status") or {}
        previous = {
            entry["name"]: entry
            for entry in (previous_status.get("initContainerStatuses") or [])
            + (previous_status.get("containerStatuses") or [])
        }

        def statuses(group: str, init: bool) -> list[Obj]:
            result = []
            for container in spec.get(group) or []:
                before = previous.get(container["name"], {})
                state = states.get(container["name"]) or default_state(
                    phase, init, bool(spec.get("initContainers"))
                )
                result.append(container_status(pod, container, state, before, now))
            return result

        spec["nodeName"] = NODE_NAME
        init_statuses, main_statuses = (
            statuses("initContainers", True),
            statuses("containers", False),
        )
        init_done = all(
            "terminated" in s["state"] and s["state"]["terminated"]["exitCode"] == 0
            for s in init_statuses
        )
        ready = bool(main_statuses) and all(s["ready"] for s in main_statuses)
        status: Obj = {
            "phase": phase,
            "conditions": pod_conditions(phase, init_done, ready, now),
            "hostIP": "10.0.0.1",
            "hostIPs": [{"ip": "10.0.0.1"}],
            "podIP": pod_ip(pod["metadata"]["uid"]),
            "podIPs": [{"ip": pod_ip(pod["metadata"]["uid"])}],
            "startTime": previous_status.get("startTime") or rfc3339(now),
            "qosClass": previous_status.get("qosClass") or qos_class(spec),
            "containerStatuses": main_statuses,
        }
        if init_statuses:
            status["initContainerStatuses"] = init_statuses
        if reason:
            status["reason"] = reason
        if message:
            status["message"] = message
        pod["status"] = status
        return self._commit("MODIFIED", POD, pod, copy.deepcopy(old))

    def deadline_exceeded(self, namespace: str, name: str) -> Obj:
        """What the kubelet writes when activeDeadlineSeconds ran out: every running container
        killed (exit 137), the pod Failed with reason DeadlineExceeded."""
        pod = self.get("pods", namespace, name)
        if pod is None:
            raise LookupError(f"no pod {namespace}/{name}")
        states: dict[str, ContainerState] = {}
        for container in pod["spec"]["containers"]:
            state = self._container_state(pod, container["name"]) or {}
            if "terminated" not in state:
                states[container["name"]] = Terminated(137, "Error")
        return self.set_pod_phase(
            namespace,
            name,
            "Failed",
            container_states=states,
            reason="DeadlineExceeded",
            message=DEADLINE_MESSAGE,
        )

    def bind_claim(self, namespace: str, name: str) -> Obj:
        """Marks a PersistentVolumeClaim Bound, as a provisioner would."""
        claim = self._stored(PVC, namespace, name)
        if claim is None:
            raise LookupError(f"no persistentvolumeclaim {namespace}/{name}")
        if (claim.get("status") or {}).get("phase") == "Bound":
            return copy.deepcopy(claim)
        old, claim = claim, copy.deepcopy(claim)
        spec = claim["spec"]
        spec.setdefault("volumeName", f"pvc-{claim['metadata']['uid']}")
        requested = ((spec.get("resources") or {}).get("requests") or {}).get("storage", "1Gi")
        claim["status"] = {
            "phase": "Bound",
            "accessModes": spec.get("accessModes", ["ReadWriteOnce"]),
            "capacity": {"storage": requested},
        }
        return self._commit("MODIFIED", PVC, claim, copy.deepcopy(old))

    def append_log(
        self, namespace: str, pod: str, data: str | bytes, container: str | None = None
    ) -> None:
        """Adds `data` to a container's log (the pod's first container by default), one entry
        per line, stamped now; followers see it at once."""
        stored = self._stored(POD, namespace, pod)
        if stored is None:
            raise LookupError(f"no pod {namespace}/{pod}")
        name = container or stored["spec"]["containers"][0]["name"]
        self.append_log_of(
            stored["metadata"]["uid"], name, data.encode() if isinstance(data, str) else data
        )

    def append_log_of(self, uid: str, container: str, data: bytes) -> None:
        """Adds to the log of the pod with `uid`: nothing once that pod is gone, even when
        another of the same name took its place."""
        if not any(
            obj["metadata"]["uid"] == uid
            for (plural, _, _), obj in self._objects.items()
            if plural == "pods"
        ):
            return
        now = utc_now()
        lines = self._logs.setdefault((uid, container), [])
        lines.extend(LogLine(now, line) for line in data.splitlines(keepends=True))
        self._notify()

    def log(self, namespace: str, pod: str, container: str | None = None) -> str:
        """A container's whole log as written so far."""
        stored = self._stored(POD, namespace, pod)
        if stored is None:
            raise LookupError(f"no pod {namespace}/{pod}")
        name = container or stored["spec"]["containers"][0]["name"]
        return b"".join(
            line.data for line in self._logs.get((stored["metadata"]["uid"], name), [])
        ).decode(errors="replace")

    async def wait_for(
        self,
        kind: str,
        namespace: str | None,
        predicate: Predicate | None = None,
        timeout: float | None = 5.0,
    ) -> Obj:
        """The first object of `kind` in `namespace` matching `predicate`, as soon as one does."""
        selection = Selection(resource_for(kind), namespace)

        async def first_match() -> Obj:
            while True:
                changed = self._changed
                for obj in self._select(selection):
                    if predicate is None or predicate(obj):
                        return obj
                if self._closing:
                    raise LookupError("the kube stand-in closed")
                await changed.wait()

        try:
            return await asyncio.wait_for(first_match(), timeout)
        except TimeoutError:
            raise TimeoutError(f"no {kind} in {namespace} matched within {timeout} s") from None

    async def wait_gone(self, kind: str, namespace: str, name: str, uid: str | None = None) -> None:
        """Returns once the object (that very one, when `uid` is given) no longer exists."""
        resource = resource_for(kind)
        while True:
            changed = self._changed
            obj = self._stored(resource, namespace, name)
            if obj is None or (uid is not None and obj["metadata"]["uid"] != uid) or self._closing:
                return
            await changed.wait()

    def fail_next(self, verb: str, kind: str, status_code: int, *, times: int = 1) -> None:
        """The next `times` requests with this verb (create, get, list, watch, update or
        replace, patch, delete, deletecollection) on this kind ("pods", "Pod", "pods/log",
        "pods/status") fail with `status_code` and the Status the real server would send
        (429 with Retry-After). A watch told 410 gets its ERROR event in the stream instead."""
        plural, _, sub = kind.partition("/")
        key = resource_for(plural).plural + (f"/{sub}" if sub else "")
        self._failures.append(
            _Failure("update" if verb == "replace" else verb, key, status_code, times)
        )

    def drop_watches(self, *, abort: bool = False) -> None:
        """Ends every open watch: cleanly (as the server does on its own timeout) or, with
        `abort`, by cutting the connection mid-stream."""
        for queue in self._watches:
            queue.put_nowait(_Drop(abort))

    def compact(self) -> None:
        """Forgets every event so far, as etcd compaction does: a watch from any version before
        now gets 410 Expired."""
        self._compacted = self._resource_version
        self._history.clear()

    @property
    def resource_version(self) -> int:
        return self._resource_version

    def on_pod(self, predicate: Predicate, script: PodScript) -> None:
        """Runs `script(standin, pod)` for each new pod matching `predicate` (the first
        registered match wins). A script that raises fails the test when the stand-in closes."""
        self._scripts.append((predicate, script))

    def _start_script(self, pod: Obj) -> None:
        for predicate, script in self._scripts:
            try:
                matches = predicate(pod)
            except Exception as error:
                # The backend's create must not fail for the test's mistake; the test will.
                self.script_errors.append(error)
                continue
            if matches:
                task = asyncio.get_running_loop().create_task(self._run_script(script, pod))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                return

    async def _run_script(self, script: PodScript, pod: Obj) -> None:
        try:
            await script(self, pod)
        except Exception as error:
            log.error("kube_standin.script_failed", pod=pod["metadata"]["name"], error=repr(error))
            self.script_errors.append(error)


async def _write_event(response: web.StreamResponse, kind: str, obj: Obj) -> None:
    await response.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")
