"""Runs one job's compute stage, a hostile algorithm, under bubblewrap and reports how it ended.

The launch chain is one process that execs its way down, all argument lists, no shell ever
sees untrusted data:

1. ``/bin/sh`` (root) writes its own pid into the job's cgroups and sets RLIMIT_FSIZE and
   RLIMIT_CORE with the ``ulimit`` builtin, then execs
2. an *outer* bwrap (root) in a private mount and pid namespace. It bind-mounts each host file
   or directory of the job at a traversable staging path (``<stage_root>/<job_id>/m<N>``), so
   that inputs under root-only directories become reachable to the job uid, without anything
   leaking to the host's mount table. Its own pid namespace makes the job die with the engine:
   when the engine dies, bwrap's --die-with-parent kills the outer init, and the kernel kills
   every process in that namespace, including the unprivileged ones a root-to-uid signal
   could not reach. It execs
3. ``setpriv`` (drops to the job's dedicated uid and gid, no groups, no capabilities,
   no-new-privs), which execs
4. the *inner* bwrap, unprivileged: a fresh user namespace mapping the job uid to itself,
   every other namespace new (no network unless allowed), nested user namespaces disabled, a
   read-only runtime (``/usr``), size-capped ``/tmp`` and ``/dev/shm``, and the job's ``/data``
   bound from the staging paths. Inside, ``/bin/sh -c 'exec "$@" 2>&1'`` merges the
   algorithm's stderr into its stdout and execs the algorithm. bwrap's own messages keep the
   original stderr, a separate pipe, so they never reach the algorithm's log.

Limits are the kernel's: memory, processes and CPU in per-job cgroups (v1 or v2), file size and
core dumps by rlimit, ``/tmp`` by tmpfs size (RAM-backed, so it also counts against memory), and
the wall-clock deadline by this module. After the main process ends, or on timeout or cancel,
every process left in the job's cgroup is killed before the result is returned.

Known limits:
- RLIMIT_FSIZE caps each file, not the total written to the outputs: the sum is capped when the
  outputs are published, not while the job writes.
- ``Limits.network=True`` shares the host's network namespace, loopback included, so it does not
  keep the job away from the node's own services; the engine must not pass it until a filtered
  network namespace exists.
- bwrap reports a death by signal N as exit status 128 + N: an algorithm that exits with 137
  reads as killed by SIGKILL.
- A full ``/tmp`` (ENOSPC) leaves no trace outside the job; DISK_FULL is then inferred from the
  algorithm's last output, which only the algorithm itself can mislabel.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import json
import os
import posixpath
import re
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

_log = structlog.get_logger(__name__)

# The engine's job ids become directory names (cgroups, staging): keep them plain.
_JOB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# The chain's own processes sit in the job's pids cgroup next to the algorithm: the outer
# bwrap's monitor and init, the inner bwrap's monitor and init. They are added to the job's
# process limit so that `max_processes` counts the algorithm's processes (and threads) only.
_CHAIN_PROCESSES = 4
_CPU_PERIOD_US = 100_000
_MIN_CPU_QUOTA_US = 1_000
_MIN_MEMORY_BYTES = 16 * 1024 * 1024
_READ_CHUNK = 64 * 1024
_TAIL_BYTES = 4096
_CHAIN_STDERR_CAP = 16 * 1024
_KILL_TIMEOUT_S = 10.0
_DRAIN_TIMEOUT_S = 2.0
_RMDIR_TIMEOUT_S = 2.0
_DISK_SCAN_LIMIT = 10_000
_SMOKE_TIMEOUT_S = 30.0
_CHAIN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
_DEFAULT_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/tmp",
    "TMPDIR": "/tmp",
    "LANG": "C.UTF-8",
}
# Texts of the errno values a full disk or the file-size limit produce (strerror and Python's
# OSError both print them); the algorithm's own output is only a hint, see _classify.
_DISK_FULL_MARKERS = (b"No space left on device", b"File too large", b"Disk quota exceeded")
# /etc files a Python runtime uses when the job may reach the network.
_NETWORK_ETC = ("resolv.conf", "hosts", "nsswitch.conf", "host.conf", "gai.conf", "ssl")


class SandboxUnavailable(Exception):
    """The sandbox cannot enforce its limits on this host; the message says why."""


class Outcome(enum.Enum):
    """How a compute stage ended. When several apply, the first of CANCELLED, TIMED_OUT,
    OUT_OF_MEMORY, TOO_MANY_PROCESSES, SANDBOX_FAILED, DISK_FULL, EXIT_NONZERO, OK wins; a
    memory or process limit counts only if the algorithm failed (one it survived did not end
    it)."""

    OK = "ok"
    EXIT_NONZERO = "exit_nonzero"
    TIMED_OUT = "timed_out"
    OUT_OF_MEMORY = "out_of_memory"
    TOO_MANY_PROCESSES = "too_many_processes"
    DISK_FULL = "disk_full"
    CANCELLED = "cancelled"
    SANDBOX_FAILED = "sandbox_failed"


@dataclass(frozen=True)
class Limits:
    """Per-job limits. `max_processes` counts the algorithm's processes and threads;
    `disk_bytes` caps each file's size (RLIMIT_FSIZE, in 512-byte steps), `/tmp` and
    `/dev/shm` (tmpfs, RAM-backed, so they also count against `memory_bytes`).
    `network=True` shares the host's network namespace: the engine passes it only when the
    dataset and the environment both allow network access."""

    cpus: float
    memory_bytes: int
    disk_bytes: int
    max_processes: int
    max_duration_s: float
    network: bool = False


@dataclass(frozen=True)
class Mount:
    """A host file or directory that appears at `sandbox_path` (under `/data/`). Read-only
    sources must be readable by others (the job runs as an unprivileged uid), though their
    parent directories may be root-only. A writable source must be a directory: run() hands
    it to the job's uid (mode 0700) before the launch."""

    host_path: Path
    sandbox_path: str
    writable: bool = False


@dataclass(frozen=True)
class SandboxSpec:
    job_id: str
    mounts: Sequence[Mount]
    argv: Sequence[str]
    env: Mapping[str, str]
    limits: Limits


@dataclass(frozen=True)
class SandboxResult:
    """`exit_code` is the algorithm's exit status, or -N when signal N ended it (an exit
    status above 128 is read as a signal, the shell's convention, since bwrap reports deaths
    by signal that way). `detail` is a short reason for humans without host paths."""

    outcome: Outcome
    exit_code: int
    duration_s: float
    detail: str


@dataclass(frozen=True)
class SandboxConfig:
    uid_base: int = 1_600_000_000
    uid_count: int = 64
    stage_root: Path = Path("/run/c2d-sandbox")
    cgroup_root: Path = Path("/sys/fs/cgroup")
    cgroup_name: str = "c2d"
    bwrap: str = "bwrap"
    runtime_python: str = "/usr/bin/python3"


# -- cgroups ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Counters:
    # None when the kernel does not count OOM kills (v1 before 4.13).
    oom_kills: int | None
    memory_limit_hits: int
    pids_limit_hits: int


class _Cgroups:
    """The job cgroups' layout: cgroup v1 (one directory per controller: memory, pids, cpu)
    or v2 (one directory in the unified hierarchy)."""

    _V1_CONTROLLERS = ("memory", "pids", "cpu")

    def __init__(self, root: Path, name: str) -> None:
        self.root = root
        self.name = name
        self.v2 = (root / "cgroup.controllers").is_file()
        if self.v2:
            self.parents = [root / name]
        else:
            self.parents = [root / c / name for c in self._V1_CONTROLLERS]

    def check(self) -> None:
        """Raises SandboxUnavailable unless the controllers exist and root can create and
        limit a group under them; leaves the parent groups in place."""
        if self.v2:
            available = (self.root / "cgroup.controllers").read_text().split()
            missing = [c for c in self._V1_CONTROLLERS if c not in available]
            if missing:
                raise SandboxUnavailable(
                    f"cgroup v2 at {self.root} lacks the controllers {', '.join(missing)}"
                )
        else:
            for controller in self._V1_CONTROLLERS:
                if not (self.root / controller / "cgroup.procs").is_file():
                    raise SandboxUnavailable(
                        f"no cgroup v1 {controller} controller mounted at "
                        f"{self.root / controller}, and no cgroup v2 at {self.root}"
                    )
        try:
            self.ensure_parents()
        except OSError as error:
            raise SandboxUnavailable(f"cannot create the job cgroups' parent: {error}") from None
        probe = f"check-{os.getpid()}"
        limits = Limits(
            cpus=1.0, memory_bytes=64 << 20, disk_bytes=1 << 20, max_processes=8, max_duration_s=1.0
        )
        try:
            self.create(probe, limits)
            self.counters(probe)
        except OSError as error:
            raise SandboxUnavailable(f"cannot create and limit a job cgroup: {error}") from None
        finally:
            for path in self.dirs(probe):
                with contextlib.suppress(FileNotFoundError):
                    path.rmdir()
        if _swap_enabled() and not self._swap_limitable():
            raise SandboxUnavailable(
                "swap is on but the memory cgroup cannot limit it "
                "(boot with swapaccount=1 or turn swap off)"
            )
        if not self._favors_dynamic_changes():
            # Moving a process into a cgroup waits for an RCU grace period unless no other
            # move happened just before: about 5-15 ms of each job's start on a quiet host.
            _log.info(
                "sandbox.hint",
                hint="mount the cgroup hierarchies with favordynmods to start jobs faster",
            )

    def _favors_dynamic_changes(self) -> bool:
        mounts = {str(p.parent) for p in self.parents}
        for line in _read_lines("/proc/self/mountinfo"):
            fields = line.split()
            if len(fields) > 4 and fields[4] in mounts and "favordynmods" in line:
                return True
        return False

    def _swap_limitable(self) -> bool:
        if self.v2:
            return any(p.name == "memory.swap.max" for p in self.parents[0].iterdir())
        return (self.parents[0] / "memory.memsw.limit_in_bytes").exists()

    def ensure_parents(self) -> None:
        if self.v2:
            # A v2 group can only limit what its parent delegates to it.
            _enable_controllers(self.root)
            self.parents[0].mkdir(mode=0o755, exist_ok=True)
            _enable_controllers(self.parents[0])
        else:
            for parent in self.parents:
                parent.mkdir(mode=0o755, exist_ok=True)

    def dirs(self, job_id: str) -> list[Path]:
        return [parent / job_id for parent in self.parents]

    def procs_files(self, job_id: str) -> list[Path]:
        return [d / "cgroup.procs" for d in self.dirs(job_id)]

    def exists(self, job_id: str) -> bool:
        return any(d.exists() for d in self.dirs(job_id))

    def create(self, job_id: str, limits: Limits) -> None:
        try:
            for d in self.dirs(job_id):
                d.mkdir(mode=0o755)
        except FileNotFoundError:
            self.ensure_parents()
            for d in self.dirs(job_id):
                d.mkdir(mode=0o755, exist_ok=True)
        quota = max(_MIN_CPU_QUOTA_US, int(limits.cpus * _CPU_PERIOD_US))
        pids = limits.max_processes + _CHAIN_PROCESSES
        if self.v2:
            d = self.dirs(job_id)[0]
            _write(d / "memory.max", limits.memory_bytes)
            if (d / "memory.swap.max").exists():
                _write(d / "memory.swap.max", 0)
            _write(d / "pids.max", pids)
            _write(d / "cpu.max", f"{quota} {_CPU_PERIOD_US}")
        else:
            memory, pids_dir, cpu = self.dirs(job_id)
            _write(memory / "memory.limit_in_bytes", limits.memory_bytes)
            # memory+swap: without it a job could spill past its limit into swap.
            memsw = memory / "memory.memsw.limit_in_bytes"
            if memsw.exists():
                _write(memsw, limits.memory_bytes)
            _write(pids_dir / "pids.max", pids)
            _write(cpu / "cpu.cfs_period_us", _CPU_PERIOD_US)
            _write(cpu / "cpu.cfs_quota_us", quota)

    def counters(self, job_id: str) -> _Counters:
        if self.v2:
            d = self.dirs(job_id)[0]
            memory_events = _read_keyed(d / "memory.events")
            return _Counters(
                oom_kills=memory_events.get("oom_kill", 0),
                memory_limit_hits=memory_events.get("max", 0),
                pids_limit_hits=_read_keyed(d / "pids.events").get("max", 0),
            )
        memory, pids_dir, _ = self.dirs(job_id)
        oom = _read_keyed(memory / "memory.oom_control")
        return _Counters(
            oom_kills=oom.get("oom_kill"),
            memory_limit_hits=int((memory / "memory.failcnt").read_text()),
            pids_limit_hits=_read_keyed(pids_dir / "pids.events").get("max", 0),
        )

    def pids(self, job_id: str) -> set[int]:
        found: set[int] = set()
        for procs in self.procs_files(job_id):
            with contextlib.suppress(FileNotFoundError):
                found.update(int(line) for line in procs.read_text().split())
        return found

    def member_paths(self, job_id: str) -> set[str]:
        """The paths /proc/<pid>/cgroup shows for a member of the job's groups."""
        return {f"/{self.name}/{job_id}"}

    def kill_switch(self, job_id: str) -> bool:
        """v2's atomic kill of the whole group (kernel 5.14+); False when unavailable."""
        if not self.v2:
            return False
        try:
            _write(self.dirs(job_id)[0] / "cgroup.kill", 1)
        except OSError:
            return False
        return True

    def remove(self, job_id: str) -> bool:
        removed = True
        for d in self.dirs(job_id):
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                removed = False
        return removed

    def leftover_jobs(self) -> set[str]:
        names: set[str] = set()
        for parent in self.parents:
            with contextlib.suppress(FileNotFoundError):
                names.update(p.name for p in parent.iterdir() if p.is_dir())
        return names


def _enable_controllers(group: Path) -> None:
    control = group / "cgroup.subtree_control"
    enabled = control.read_text().split()
    wanted = [c for c in _Cgroups._V1_CONTROLLERS if c not in enabled]
    if wanted:
        _write(control, " ".join(f"+{c}" for c in wanted))


def _write(path: Path, value: object) -> None:
    # One write(2) per value: cgroup files act on each write, not on close.
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, str(value).encode())
    finally:
        os.close(fd)


def _read_keyed(path: Path) -> dict[str, int]:
    values: dict[str, int] = {}
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                values[key] = int(value)
    return values


def _swap_enabled() -> bool:
    try:
        return len(Path("/proc/swaps").read_text().splitlines()) > 1
    except OSError:
        return False


# -- processes -------------------------------------------------------------------------------


def _kill_if(pid: int, belongs: Callable[[int], bool]) -> None:
    """SIGKILLs `pid` if it (still) `belongs`. The pidfd pins the process, so a pid recycled
    between listing and killing is checked, and spared, rather than killed blindly."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return  # already gone
    try:
        if belongs(pid):
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    finally:
        os.close(pidfd)


def _in_cgroup(paths: set[str]) -> Callable[[int], bool]:
    def belongs(pid: int) -> bool:
        try:
            lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        except OSError:
            return False
        return any(line.split(":", 2)[-1] in paths for line in lines)

    return belongs


def _uids_of(pid: int) -> set[int]:
    """The real, effective, saved and filesystem uids of a process (empty if gone)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"Uid:"):
                    return {int(v) for v in line.split()[1:]}
    except OSError:
        pass
    return set()


def processes_of_uids(uids: range) -> list[int]:
    """Pids of the host's processes running with any uid in `uids` (a check that a job left
    nothing behind)."""
    found: list[int] = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and any(u in uids for u in _uids_of(int(entry.name))):
            found.append(int(entry.name))
    return found


# -- the staging directory and argument lists ------------------------------------------------


@dataclass(frozen=True)
class _Staged:
    mount: Mount
    stage_path: Path
    is_dir: bool


def _make_stage(stage: Path, mounts: Sequence[Mount], uid: int, gid: int) -> list[_Staged]:
    """Creates the job's staging directory, root-owned 0755 so that the job uid can traverse
    it, with one mount point per mount and the job's passwd and group files."""
    os.mkdir(stage, 0o755)
    os.chmod(stage, 0o755)  # noqa: S103 (the job uid traverses it; mkdir obeys the umask)
    staged = []
    for index, mount in enumerate(mounts):
        target = stage / f"m{index}"
        info = os.stat(mount.host_path)
        if stat.S_ISDIR(info.st_mode):
            os.mkdir(target, 0o755)
        elif stat.S_ISREG(info.st_mode) and not mount.writable:
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))
        else:
            kind = "a directory" if mount.writable else "a regular file or a directory"
            raise _SpecError(f"the source of {mount.sandbox_path} is not {kind}")
        staged.append(_Staged(mount, target, stat.S_ISDIR(info.st_mode)))
    # Some programs look their uid up; in the job's user namespace only its uid is mapped,
    # everything else shows as the overflow id 65534.
    _write_new(
        stage / "passwd",
        f"c2d:x:{uid}:{gid}:compute job:/tmp:/usr/sbin/nologin\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
    )
    _write_new(stage / "group", f"c2d:x:{gid}:\nnogroup:x:65534:\n")
    return staged


def _write_new(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _remove_stage(stage: Path) -> bool:
    """Removes what _make_stage made. Never recursive: a directory that is not empty on the
    host side (a mount gone wrong) is left alone rather than emptied."""
    try:
        entries = list(os.scandir(stage))
    except FileNotFoundError:
        return True
    ok = True
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                os.rmdir(entry.path)
            else:
                os.unlink(entry.path)
        except OSError:
            ok = False
    try:
        os.rmdir(stage)
    except FileNotFoundError:
        pass
    except OSError:
        ok = False
    return ok


class _SpecError(Exception):
    """A mount the sandbox cannot set up; the message names sandbox paths only."""


@dataclass(frozen=True)
class _Tools:
    sh: str
    bwrap: str
    setpriv: str


def _launch_argv(
    tools: _Tools,
    *,
    procs_files: Sequence[Path],
    limits: Limits,
    uid: int,
    gid: int,
    stage: Path,
    staged: Sequence[_Staged],
    argv: Sequence[str],
    env: Mapping[str, str],
    status_fd: int,
) -> list[str]:
    # Step 1: positional parameters carry the cgroup files and the rlimit; nothing is
    # interpolated into the script. ulimit -f counts 512-byte blocks; without -H/-S it sets
    # both the soft and the hard limit, so the job cannot raise it again.
    script = (
        'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 125; shift; '
        'n=$((n - 1)); done; ulimit -f "$1" && ulimit -c 0 || exit 125; shift; exec "$@"'
    )
    chain = [tools.sh, "-c", script, "c2d-launch", str(len(procs_files))]
    chain += [str(p) for p in procs_files]
    chain.append(str(max(0, limits.disk_bytes // 512)))

    # Step 2: the outer bwrap, root, only stages host paths; see the module docstring.
    chain += [tools.bwrap, "--dev-bind", "/", "/", "--unshare-pid", "--die-with-parent"]
    for s in staged:
        chain += [
            "--bind" if s.mount.writable else "--ro-bind",
            str(s.mount.host_path),
            str(s.stage_path),
        ]
    chain.append("--")

    # Step 3: the job's identity. --pdeathsig again because the uid change clears it.
    chain += [
        tools.setpriv,
        f"--reuid={uid}",
        f"--regid={gid}",
        "--clear-groups",
        "--no-new-privs",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--pdeathsig=SIGKILL",
        "--",
    ]

    # Step 4: the inner bwrap.
    chain += [tools.bwrap, "--unshare-all", "--unshare-user", "--disable-userns"]
    if limits.network:
        chain.append("--share-net")
    chain += [
        "--die-with-parent",
        "--new-session",
        "--clearenv",
        "--hostname",
        "c2d",
        "--json-status-fd",
        str(status_fd),
    ]
    for name, value in {**_DEFAULT_ENV, **env}.items():
        chain += ["--setenv", name, value]
    chain += ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        if os.path.isdir(f"/usr/{name}"):
            chain += ["--symlink", f"usr/{name}", f"/{name}"]
    chain += [
        "--ro-bind",
        str(stage / "passwd"),
        "/etc/passwd",
        "--ro-bind",
        str(stage / "group"),
        "/etc/group",
    ]
    if os.path.exists("/etc/ld.so.cache"):
        chain += ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    if limits.network:
        for name in _NETWORK_ETC:
            if os.path.exists(f"/etc/{name}"):
                chain += ["--ro-bind", f"/etc/{name}", f"/etc/{name}"]
    tmpfs_size = str(max(4096, limits.disk_bytes))
    chain += [
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        # /dev itself is a tmpfs without size: make it read-only and give shared memory
        # its own capped tmpfs.
        "--size",
        tmpfs_size,
        "--tmpfs",
        "/dev/shm",
        "--remount-ro",
        "/dev",
        "--size",
        tmpfs_size,
        "--tmpfs",
        "/tmp",
    ]
    for s in staged:
        chain += [
            "--bind" if s.mount.writable else "--ro-bind",
            str(s.stage_path),
            s.mount.sandbox_path,
        ]
    # --remount-ro / must follow every mount: bwrap creates mount points in the root tmpfs.
    chain += ["--remount-ro", "/", "--chdir", "/", "--"]
    chain += ["/bin/sh", "-c", 'exec "$@" 2>&1', "sh", *argv]
    return chain


def _check_spec(spec: SandboxSpec) -> None:
    if not _JOB_ID_RE.fullmatch(spec.job_id):
        raise ValueError("job_id must be 1-128 letters, digits, '.', '_' or '-'")
    limits = spec.limits
    if not (
        limits.cpus > 0
        and limits.disk_bytes > 0
        and limits.max_processes > 0
        and limits.max_duration_s > 0
    ):
        raise ValueError("limits must be positive")
    if limits.memory_bytes < _MIN_MEMORY_BYTES:
        raise ValueError(f"memory_bytes must be at least {_MIN_MEMORY_BYTES}")
    if not spec.argv:
        raise ValueError("argv is empty")
    for name, value in spec.env.items():
        if not _ENV_NAME_RE.fullmatch(name) or "\0" in value:
            raise ValueError(f"bad environment variable {name!r}")
    seen: set[str] = set()
    for mount in spec.mounts:
        path = mount.sandbox_path
        if not path.startswith("/data/") or posixpath.normpath(path) != path or "\0" in path:
            raise ValueError(f"sandbox_path must be a normalised path under /data/: {path!r}")
        if path in seen:
            raise ValueError(f"two mounts at {path}")
        seen.add(path)


def _sorted_mounts(mounts: Sequence[Mount]) -> list[Mount]:
    # A parent directory must be mounted before a mount point inside it.
    return sorted(mounts, key=lambda m: m.sandbox_path.count("/"))


# -- the result ------------------------------------------------------------------------------


def _exit_code(status: int) -> int:
    # bwrap reports a death by signal N as exit status 128 + N.
    if 128 < status < 128 + 65:
        return -(status - 128)
    return status


def _parse_status(data: bytes) -> tuple[bool, int | None]:
    """(the inner bwrap started its child, the child's exit status if it reported one).
    bwrap writes one JSON object a line: child-pid when it has cloned, exit-code only when
    the command ran and ended; a setup or exec failure ends without exit-code."""
    cloned, status = False, None
    for line in data.splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict):
                cloned = cloned or "child-pid" in record
                if isinstance(record.get("exit-code"), int):
                    status = record["exit-code"]
    return cloned, status


def _hit_file_size_limit(dirs: Sequence[Path], limit: int) -> bool:
    """Whether a file in the writable mounts reached RLIMIT_FSIZE, looked at without
    following links and bounded, since the job chose what is there."""
    seen = 0
    for top in dirs:
        for root, subdirs, files in os.walk(top, followlinks=False):
            for name in files:
                seen += 1
                if seen > _DISK_SCAN_LIMIT:
                    return False
                with contextlib.suppress(OSError):
                    info = os.lstat(os.path.join(root, name))
                    if stat.S_ISREG(info.st_mode) and info.st_size >= limit:
                        return True
            seen += len(subdirs)
    return False


def _mib(n: int) -> str:
    return f"{n / (1 << 20):g} MiB"


# -- the sandbox -----------------------------------------------------------------------------


class Sandbox:
    """Runs jobs' compute stages; one per engine. Each running job holds one uid of the
    configured range."""

    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self._cgroups = _Cgroups(config.cgroup_root, config.cgroup_name)
        self._tools: _Tools | None = None
        self._free_slots = list(range(config.uid_count))
        self._running: dict[str, int] = {}
        self._cancels: dict[str, asyncio.Event] = {}

    @property
    def uids(self) -> range:
        return range(self.config.uid_base, self.config.uid_base + self.config.uid_count)

    # -- start-up ----------------------------------------------------------------------------

    def check(self) -> None:
        """Verifies that every limit can be enforced here; raises SandboxUnavailable with the
        reason otherwise."""
        if os.geteuid() != 0:
            raise SandboxUnavailable("the sandbox must run as root (it switches to job uids)")
        tools = self._find_tools()
        python = self.config.runtime_python
        if not (os.path.isfile(python) and os.access(python, os.X_OK)):
            raise SandboxUnavailable(f"the runtime {python} is missing")
        if not python.startswith("/usr/"):
            raise SandboxUnavailable(
                f"the runtime {python} is not under /usr, the sandbox's only runtime tree"
            )
        try:
            os.close(os.pidfd_open(os.getpid()))
        except OSError:
            # Killing a job's processes by pid without a pidfd could hit a recycled pid.
            raise SandboxUnavailable("the kernel lacks pidfd_open (Linux 5.3 or later)") from None
        self._check_uid_range()
        self._check_stage_root()
        self._cgroups.check()
        self._check_rlimits(tools)
        self._smoke_test(tools)
        self._tools = tools

    def _find_tools(self) -> _Tools:
        found = []
        for name in ("/bin/sh", self.config.bwrap, "setpriv"):
            # A fixed search path: the engine's own PATH must not choose what runs as root.
            path = shutil.which(name, path=_CHAIN_PATH)
            if path is None:
                raise SandboxUnavailable(f"{name} is not installed (or not executable)")
            found.append(os.path.abspath(path))
        return _Tools(*found)

    def _check_uid_range(self) -> None:
        base, count = self.config.uid_base, self.config.uid_count
        if base < 0 or count < 1 or base + count > 2**32 - 2:
            raise SandboxUnavailable(f"job uid range {base}+{count} is not a valid uid range")
        wanted = self.uids
        clashes = ["root (uid 0)"] if 0 in wanted else []
        for file in ("/etc/passwd", "/etc/group"):
            for line in _read_lines(file):
                fields = line.split(":")
                ids = fields[2:4] if file == "/etc/passwd" else fields[2:3]
                if any(i.isdigit() and int(i) in wanted for i in ids):
                    clashes.append(f"{fields[0]} in {file}")
        for file in ("/etc/subuid", "/etc/subgid"):
            for line in _read_lines(file):
                fields = line.split(":")
                if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
                    start, n = int(fields[1]), int(fields[2])
                    if start < wanted.stop and wanted.start < start + n:
                        clashes.append(f"{fields[0]}'s range in {file}")
        if clashes:
            raise SandboxUnavailable(
                f"job uid range {base}..{base + count - 1} collides with " + ", ".join(clashes[:5])
            )

    def _check_stage_root(self) -> None:
        root = self.config.stage_root
        try:
            root.mkdir(mode=0o755, parents=True, exist_ok=True)
            os.chmod(root, 0o755)  # noqa: S103 (the job uids traverse it)
        except OSError as error:
            raise SandboxUnavailable(f"cannot create the staging root {root}: {error}") from None
        # The job uid walks to its staged files through every ancestor.
        for path in [root, *root.parents]:
            info = os.stat(path)
            if not info.st_mode & stat.S_IXOTH:
                raise SandboxUnavailable(f"{path} is not traversable by the job uids")
            foreign = info.st_uid != 0 or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
            # A sticky ancestor (/tmp) is fine: nobody else can replace what root made in it.
            if foreign and not (info.st_mode & stat.S_ISVTX and path != root):
                raise SandboxUnavailable(f"{path} is writable by others than root")

    def _check_rlimits(self, tools: _Tools) -> None:
        # The launch sets the file-size limit with the shell's ulimit builtin: make sure this
        # shell counts 512-byte blocks and sets the hard limit too.
        probe = subprocess.run(
            [
                tools.sh,
                "-c",
                'ulimit -f 2 && ulimit -c 0 && exec "$@"',
                "sh",
                self.config.runtime_python,
                "-I",
                "-c",
                "import resource as r; print(*r.getrlimit(r.RLIMIT_FSIZE), "
                "*r.getrlimit(r.RLIMIT_CORE))",
            ],
            capture_output=True,
            timeout=_SMOKE_TIMEOUT_S,
            check=False,
        )
        if probe.stdout.split() != [b"1024", b"1024", b"0", b"0"]:
            raise SandboxUnavailable(
                f"{tools.sh}'s ulimit does not set RLIMIT_FSIZE in 512-byte blocks"
            )

    def _smoke_test(self, tools: _Tools) -> None:
        """Runs the whole launch chain once (without cgroups): proves that unprivileged user
        namespaces are allowed, that bwrap knows every option used, and that the runtime
        works as the job uid."""
        uid = self.config.uid_base
        stage = self.config.stage_root / f"check-{os.getpid()}"
        _remove_stage(stage)
        read_fd, write_fd = os.pipe()
        try:
            staged = _make_stage(stage, [], uid, uid)
            argv = _launch_argv(
                tools,
                procs_files=[],
                limits=Limits(1.0, 64 << 20, 1 << 20, 8, 10.0),
                uid=uid,
                gid=uid,
                stage=stage,
                staged=staged,
                argv=[self.config.runtime_python, "-I", "-c", "import os; print(os.getuid())"],
                env={},
                status_fd=write_fd,
            )
            probe = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                pass_fds=(write_fd,),
                env={"PATH": _CHAIN_PATH},
                timeout=_SMOKE_TIMEOUT_S,
                check=False,
            )
        finally:
            os.close(write_fd)
            os.close(read_fd)
            _remove_stage(stage)
        if probe.returncode != 0 or probe.stdout.strip() != str(uid).encode():
            message = (
                probe.stderr.decode(errors="replace").strip()
                or probe.stdout.decode(errors="replace").strip()
            )
            if "--disable-userns" in message or "Unknown option" in message:
                reason = "bwrap is too old (0.8 or later is needed for --disable-userns)"
            elif "namespace" in message or "Operation not permitted" in message:
                reason = "unprivileged user namespaces are not permitted"
            else:
                reason = "the sandbox does not start"
            raise SandboxUnavailable(f"{reason}: {message[:500]}")

    async def sweep(self) -> None:
        """Kills and removes what a crashed engine left: job cgroups, staging directories,
        and any process still running as a job uid."""
        log = _log
        for job_id in sorted(self._cgroups.leftover_jobs()):
            if job_id in self._running:
                continue
            await self._kill_job(job_id)
            self._cgroups.remove(job_id)
            log.warning("sandbox.sweep.cgroup", job_id=job_id)
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.config.stage_root):
                if entry.name not in self._running and entry.is_dir(follow_symlinks=False):
                    _remove_stage(Path(entry.path))
                    log.warning("sandbox.sweep.stage", job_id=entry.name)
        busy = {self.config.uid_base + slot for slot in self._running.values()}
        for pid in processes_of_uids(self.uids):
            uids = _uids_of(pid)
            if uids and not uids & busy:
                _kill_if(pid, lambda p: bool(_uids_of(p) & set(self.uids) - busy))
                log.warning("sandbox.sweep.process", pid=pid)

    def close(self) -> None:
        """Removes the parent cgroups and the staging root when no job is left in them (an
        engine stopping for good, or tests); a no-op for whatever is still in use."""
        for path in [*self._cgroups.parents, self.config.stage_root]:
            with contextlib.suppress(OSError):
                path.rmdir()

    # -- one job -----------------------------------------------------------------------------

    def cancel(self, job_id: str) -> bool:
        """Asks a running job to end (CANCELLED); False when the job is not running."""
        event = self._cancels.get(job_id)
        if event is None:
            return False
        event.set()
        return True

    async def run(
        self,
        spec: SandboxSpec,
        on_output: Callable[[bytes], Awaitable[None]],
        cancel: asyncio.Event | None = None,
    ) -> SandboxResult:
        """Runs the algorithm to its end; each chunk of its stdout and stderr goes to
        `on_output` as it arrives. Raises ValueError for a malformed spec; every way a
        started job ends is a result."""
        _check_spec(spec)
        job_id = spec.job_id
        if job_id in self._running:
            raise ValueError(f"job {job_id} is already running")
        if self._tools is None:
            self._tools = self._find_tools()
        log = _log.bind(job_id=job_id)
        if not self._free_slots:
            return SandboxResult(
                Outcome.SANDBOX_FAILED, -1, 0.0, "no free job uid: too many jobs at once"
            )
        slot = self._free_slots.pop(0)
        uid = gid = self.config.uid_base + slot
        self._running[job_id] = slot
        own_cancel = asyncio.Event()
        self._cancels[job_id] = own_cancel
        log = log.bind(uid=uid)
        stage = self.config.stage_root / job_id
        try:
            job = _Job(self, spec, uid, gid, stage, on_output, [own_cancel, cancel], log)
            # Shielded so that the job is killed and cleaned up even when the caller is
            # cancelled; the caller still sees its CancelledError.
            task = asyncio.ensure_future(job.run())
            try:
                return await asyncio.shield(task)
            except asyncio.CancelledError:
                # The caller gave up on the job: end it now rather than at its deadline, and
                # wait (bounded) for its processes to be gone before passing the cancel on.
                own_cancel.set()
                await asyncio.wait([task], timeout=2 * _KILL_TIMEOUT_S)
                raise
        finally:
            self._cancels.pop(job_id, None)

    def _release(self, job_id: str, *, reusable: bool) -> None:
        slot = self._running.pop(job_id, None)
        if slot is not None and not reusable:
            # A process that survived SIGKILL (stuck in the kernel) still runs as this uid:
            # no other job may share it. sweep() at the next start deals with it.
            _log.error("sandbox.uid_quarantined", job_id=job_id, uid=self.config.uid_base + slot)
        elif slot is not None:
            self._free_slots.append(slot)
            self._free_slots.sort()

    async def _kill_job(self, job_id: str) -> bool:
        """Kills every process in the job's cgroups, repeating until none is left (a process
        may fork while its siblings die); True when they are empty."""
        deadline = time.monotonic() + _KILL_TIMEOUT_S
        belongs = _in_cgroup(self._cgroups.member_paths(job_id))
        self._cgroups.kill_switch(job_id)
        # Short polls first: right after a normal exit, only bwrap's inits are still on their
        # way out (a bwrap monitor exits as soon as it knows the status, before its init).
        poll = 0.0005
        while True:
            pids = self._cgroups.pids(job_id)
            if not pids:
                return True
            for pid in pids:
                _kill_if(pid, belongs)
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(poll)
            poll = min(poll * 2, 0.02)


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []


class _Job:
    """One run of one job: set up, launch, watch, classify, clean up."""

    def __init__(
        self,
        sandbox: Sandbox,
        spec: SandboxSpec,
        uid: int,
        gid: int,
        stage: Path,
        on_output: Callable[[bytes], Awaitable[None]],
        cancels: Sequence[asyncio.Event | None],
        log: Any,
    ) -> None:
        self.sandbox = sandbox
        self.cgroups = sandbox._cgroups
        self.spec = spec
        self.uid = uid
        self.gid = gid
        self.stage = stage
        self.on_output = on_output
        self.cancels = [c for c in cancels if c is not None]
        self.log = log
        self.mounts = _sorted_mounts(spec.mounts)
        self.tail = bytearray()
        self.chain_stderr = bytearray()
        self.started = 0.0
        self.steps = _Steps()

    async def run(self) -> SandboxResult:
        job_id = self.spec.job_id
        try:
            return await self._run()
        finally:
            empty = await self._clean_up()
            self.sandbox._release(job_id, reusable=empty)
            self.steps.mark("release")
            self.log.debug("sandbox.timing", **self.steps.ms)

    async def _run(self) -> SandboxResult:
        spec, limits = self.spec, self.spec.limits
        self.started = time.monotonic()
        if self.cgroups.exists(spec.job_id):
            # Left by a crashed engine for this very job: never let its processes live on.
            self.log.warning("sandbox.leftover_cgroup")
            await self.sandbox._kill_job(spec.job_id)
            self.cgroups.remove(spec.job_id)
        _remove_stage(self.stage)
        self.steps.mark("leftover_checks")
        try:
            self.cgroups.create(spec.job_id, limits)
            self.steps.mark("cgroup_create")
            staged = _make_stage(self.stage, self.mounts, self.uid, self.gid)
            for s in staged:
                if s.mount.writable:
                    _hand_over(s.mount.host_path, self.uid, self.gid)
                elif not os.stat(s.mount.host_path).st_mode & stat.S_IROTH:
                    self.log.warning("sandbox.mount_unreadable", sandbox_path=s.mount.sandbox_path)
            self.steps.mark("stage")
        except _SpecError as error:
            return self._result(Outcome.SANDBOX_FAILED, -1, str(error))
        except OSError as error:
            self.log.error("sandbox.setup_failed", error=self._scrub(str(error)))
            return self._result(
                Outcome.SANDBOX_FAILED,
                -1,
                f"sandbox setup failed: {errno.errorcode.get(error.errno or 0)}",
            )

        if any(c.is_set() for c in self.cancels):
            return self._result(Outcome.CANCELLED, -1, "cancelled")
        tools = self.sandbox._tools
        assert tools is not None
        status_r, status_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            argv = _launch_argv(
                tools,
                procs_files=self.cgroups.procs_files(spec.job_id),
                limits=limits,
                uid=self.uid,
                gid=self.gid,
                stage=self.stage,
                staged=staged,
                argv=spec.argv,
                env=spec.env,
                status_fd=status_w,
            )
            self.steps.mark("argv")
            # Our own pipes and a pidfd rather than asyncio's subprocess: its wait() also
            # waits for the pipes to close, and it spends a thread per child.
            proc = _Child(
                subprocess.Popen(  # noqa: ASYNC220 (fork and exec only; the wait is a pidfd)
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out_w,
                    stderr=err_w,
                    pass_fds=(status_w,),
                    env={"PATH": _CHAIN_PATH},
                    start_new_session=True,
                )
            )
        except OSError as error:
            for fd in (status_r, out_r, err_r):
                os.close(fd)
            self.log.error("sandbox.launch_failed", error=str(error))
            return self._result(Outcome.SANDBOX_FAILED, -1, "the sandbox could not be launched")
        finally:
            for fd in (status_w, out_w, err_w):
                os.close(fd)
        self.steps.mark("popen")
        self.launched_at = time.monotonic()
        self.log.debug("sandbox.launched", pid=proc.popen.pid)

        readers = [
            asyncio.ensure_future(self._pump_output(out_r)),
            asyncio.ensure_future(self._pump_chain_stderr(err_r)),
        ]
        try:
            ended = await self._wait(proc, limits.max_duration_s)
            self.steps.mark("chain_ran")
            # Whatever the main process left (it cannot, in its pid namespace; but the
            # cgroup is the authority) dies before the result is known.
            await self.sandbox._kill_job(spec.job_id)
            self.steps.mark("kill_after_exit")
            _, pending = await asyncio.wait(readers, timeout=_DRAIN_TIMEOUT_S)
            for reader in pending:
                reader.cancel()
            status = _read_all(status_r)
        finally:
            proc.close()
            for reader in readers:
                reader.cancel()
            # The readers must have let go of their pipes (remove_reader) before they close.
            await asyncio.gather(*readers, return_exceptions=True)
            for fd in (status_r, out_r, err_r):
                os.close(fd)
        self.steps.mark("drain")
        result = self._classify(ended, proc.popen.returncode, status)
        self.steps.mark("classify")
        return result

    async def _wait(self, proc: _Child, deadline_s: float) -> str:
        """Waits for the chain to end, the deadline, or a cancel request; kills the job in
        the latter two cases. Returns "exited", "timed_out" or "cancelled"."""
        waiter = asyncio.ensure_future(proc.wait())
        cancel_waiters = [asyncio.ensure_future(c.wait()) for c in self.cancels]
        try:
            done, _ = await asyncio.wait(
                [waiter, *cancel_waiters], timeout=deadline_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for c in cancel_waiters:
                c.cancel()
        if waiter in done:
            return "exited"
        ended = "cancelled" if any(c in done for c in cancel_waiters) else "timed_out"
        self.log.info(f"sandbox.{ended}")
        await self.sandbox._kill_job(self.spec.job_id)
        try:
            await asyncio.wait_for(waiter, timeout=_KILL_TIMEOUT_S)
        except TimeoutError:
            self.log.error("sandbox.chain_unkillable", pid=proc.popen.pid)
        return ended

    async def _pump_output(self, fd: int) -> None:
        delivering = True
        async for chunk in _read_chunks(fd):
            self.tail += chunk
            del self.tail[:-_TAIL_BYTES]
            if delivering:
                try:
                    await self.on_output(chunk)
                except Exception:
                    # The job goes on (and its pipe is still drained); its log is incomplete.
                    self.log.exception("sandbox.on_output_failed")
                    delivering = False

    async def _pump_chain_stderr(self, fd: int) -> None:
        async for chunk in _read_chunks(fd):
            room = _CHAIN_STDERR_CAP - len(self.chain_stderr)
            self.chain_stderr += chunk[: max(0, room)]

    def _classify(self, ended: str, returncode: int | None, status: bytes) -> SandboxResult:
        limits = self.spec.limits
        cloned, inner_status = _parse_status(status)
        ran = inner_status is not None
        raw = inner_status if inner_status is not None else returncode
        code = _exit_code(raw if raw is not None else -1)
        chain_message = self._scrub(self.chain_stderr.decode(errors="replace").strip())
        try:
            counters: _Counters | None = self.cgroups.counters(self.spec.job_id)
        except OSError:
            counters = None
        failed = code != 0 or not ran
        oom = counters is not None and (
            (counters.oom_kills or 0) > 0
            or (counters.oom_kills is None and counters.memory_limit_hits > 0 and code == -9)
        )
        if chain_message and ran:
            # Not bwrap's only: the job can reopen its init's stderr through /proc/1/fd/2.
            self.log.warning("sandbox.chain_stderr", message=chain_message[:500])

        if ended == "cancelled":
            return self._result(Outcome.CANCELLED, code, "cancelled")
        # A job that hit its memory or process limit and then hung until the deadline (a fork
        # bomb whose children wait) is reported by the limit it hit: that is what went wrong.
        failed = failed or ended == "timed_out"
        if oom and failed:
            return self._result(
                Outcome.OUT_OF_MEMORY, code, f"out of memory (limit {_mib(limits.memory_bytes)})"
            )
        if counters is not None and counters.pids_limit_hits > 0 and failed:
            return self._result(
                Outcome.TOO_MANY_PROCESSES,
                code,
                f"too many processes (limit {limits.max_processes})",
            )
        if ended == "timed_out":
            return self._result(
                Outcome.TIMED_OUT, code, f"timed out after {limits.max_duration_s:g} s"
            )
        if not ran:
            self.log.error(
                "sandbox.failed_to_start",
                cloned=cloned,
                chain_status=returncode,
                message=chain_message[:2000],
            )
            first = chain_message.splitlines()[-1] if chain_message else "no message"
            return self._result(
                Outcome.SANDBOX_FAILED, code, f"sandbox failed to start: {first[:300]}"
            )
        if failed and self._disk_full(code):
            return self._result(
                Outcome.DISK_FULL,
                code,
                f"disk full or file too large (limit {_mib(limits.disk_bytes)})",
            )
        if failed:
            how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
            return self._result(Outcome.EXIT_NONZERO, code, f"algorithm {how}")
        return self._result(Outcome.OK, 0, "")

    def _disk_full(self, code: int) -> bool:
        # Best effort. SIGXFSZ kills a program that writes past RLIMIT_FSIZE, unless it
        # ignores the signal, as Python does: then write() fails with EFBIG, and a file is
        # left at exactly the limit. A full /tmp (ENOSPC) leaves no trace outside the job:
        # for that, the algorithm's own last words are the only hint, and trusting them can
        # only change how its own failure is labelled.
        if code == -signal.SIGXFSZ:
            return True
        if any(marker in self.tail for marker in _DISK_FULL_MARKERS):
            return True
        limit = self.spec.limits.disk_bytes // 512 * 512
        writable = [m.host_path for m in self.mounts if m.writable]
        return _hit_file_size_limit(writable, limit)

    def _result(self, outcome: Outcome, code: int, detail: str) -> SandboxResult:
        duration = time.monotonic() - self.started
        return SandboxResult(outcome, code, duration, detail)

    def _scrub(self, text: str) -> str:
        """Replaces host paths (which would reveal where datasets live) by sandbox paths."""
        pairs = []
        for index, mount in enumerate(self.mounts):
            for host in {str(mount.host_path), os.path.realpath(mount.host_path)}:
                pairs.append((host, f"<{mount.sandbox_path}>"))
            pairs.append((str(self.stage / f"m{index}"), f"<{mount.sandbox_path}>"))
        pairs.append((str(self.stage), "<stage>"))
        for host, alias in sorted(pairs, key=lambda p: -len(p[0])):
            text = text.replace(host, alias)
        return text

    async def _clean_up(self) -> bool:
        """Kills what is left, removes the cgroups and the staging; False when processes
        of the job could not be killed."""
        job_id = self.spec.job_id
        empty = await self.sandbox._kill_job(job_id)
        self.steps.mark("cleanup_kill")
        # A v1 memory group can refuse rmdir for a moment after its last task has gone.
        for _ in range(int(_RMDIR_TIMEOUT_S / 0.01)):
            if self.cgroups.remove(job_id):
                break
            await asyncio.sleep(0.01)
        self.steps.mark("cgroup_rmdir")
        if not empty:
            self.log.error("sandbox.processes_left")
        if self.cgroups.exists(job_id):
            self.log.error("sandbox.cgroup_left")
        if not _remove_stage(self.stage):
            self.log.error("sandbox.stage_left")
        self.steps.mark("stage_remove")
        return empty


class _Steps:
    """Milliseconds spent in each step of a run, for the debug log."""

    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.ms: dict[str, float] = {}

    def mark(self, step: str) -> None:
        now = time.perf_counter()
        self.ms[step] = round((now - self.last) * 1000, 3)
        self.last = now


class _Child:
    """A child process whose end the event loop learns from a pidfd."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen
        self._loop = asyncio.get_running_loop()
        self._exited = asyncio.Event()
        self._pidfd = os.pidfd_open(popen.pid)  # valid even if it has already exited
        self._loop.add_reader(self._pidfd, self._on_exit)

    def _on_exit(self) -> None:
        self._loop.remove_reader(self._pidfd)
        self.popen.poll()  # reaps it: the pidfd says it has exited
        self._exited.set()

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.popen.returncode is not None
        return self.popen.returncode

    def close(self) -> None:
        if self._pidfd >= 0:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1


def _hand_over(path: Path, uid: int, gid: int) -> None:
    """Gives a writable mount's directory to the job uid, mode 0700: it is the job's and no
    other job uid's."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def _read_all(fd: int) -> bytes:
    """Reads what a pipe holds without blocking (its writers are gone by now)."""
    os.set_blocking(fd, False)
    data = bytearray()
    while True:
        try:
            chunk = os.read(fd, _READ_CHUNK)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    return bytes(data)


async def _read_chunks(fd: int) -> AsyncIterator[bytes]:
    """Yields what arrives on a pipe as it arrives, no line buffering, until end of file."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    readable = asyncio.Event()
    loop.add_reader(fd, readable.set)
    try:
        while True:
            try:
                chunk = os.read(fd, _READ_CHUNK)
            except BlockingIOError:
                readable.clear()
                await readable.wait()
                continue
            if not chunk:
                return
            yield chunk
    finally:
        loop.remove_reader(fd)
