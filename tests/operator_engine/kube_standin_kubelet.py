"""Kubelets for the Kubernetes API stand-in (kube_standin.py): scripts for `on_pod` that
drive a pod's status and log, from a canned run (`run_and_exit`) to a real one (`RunLocally`,
which runs the containers' commands as local processes)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tests.operator_engine.kube_standin_api import (
    DEADLINE_MESSAGE,
    NODE_NAME,
    ContainerState,
    Obj,
    PodPhase,
    Running,
    Terminated,
    UnsupportedByStandIn,
    Waiting,
    pod_ip,
    resource_for,
    utc_now,
)

if TYPE_CHECKING:
    from tests.operator_engine.kube_standin import KubeStandIn, PodScript

# The kubelet caps a termination message at 4096 bytes, and a message taken from the log
# (FallbackToLogsOnError) at 80 lines or 2048 bytes.
MAX_TERMINATION_MESSAGE = 4096
FALLBACK_LOG_LINES = 80
FALLBACK_LOG_BYTES = 2048

# --- scripted kubelets -----------------------------------------------------------------------


def run_and_exit(
    log_lines: Sequence[str] = (),
    *,
    exit_code: int = 0,
    reason: str | None = None,
    message: str | None = None,
    delay: float = 0.0,
) -> PodScript:
    """A script for `on_pod`: the pod starts, its first container writes `log_lines` (`delay`
    seconds apart), then every container ends with `exit_code` (the pod Succeeded for 0, Failed
    otherwise). A pod deleted meanwhile just stops, as on a node."""

    async def script(kube: KubeStandIn, pod: Obj) -> None:
        namespace, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        with contextlib.suppress(LookupError):
            kube.set_pod_phase(namespace, name, "Running")
            for line in log_lines:
                kube.append_log(namespace, name, line if line.endswith("\n") else line + "\n")
                if delay:
                    await asyncio.sleep(delay)
            ended = Terminated(exit_code, reason, message)
            states = {c["name"]: ended for c in pod["spec"]["containers"]}
            phase: PodPhase = "Succeeded" if exit_code == 0 else "Failed"
            kube.set_pod_phase(namespace, name, phase, container_states=states)

    return script


class _PathMapper:
    """Rewrites container paths (mount points, the termination message file) in arguments and
    environment values to where they are on this host: the local stand-in for mounts."""

    def __init__(self, mounts: Sequence[tuple[str, Path]]) -> None:
        ordered = sorted(mounts, key=lambda mount: len(mount[0]), reverse=True)
        self._hosts = {path.rstrip("/") or "/": str(host) for path, host in ordered}
        alternatives = "|".join(re.escape(path.rstrip("/") or "/") for path, _ in ordered)
        # A path starts an argument, or follows "=", ":", ",", a quote, white space or
        # "file://"; it ends at "/" or at a character no path name would hold there.
        self._pattern = (
            re.compile(rf"(?:^|(?<=[=:,'\"\s])|(?<=file://))({alternatives})(?=/|$|[^\w.\-])")
            if ordered
            else None
        )

    def map(self, text: str) -> str:
        if self._pattern is None:
            return text
        return self._pattern.sub(lambda match: self._hosts[match[1]], text)


_EXPANSION = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.\-]*)\)")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion in command, args and env values: `$$` is a `$`, an
    unknown reference stays as written."""

    def replace(match: re.Match[str]) -> str:
        if match[0] == "$$":
            return "$"
        return env.get(match[1], match[0])

    return _EXPANSION.sub(replace, text)


def _fingerprint(path: Path) -> dict[str, tuple[int, int, int]]:
    """Size, mtime and mode of everything under `path`, links not followed."""
    found: dict[str, tuple[int, int, int]] = {}
    if not path.exists():
        return found
    entries = [path] + (sorted(path.rglob("*")) if path.is_dir() and not path.is_symlink() else [])
    for entry in entries:
        info = entry.lstat()
        found[str(entry)] = (info.st_size, info.st_mtime_ns, info.st_mode)
    return found


class RunLocally:
    """A kubelet for `on_pod` that really runs a pod's containers, as local processes.

    For pods whose containers run programs of this project (`python -m pods.configure ...`):
    init containers one after the other, then the containers side by side; stdout and stderr
    become the container's log as they come; the exit code becomes the terminated state
    (Completed or Error) and the terminationMessagePath file (or, with FallbackToLogsOnError,
    the log's tail) its message. activeDeadlineSeconds is enforced (DeadlineExceeded); deleting
    the pod kills its processes. A command that cannot be started ends as the kubelet reports
    it: exit code 128, reason StartError.

    Volumes are directories under `root`: one per emptyDir, secret and configMap of each pod,
    one per PersistentVolumeClaim (shared by every pod naming that claim: `claim_dir`; the
    claim is bound when a pod first uses it), a hostPath is the path itself or the directory
    `host_paths` maps it to, and `volume_dirs` gives a directory by volume name whatever its
    source (for nfs, csi and other network volumes). Secret and configMap files are written
    from the object's data (items, keys and modes honoured); a pod waits, as on a node, until
    the secrets, configMaps and claims it names exist.

    Limitation: a local process cannot be given another file system view. A mount is emulated
    by rewriting the mount path wherever it appears in the container's command, args, env
    values and workingDir (longest mount path first, after `$(VAR)` expansion), so the program
    must receive its paths that way, not hard-code them; the terminationMessagePath is mapped
    the same way. Any other absolute path is this host's own: a container writing to one
    writes on this machine. subPath maps to that subdirectory (created when missing, as the kubelet
    does). readOnly cannot be enforced (the process runs as this user, often root): a container
    that changed a read-only mount (secret and configMap volumes are always read-only) fails
    the test instead. The image is ignored: `executables` maps the command's first word
    (python, python3 by default: this interpreter) to a local program, and `command` must be
    given since image entrypoints are unknown here. No isolation, no resource limits, no
    network policy, and restartPolicy Never only."""

    def __init__(
        self,
        root: Path,
        *,
        host_paths: Mapping[str, Path] | None = None,
        volume_dirs: Mapping[str, Path] | None = None,
        executables: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
        kill_grace_s: float = 1.0,
    ) -> None:
        self.root = root
        self.host_paths = dict(host_paths or {})
        self.volume_dirs = dict(volume_dirs or {})
        self.executables = {
            "python": sys.executable,
            "python3": sys.executable,
            **(executables or {}),
        }
        self.env = dict(env or {})
        self.kill_grace_s = kill_grace_s

    def claim_dir(self, namespace: str, claim: str) -> Path:
        return self.root / "claims" / namespace / claim

    def pod_dir(self, pod: Obj) -> Path:
        return self.root / "pods" / str(pod["metadata"]["uid"])

    async def __call__(self, kube: KubeStandIn, pod: Obj) -> None:
        metadata = pod["metadata"]
        if pod["spec"].get("restartPolicy") != "Never":
            raise UnsupportedByStandIn(
                "RunLocally runs each container once: restartPolicy must be Never"
            )
        gone = asyncio.ensure_future(
            kube.wait_gone("pods", metadata["namespace"], metadata["name"], metadata["uid"])
        )
        try:
            if await self._wait_for_sources(kube, pod, gone):
                await _PodRun(self, kube, pod, self._prepare_volumes(kube, pod), gone).run()
        finally:
            gone.cancel()

    # -- volumes -----------------------------------------------------------------------------

    def _missing_source(self, kube: KubeStandIn, pod: Obj) -> tuple[str, str] | None:
        namespace = pod["metadata"]["namespace"]
        for volume in pod["spec"].get("volumes") or []:
            if volume["name"] in self.volume_dirs:
                continue
            for kind, key, source in (
                ("secrets", "secretName", volume.get("secret")),
                ("configmaps", "name", volume.get("configMap")),
                ("persistentvolumeclaims", "claimName", volume.get("persistentVolumeClaim")),
            ):
                if (
                    source
                    and not source.get("optional")
                    and kube.get(kind, namespace, source[key]) is None
                ):
                    return kind, source[key]
        return None

    async def _wait_for_sources(
        self, kube: KubeStandIn, pod: Obj, gone: asyncio.Future[None]
    ) -> bool:
        """Waits, as a node does, until every secret, configMap and claim the pod names exists;
        False when the pod went away first."""
        namespace, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        while (missing := self._missing_source(kube, pod)) is not None:
            kind, source = missing
            if kind != "persistentvolumeclaims":
                # A pod whose claim is missing is never scheduled; one whose secret is missing
                # is scheduled and stays ContainerCreating.
                waiting = Waiting(
                    "ContainerCreating", f'{resource_for(kind).kind} "{source}" not found'
                )
                states: dict[str, ContainerState] = {
                    c["name"]: waiting for c in pod["spec"]["containers"]
                }
                with contextlib.suppress(LookupError):
                    kube.set_pod_phase(namespace, name, "Pending", container_states=states)

            def named(obj: Obj, source: str = source) -> bool:
                return bool(obj["metadata"]["name"] == source)

            appeared: asyncio.Future[Any] = asyncio.ensure_future(
                kube.wait_for(kind, namespace, named, timeout=None)
            )
            await asyncio.wait({appeared, gone}, return_when=asyncio.FIRST_COMPLETED)
            appeared.cancel()
            if gone.done():
                return False
        return True

    def _prepare_volumes(self, kube: KubeStandIn, pod: Obj) -> dict[str, _Volume]:
        namespace = pod["metadata"]["namespace"]
        volumes: dict[str, _Volume] = {}
        for volume in pod["spec"].get("volumes") or []:
            name, own = volume["name"], self.pod_dir(pod) / "volumes" / volume["name"]
            if name in self.volume_dirs:
                volumes[name] = _Volume(self.volume_dirs[name], read_only=False)
            elif "emptyDir" in volume:
                own.mkdir(parents=True, exist_ok=True)
                volumes[name] = _Volume(own, read_only=False)
            elif claim := volume.get("persistentVolumeClaim"):
                host = self.claim_dir(namespace, claim["claimName"])
                host.mkdir(parents=True, exist_ok=True)
                kube.bind_claim(namespace, claim["claimName"])
                volumes[name] = _Volume(host, read_only=bool(claim.get("readOnly")))
            elif host_path := volume.get("hostPath"):
                host = self.host_paths.get(host_path["path"], Path(host_path["path"]))
                if host_path.get("type") == "DirectoryOrCreate":
                    host.mkdir(parents=True, exist_ok=True)
                volumes[name] = _Volume(host, read_only=False)
            elif "secret" in volume or "configMap" in volume:
                _write_projection(kube, namespace, volume, own)
                volumes[name] = _Volume(own, read_only=True)
            else:
                raise UnsupportedByStandIn(
                    f"volume {name}: RunLocally knows emptyDir, persistentVolumeClaim, hostPath, "
                    "secret and configMap"
                )
        return volumes


@dataclass(frozen=True)
class _Volume:
    host: Path
    read_only: bool


@dataclass(frozen=True)
class _Mount:
    path: str
    host: Path
    read_only: bool


@dataclass
class _Started:
    """A container's process, and what its end is checked against."""

    name: str
    process: asyncio.subprocess.Process
    pump: asyncio.Task[None]
    started_at: datetime
    termination_file: Path
    policy: str
    read_only: list[_Mount]
    before: dict[str, tuple[int, int, int]]


def _write_projection(kube: KubeStandIn, namespace: str, volume: Obj, directory: Path) -> None:
    """A secret or configMap volume's files, from the object's data."""
    if "secret" in volume:
        source = volume["secret"]
        obj = kube.get("secrets", namespace, source["secretName"]) or {}
        data = {key: base64.b64decode(value) for key, value in (obj.get("data") or {}).items()}
    else:
        source = volume["configMap"]
        obj = kube.get("configmaps", namespace, source["name"]) or {}
        data = {key: str(value).encode() for key, value in (obj.get("data") or {}).items()}
        data |= {
            key: base64.b64decode(value) for key, value in (obj.get("binaryData") or {}).items()
        }
    items = source.get("items") or [{"key": key, "path": key} for key in sorted(data)]
    directory.mkdir(parents=True, exist_ok=True)
    for item in items:
        if item["key"] not in data:
            if source.get("optional"):
                continue
            raise UnsupportedByStandIn(
                f"volume {volume['name']}: no key {item['key']} (a kubelet keeps the pod "
                "ContainerCreating)"
            )
        path = directory / item["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data[item["key"]])
        path.chmod(item.get("mode", source.get("defaultMode", 0o644)))


class _PodRun:
    """One run of one pod by `RunLocally`: its containers' processes and the status it writes."""

    def __init__(
        self,
        kubelet: RunLocally,
        kube: KubeStandIn,
        pod: Obj,
        volumes: Mapping[str, _Volume],
        gone: asyncio.Future[None],
    ) -> None:
        self.kubelet, self.kube, self.pod, self.volumes, self.gone = (
            kubelet,
            kube,
            pod,
            volumes,
            gone,
        )
        self.namespace, self.name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        self.spec: Obj = pod["spec"]
        self.states: dict[str, ContainerState] = {
            c["name"]: Waiting("PodInitializing") for c in self.spec["containers"]
        }
        deadline_s = self.spec.get("activeDeadlineSeconds")
        self.deadline = (
            None if deadline_s is None else asyncio.get_running_loop().time() + deadline_s
        )

    def publish(self, phase: PodPhase, reason: str | None = None) -> None:
        message = DEADLINE_MESSAGE if reason == "DeadlineExceeded" else None
        with contextlib.suppress(LookupError):
            self.kube.set_pod_phase(
                self.namespace,
                self.name,
                phase,
                container_states=self.states,
                reason=reason,
                message=message,
            )

    async def run(self) -> None:
        for init in self.spec.get("initContainers") or []:
            outcome = await self._supervise([init], "Pending")
            if outcome == "deadline":
                self.publish("Failed", "DeadlineExceeded")
            state = self.states[init["name"]]
            if outcome != "done":
                return
            if isinstance(state, Terminated) and state.exit_code != 0:
                self.publish("Failed")
                return
        outcome = await self._supervise(self.spec["containers"], "Running")
        if outcome == "deadline":
            self.publish("Failed", "DeadlineExceeded")
        elif outcome == "done":
            failed = any(
                isinstance(s, Terminated) and s.exit_code != 0 for s in self.states.values()
            )
            self.publish("Failed" if failed else "Succeeded")

    async def _supervise(
        self, containers: Sequence[Obj], phase: PodPhase
    ) -> Literal["done", "gone", "deadline"]:
        """Runs `containers` side by side until all end, the pod is deleted or the deadline
        passes; publishes the pod's status once they run and after each one ends."""
        started: list[_Started] = []
        try:
            for container in containers:
                entry = await self._start(container)
                if isinstance(entry, Terminated):
                    self.states[container["name"]] = entry
                else:
                    started.append(entry)
                    self.states[container["name"]] = Running(entry.started_at)
            self.publish(phase)
            return await self._await_ends(started, phase)
        except BaseException:
            await self._kill([entry for entry in started if entry.process.returncode is None])
            raise

    async def _await_ends(
        self, started: list[_Started], phase: PodPhase
    ) -> Literal["done", "gone", "deadline"]:
        finishing: dict[asyncio.Future[Any], _Started] = {
            asyncio.ensure_future(self._finish(e)): e for e in started
        }
        remaining = (
            None
            if self.deadline is None
            else max(self.deadline - asyncio.get_running_loop().time(), 0.0)
        )
        timer = asyncio.ensure_future(asyncio.sleep(1e9 if remaining is None else remaining))
        try:
            while finishing:
                done, _ = await asyncio.wait(
                    {*finishing, self.gone, timer}, return_when=asyncio.FIRST_COMPLETED
                )
                if self.gone in done or timer in done:
                    for task in finishing:
                        task.cancel()
                    await self._kill(started)
                    if self.gone in done:
                        return "gone"
                    for entry in started:
                        if not isinstance(self.states[entry.name], Terminated):
                            self.states[entry.name] = Terminated(
                                137, "Error", None, entry.started_at, utc_now()
                            )
                    return "deadline"
                for task in done:
                    self.states[finishing.pop(task).name] = task.result()
                if finishing:
                    self.publish(phase)
        finally:
            timer.cancel()
        return "done"

    def _command(
        self, container: Obj, mapper: _PathMapper, declared: Mapping[str, str]
    ) -> list[str]:
        if not container.get("command"):
            raise UnsupportedByStandIn(
                f"container {container['name']}: RunLocally needs a command (image entrypoints "
                "are unknown here)"
            )
        argv = [
            mapper.map(expand(part, declared))
            for part in container["command"] + (container.get("args") or [])
        ]
        argv[0] = self.kubelet.executables.get(argv[0], argv[0])
        return argv

    async def _start(self, container: Obj) -> _Started | Terminated:
        name = container["name"]
        directory = self.kubelet.pod_dir(self.pod) / "containers" / name
        directory.mkdir(parents=True, exist_ok=True)
        termination = directory / "termination-log"
        termination.write_bytes(b"")
        mounts = self._mounts(container)
        message_path = container.get("terminationMessagePath", "/dev/termination-log")
        mapper = _PathMapper([(m.path, m.host) for m in mounts] + [(message_path, termination)])
        declared = self._declared_env(container)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOSTNAME": self.name,
            "LANG": "C.UTF-8",
        }
        env |= self.kubelet.env | {key: mapper.map(value) for key, value in declared.items()}
        argv = self._command(container, mapper, declared)
        cwd = (
            Path(mapper.map(container["workingDir"])) if container.get("workingDir") else directory
        )
        read_only = [m for m in mounts if m.read_only]
        before = {key: value for m in read_only for key, value in _fingerprint(m.host).items()}
        started_at = utc_now()
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                cwd=cwd,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as error:
            return Terminated(
                128,
                "StartError",
                f"failed to create containerd task: {error}",
                started_at,
                utc_now(),
            )
        pump = asyncio.ensure_future(_pump_log(self.kube, self.pod, name, process))
        policy = container.get("terminationMessagePolicy", "File")
        return _Started(name, process, pump, started_at, termination, policy, read_only, before)

    def _mounts(self, container: Obj) -> list[_Mount]:
        mounts = []
        for mount in container.get("volumeMounts") or []:
            volume = self.volumes[mount["name"]]
            host = volume.host
            if sub_path := mount.get("subPath"):
                host = host / sub_path
                if not host.exists():
                    host.mkdir(parents=True)
            mounts.append(
                _Mount(mount["mountPath"], host, volume.read_only or bool(mount.get("readOnly")))
            )
        return mounts

    def _declared_env(self, container: Obj) -> dict[str, str]:
        """The container's env as Kubernetes computes it, in container paths."""
        if container.get("envFrom"):
            raise UnsupportedByStandIn("RunLocally does not read envFrom")
        declared: dict[str, str] = {}
        for entry in container.get("env") or []:
            if "valueFrom" in entry:
                declared[entry["name"]] = self._value_from(entry["valueFrom"])
            else:
                declared[entry["name"]] = expand(entry.get("value", ""), declared)
        return declared

    def _value_from(self, source: Obj) -> str:
        metadata = self.pod["metadata"]
        if ref := source.get("secretKeyRef"):
            secret = self.kube.get("secrets", self.namespace, ref["name"]) or {}
            return base64.b64decode((secret.get("data") or {})[ref["key"]]).decode()
        if ref := source.get("configMapKeyRef"):
            config = self.kube.get("configmaps", self.namespace, ref["name"]) or {}
            return str((config.get("data") or {})[ref["key"]])
        path = (source.get("fieldRef") or {}).get("fieldPath", "")
        if match := re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path):
            return str((metadata.get(match[1]) or {}).get(match[2], ""))
        fields = {
            "metadata.name": metadata["name"],
            "metadata.namespace": self.namespace,
            "metadata.uid": metadata["uid"],
            "spec.nodeName": NODE_NAME,
            "status.podIP": pod_ip(metadata["uid"]),
        }
        if path in fields:
            return str(fields[path])
        raise UnsupportedByStandIn(f"RunLocally cannot resolve env valueFrom {source}")

    async def _finish(self, started: _Started) -> Terminated:
        # Shielded: a kill must not lose the output the process wrote before it.
        await asyncio.shield(started.pump)
        code = await started.process.wait()
        # The container's other processes end with it, as when a container's PID 1 exits.
        _kill_group(started.process, signal.SIGKILL)
        message = started.termination_file.read_bytes()[:MAX_TERMINATION_MESSAGE].decode(
            errors="replace"
        )
        if not message and code != 0 and started.policy == "FallbackToLogsOnError":
            with contextlib.suppress(LookupError):
                tail = self.kube.log(self.namespace, self.name, started.name).splitlines(
                    keepends=True
                )
                message = "".join(tail[-FALLBACK_LOG_LINES:])[-FALLBACK_LOG_BYTES:]
        after = {
            key: value for m in started.read_only for key, value in _fingerprint(m.host).items()
        }
        if after != started.before:
            raise AssertionError(
                f"container {started.name} of pod {self.name} changed a read-only mount"
            )
        exit_code = code if code >= 0 else 128 - code
        return Terminated(exit_code, None, message or None, started.started_at, utc_now())

    async def _kill(self, started: Sequence[_Started]) -> None:
        """SIGTERM, then SIGKILL after the grace period, to each container's process group."""
        for entry in started:
            _kill_group(entry.process, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(e.process.wait() for e in started)), self.kubelet.kill_grace_s
            )
        for entry in started:
            _kill_group(entry.process, signal.SIGKILL)
            await entry.process.wait()
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(entry.pump), self.kubelet.kill_grace_s)


def _kill_group(process: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


async def _pump_log(
    kube: KubeStandIn, pod: Obj, container: str, process: asyncio.subprocess.Process
) -> None:
    """Copies the process's output to the container's log, whole lines at a time."""
    assert process.stdout is not None
    uid = pod["metadata"]["uid"]
    partial = b""
    while chunk := await process.stdout.read(65536):
        partial += chunk
        complete, newline, partial = partial.rpartition(b"\n")
        if newline:
            kube.append_log_of(uid, container, complete + newline)
    if partial:
        kube.append_log_of(uid, container, partial)
