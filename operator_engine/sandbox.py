"""Runs one job's compute stage, a hostile algorithm, under bubblewrap and reports how it ended.

Each uid slot gets its sandbox built *before* a job arrives, so that a job's start costs no
namespace, mount or process setup but its own few mounts and one exec. The chain is one process
that execs its way down, all argument lists, fixed when it is parked:

1. ``setpriv --pdeathsig`` then ``/bin/sh`` (root) writes its own pid into the slot's fresh
   cgroups (moving a process into a cgroup can wait several milliseconds for the kernel, an RCU
   grace period: that wait is then off the job's path) and execs
2. ``setpriv`` again: drops to the slot's dedicated uid and gid, no groups, no capabilities,
   no-new-privs, and PR_SET_PDEATHSIG once more (the uid change cleared it), then execs
3. bwrap, unprivileged: a fresh user namespace mapping the job uid to itself, every other
   namespace new (the network's too: see below), nested user namespaces disabled, a read-only
   runtime (``/usr``), and ``/etc/passwd`` and ``/etc/group`` naming the job uid. Its ``/data``,
   ``/tmp`` and ``/dev/shm`` are bound from the slot's staging directories, empty root-owned
   directories for now, on a tmpfs with *shared* mount propagation (``<stage_root>/slots``), so
   that what the engine mounts there later appears inside. bwrap runs
4. ``/bin/sh`` as the job uid, which waits for the job's script on its stdin, a pipe only the
   engine writes.

A job whose algorithm runs in a container image (``SandboxSpec.image``, unpacked by
``operator_engine.images``) gets the same chain, cgroups, limits and network rule, with the
image's root file system as its ``/`` instead of the host's ``/usr``: the engine binds it,
read-only, nosuid and nodev, on the slot's staging ``root`` directory, and bwrap binds that as
``/`` before anything else; every later mount lands on a mount point the image cache made. Step
4 is then the host's static busybox, bound at ``/.c2d/sh`` (an image may have no shell), and
the job's PATH is the image's when it names one.

A job then takes a parked sandbox: the engine renames its cgroups to the job id (cgroup v1; v2
keeps the parked name) and writes the limits; mounts the job's ``/tmp`` and ``/dev/shm``
(tmpfs, size-capped, owned by the job uid) and each input, read-only, on the slot's staging
directories (each bind is made read-only on a private scratch mount first and only then moved
into the shared tree, so it never appears writable inside); and writes the script: the
file-size and core limits (``ulimit``, soft and hard), the job's environment and ``exec`` of the
algorithm's argument list with stderr merged into stdout. Every value in it is single-quoted
(``shlex.quote``): the shell takes it literally. The deadline runs from then. bwrap's own
messages keep the original stderr, a separate pipe, so they never reach the algorithm's log.
After the job, its mounts are detached and the slot is parked again.

A job allowed the network (``Limits.network``) still has its own network namespace, which the
engine, as root, connects to the outside with user-mode networking before the job's script is
sent: ``slirp4netns`` (in the job's cgroups, so its limits and its end are the job's; sandboxed
and seccomp-filtered) gives it ``tap0`` at 10.0.2.100, a default route via 10.0.2.2 and a DNS
relay at 10.0.2.3, which its ``/etc/resolv.conf`` names. slirp4netns opens the job's
connections as host sockets, so it must not lead back to the node: ``--disable-host-loopback``
refuses 10.0.2.2 (the host's loopback), and every address of the host's own interfaces at the
job's start, IPv4 and IPv6, and the link-local range (a cloud's metadata service) get an
``unreachable`` route inside the job's namespace (``nsenter`` and ``ip``), which the job,
without CAP_NET_ADMIN there, cannot remove; a service bound on 0.0.0.0 is out of reach too.
slirp4netns ends with the job's cgroups, and with the engine (its ``--exit-fd`` is a pipe only
the engine holds).

If the engine dies, the kernel kills the sandbox: bwrap's monitor dies by PR_SET_PDEATHSIG, its
init by --die-with-parent, and every process in the pid namespace with it. A crashed engine's
staging mounts stay on the host until the next engine's check() detaches them.

Limits are the kernel's: memory, processes and CPU in per-job cgroups (v1 or v2), file size and
core dumps by rlimit, ``/tmp`` by tmpfs size (RAM-backed, so it also counts against memory), and
the wall-clock deadline by this module. After the main process ends, or on timeout or cancel,
every process left in the job's cgroup is killed, and gone, before the result is returned.

Known limits:
- RLIMIT_FSIZE caps each file, not the total written to the outputs: the sum is capped when the
  outputs are published, not while the job writes.
- A job's network is IPv4 only, and keeps it away from the host's own addresses and the
  link-local range, not from what else the host can route to: its LAN and containers on its
  bridges are reached like any outside address. The host's addresses are read as the job
  starts: one added while it runs is not blocked for it.
- DNS queries to 10.0.2.3 are relayed to the host's resolver, which may be a local one
  (127.0.0.53): the one loopback service a network job reaches, and only by DNS.
- bwrap reports a death by signal N as exit status 128 + N: an algorithm that exits with 137
  reads as killed by SIGKILL.
- A full ``/tmp`` (ENOSPC) leaves no trace outside the job; DISK_FULL is then inferred from the
  algorithm's last output, which only the algorithm itself can mislabel.
- Inputs are bound without what is mounted below their source on the host.
- A job with ``Limits.network=True`` gets no parked sandbox: its own is built as it starts, and
  its network attached (a few milliseconds more). So does an image job.
- An image job's network has the image's own ``/etc/hosts`` and ``/etc/nsswitch.conf``, if any,
  and the job's ``resolv.conf``.
- An engine killed within a moment of parking a sandbox can leave that sandbox's bwrap child
  waiting (it had not yet asked for PR_SET_PDEATHSIG): it runs nothing, and the next engine's
  sweep kills it with its cgroup.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import fcntl
import functools
import ipaddress
import itertools
import json
import os
import posixpath
import re
import select
import shlex
import shutil
import signal
import stat
import struct
import subprocess
import time
from collections.abc import (
    AsyncGenerator,
    Awaitable,
    Callable,
    Collection,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from mesh.jobs import MIN_MEMORY_BYTES
from operator_engine import mounts

_log = structlog.get_logger(__name__)

# The engine's job ids become directory names (cgroups, staging): keep them plain.
_JOB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# The chain's own processes sit in the job's pids cgroup next to the algorithm: bwrap's monitor
# and its init. They are added to the job's process limit so that `max_processes` counts the
# algorithm's processes (and threads) only.
_CHAIN_PROCESSES = 2
# Where engines lock their job uid ranges (see Sandbox._claim_uid_range), and struct flock.
_UID_LOCK_FILE = "/run/c2d-sandbox-uids.lock"
_FLOCK = "hhxxxxqqixxxx"
_CPU_PERIOD_US = 100_000
_MIN_CPU_QUOTA_US = 1_000
_READ_CHUNK = 64 * 1024
_TAIL_BYTES = 4096
_CHAIN_STDERR_CAP = 16 * 1024
_KILL_TIMEOUT_S = 10.0
_DRAIN_TIMEOUT_S = 2.0
_RMDIR_TIMEOUT_S = 2.0
# Sandboxes kept parked, each on a free uid slot in fresh cgroups (see the module docstring).
_PARKED_LAUNCHERS = 4
# A launcher's pipes: its stdin (the job's script, read by the waiting shell), files bwrap
# copies in, and its stdout, stderr and bwrap's status (read by the engine).
_LAUNCHER_PIPES = ("go", "passwd", "group", "out", "err", "status")
# The staging tmpfs holds empty files and directories only (mount points).
_STAGE_TMPFS = "size=1m,nr_inodes=65536,mode=0755"
_SCRATCH_TMPFS = "size=64k,nr_inodes=4096,mode=0700"
# The slot's staging directories bound into its sandbox, and where; the job's tmpfs are
# mounted on the latter two.
_SLOT_BINDS = (("data", "/data"), ("tmp", "/tmp"), ("shm", "/dev/shm"))
_SLOT_TMPFS = ("tmp", "shm")
# An image job's root file system, bound (read-only) on the slot's staging directory of this
# name before its sandbox is built: the image cache may sit in a root-only directory.
_SLOT_ROOT = "root"
# Parked cgroups' names start with a character no job id starts with; the engine's pid and a
# count make them unique (two Sandbox objects may share a cgroup parent).
_PARK_PREFIX = "_park-"
_park_ids = itertools.count()
# The launcher joins the cgroups named by its arguments and execs the rest of its arguments.
_LAUNCHER_SCRIPT = (
    'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 125; shift; '
    'n=$((n - 1)); done; exec "$@"'
)
# Inside the sandbox, as the job uid: reads the job's script (see _job_script) from stdin to its
# end, lets go of the pipe and runs it. Without a script (the engine closed the pipe), it ends.
_WAITER_SCRIPT = 's=; while IFS= read -r line; do s="$s$line\n"; done; exec </dev/null; eval "$s"'
# A network job's shell first says it is up, one byte on its stdout that the engine reads before
# the job's: bwrap has set the namespaces up (its loopback too), and slirp4netns, which touches
# the loopback as it configures the network, cannot race it.
_NETWORK_WAITER_SCRIPT = "printf .; " + _WAITER_SCRIPT
_DISK_SCAN_LIMIT = 10_000
_SMOKE_TIMEOUT_S = 30.0
_CHAIN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
_DEFAULT_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/tmp",
    "TMPDIR": "/tmp",
    "LANG": "C.UTF-8",
}
# An image's own environment comes between the defaults and the job's, but for these: /tmp is
# the only place the job can write, whatever the image says.
_SANDBOX_ENV = ("HOME", "TMPDIR")
# Inside an image job's root: where the host's static busybox is bound, the shell that waits for
# the job's script (an image may have no shell of its own), and every path the sandbox mounts
# something on. The image cache makes them, root-owned and never links, when it unpacks an image:
# the sandbox cannot create them in a read-only root.
IMAGE_SHELL = "/.c2d/sh"
IMAGE_MOUNT_DIRS = ("/.c2d", "/data", "/tmp", "/proc", "/dev", "/dev/shm", "/etc")
IMAGE_MOUNT_FILES = (IMAGE_SHELL, "/etc/passwd", "/etc/group", "/etc/resolv.conf")
# Texts of the errno values a full disk or the file-size limit produce (strerror and Python's
# OSError both print them); the algorithm's own output is only a hint, see _classify.
_DISK_FULL_MARKERS = (b"No space left on device", b"File too large", b"Disk quota exceeded")
# /etc files a Python runtime uses when the job may reach the network; its resolv.conf is its
# own (the host's may name a resolver on the host's loopback, out of the job's reach).
_NETWORK_ETC = ("hosts", "nsswitch.conf", "host.conf", "gai.conf", "ssl")
# slirp4netns' network, as the job sees it: its defaults (10.0.2.100 the job, 10.0.2.2 the
# gateway, 10.0.2.3 the DNS relay).
_SLIRP_NETWORK = ipaddress.ip_network("10.0.2.0/24")
_RESOLV_CONF = b"nameserver 10.0.2.3\n"
_SLIRP_OPTIONS = (
    "--configure",
    "--mtu=65520",
    "--disable-host-loopback",
    "--enable-sandbox",
    "--enable-seccomp",
)
# slirp4netns counts against the job's process limit like the chain: itself, and the child it
# configures the namespace with, until it is ready.
_NETWORK_PROCESSES = 2
_NETWORK_SETUP_TIMEOUT_S = 10.0
_NETWORK_STDERR_CAP = 4096


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
    `network=True` connects the job's network namespace to the outside, never to the host's
    own addresses (see the module docstring): the engine passes it only when the dataset and
    the environment both allow network access."""

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
class ImageRoot:
    """A container image's root file system that a job runs in instead of the host's runtime:
    `rootfs` (prepared by the image cache: see IMAGE_MOUNT_DIRS), the image's own environment
    variables, and `shell`, a static busybox on the host that waits for the job's script."""

    rootfs: Path
    env: Mapping[str, str]
    shell: Path


def is_env_variable(name: str, value: str) -> bool:
    """Whether a sandbox takes `name=value` into a job's environment (its spec's or its
    image's): a plain name, and no NUL byte in the value."""
    return _ENV_NAME_RE.fullmatch(name) is not None and "\0" not in value


@dataclass(frozen=True)
class SandboxSpec:
    job_id: str
    mounts: Sequence[Mount]
    argv: Sequence[str]
    env: Mapping[str, str]
    limits: Limits
    # None: the host's read-only runtime (/usr), in a sandbox parked ahead of time.
    image: ImageRoot | None = None


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
    slirp4netns: str = "slirp4netns"


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
        # Plain strings on a job's path: pathlib costs more than the system calls here.
        self._parents = [str(parent) for parent in self.parents]
        self._swap_file: str | None = None  # found by limit(), once

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
                    os.rmdir(path)
        if _swap_enabled() and not self._swap_limitable():
            raise SandboxUnavailable(
                "swap is on but the memory cgroup cannot limit it "
                "(boot with swapaccount=1 or turn swap off)"
            )

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

    # A group is a job id, or the name of a parked launcher's groups (see _Launcher).

    def dirs(self, group: str) -> list[str]:
        return [f"{parent}/{group}" for parent in self._parents]

    def procs_files(self, group: str) -> list[str]:
        return [f"{parent}/{group}/cgroup.procs" for parent in self._parents]

    def exists(self, group: str) -> bool:
        return any(os.path.exists(d) for d in self.dirs(group))

    def create(self, group: str, limits: Limits) -> None:
        self.make(group)
        self.limit(group, limits)

    def make(self, group: str, *, parked: bool = False) -> None:
        """Creates the groups; `parked` ones get the least CPU weight, so that building a
        sandbox for later yields to the jobs running now (limit() gives a job the default)."""
        try:
            for d in self.dirs(group):
                os.mkdir(d, 0o755)
        except FileNotFoundError:
            self.ensure_parents()
            for d in self.dirs(group):
                with contextlib.suppress(FileExistsError):
                    os.mkdir(d, 0o755)
        if parked:
            self._weigh(group, parked=True)

    def _weigh(self, group: str, *, parked: bool) -> None:
        if self.v2:
            _write(f"{self.dirs(group)[0]}/cpu.weight", 1 if parked else 100)
        else:
            _write(f"{self.dirs(group)[2]}/cpu.shares", 2 if parked else 1024)

    def rename(self, group: str, new: str) -> str:
        """Renames the groups (cgroup v1 allows it within a parent, v2 does not); returns the
        name they have afterwards, `group` when they could not all be renamed."""
        done: list[str] = []
        try:
            for parent in self._parents:
                os.rename(f"{parent}/{group}", f"{parent}/{new}")
                done.append(parent)
        except OSError:
            for parent in done:
                with contextlib.suppress(OSError):
                    os.rename(f"{parent}/{new}", f"{parent}/{group}")
            return group
        return new

    def limit(self, group: str, limits: Limits) -> None:
        quota = max(_MIN_CPU_QUOTA_US, int(limits.cpus * _CPU_PERIOD_US))
        pids = limits.max_processes + _CHAIN_PROCESSES
        if limits.network:
            pids += _NETWORK_PROCESSES
        if self._swap_file is None:
            # memory+swap: without its limit a job could spill past its memory into swap.
            name = "memory.swap.max" if self.v2 else "memory.memsw.limit_in_bytes"
            self._swap_file = name if os.path.exists(f"{self.dirs(group)[0]}/{name}") else ""
        if self.v2:
            d = self.dirs(group)[0]
            _write(f"{d}/memory.max", limits.memory_bytes)
            if self._swap_file:
                _write(f"{d}/{self._swap_file}", 0)
            _write(f"{d}/pids.max", pids)
            _write(f"{d}/cpu.max", f"{quota} {_CPU_PERIOD_US}")
        else:
            memory, pids_dir, cpu = self.dirs(group)
            _write(f"{memory}/memory.limit_in_bytes", limits.memory_bytes)
            if self._swap_file:
                _write(f"{memory}/{self._swap_file}", limits.memory_bytes)
            _write(f"{pids_dir}/pids.max", pids)
            _write(f"{cpu}/cpu.cfs_period_us", _CPU_PERIOD_US)
            _write(f"{cpu}/cpu.cfs_quota_us", quota)
        self._weigh(group, parked=False)

    def limit_processes(self, group: str, pids: int) -> None:
        _write(f"{self.dirs(group)[0 if self.v2 else 1]}/pids.max", pids)

    def counters(self, group: str) -> _Counters:
        if self.v2:
            d = self.dirs(group)[0]
            memory_events = _read_keyed(f"{d}/memory.events")
            return _Counters(
                oom_kills=memory_events.get("oom_kill", 0),
                memory_limit_hits=memory_events.get("max", 0),
                pids_limit_hits=_read_keyed(f"{d}/pids.events").get("max", 0),
            )
        memory, pids_dir, _ = self.dirs(group)
        oom = _read_keyed(f"{memory}/memory.oom_control")
        return _Counters(
            oom_kills=oom.get("oom_kill"),
            memory_limit_hits=int(_read_bytes(f"{memory}/memory.failcnt")),
            pids_limit_hits=_read_keyed(f"{pids_dir}/pids.events").get("max", 0),
        )

    def pids(self, group: str) -> set[int]:
        found: set[int] = set()
        for procs in self.procs_files(group):
            with contextlib.suppress(FileNotFoundError):
                found.update(int(line) for line in _read_bytes(procs).split())
        return found

    def member_paths(self, group: str) -> set[str]:
        """The paths /proc/<pid>/cgroup shows for a member of the groups."""
        return {f"/{self.name}/{group}"}

    def joined(self, pid: int, group: str) -> bool:
        """Whether `pid` is in every one of the groups (the last of its joins is done)."""
        path = f"/{self.name}/{group}".encode()
        try:
            lines = _read_bytes(f"/proc/{pid}/cgroup").splitlines()
        except OSError:
            return False
        return sum(line.split(b":", 2)[-1] == path for line in lines) >= len(self.parents)

    def kill_switch(self, group: str) -> bool:
        """v2's atomic kill of the whole group (kernel 5.14+); False when unavailable."""
        if not self.v2:
            return False
        try:
            _write(f"{self.dirs(group)[0]}/cgroup.kill", 1)
        except OSError:
            return False
        return True

    def remove(self, group: str) -> bool:
        removed = True
        for d in self.dirs(group):
            try:
                os.rmdir(d)
            except FileNotFoundError:
                pass
            except OSError:
                removed = False
        return removed

    def leftovers(self) -> set[str]:
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


def _write(path: str | Path, value: object) -> None:
    # One write(2) per value: cgroup files act on each write, not on close.
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, str(value).encode())
    finally:
        os.close(fd)


def _read_keyed(path: str | Path) -> dict[str, int]:
    values: dict[str, int] = {}
    with contextlib.suppress(FileNotFoundError):
        for line in _read_bytes(path).decode().splitlines():
            key, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                values[key] = int(value)
    return values


def _read_bytes(path: str | Path) -> bytes:
    """A kernel file (cgroup, /proc) to its end, by plain reads: a fraction of the cost of
    Path.read_text, which counts on a job's path. (Such files may return less than asked
    before their end: only an empty read ends them.)"""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, _READ_CHUNK):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


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


async def _exits(pidfds: Sequence[int], within: float) -> None:
    """Waits until every pidfd is readable (its process has exited), or the timeout."""
    loop = asyncio.get_running_loop()
    waiting: list[tuple[int, asyncio.Future[None]]] = []
    for pidfd in pidfds:
        future: asyncio.Future[None] = loop.create_future()
        loop.add_reader(pidfd, _settle, future)
        waiting.append((pidfd, future))
    try:
        await asyncio.wait([f for _, f in waiting], timeout=within)
    finally:
        for pidfd, _ in waiting:
            loop.remove_reader(pidfd)


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _exited(pidfd: int) -> bool:
    """Whether the process of a pidfd has exited (without waiting)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def _in_cgroup(paths: set[str]) -> Callable[[int], bool]:
    encoded = {path.encode() for path in paths}

    def belongs(pid: int) -> bool:
        try:
            lines = _read_bytes(f"/proc/{pid}/cgroup").splitlines()
        except OSError:
            return False
        return any(line.split(b":", 2)[-1] in encoded for line in lines)

    return belongs


def _uids_of(pid: int) -> set[int]:
    """The real, effective, saved and filesystem uids of a process (empty if gone, or a zombie:
    it has ended and waits for its parent, which may be the host's init, to reap it)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"State:") and b"Z" in line:
                    return set()
                if line.startswith(b"Uid:"):
                    return {int(v) for v in line.split()[1:]}
    except OSError:
        pass
    return set()


def processes_of_uids(uids: Collection[int]) -> list[int]:
    """Pids of the host's processes running with any uid in `uids` (a check that a job left
    nothing behind)."""
    found: list[int] = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and any(u in uids for u in _uids_of(int(entry.name))):
            found.append(int(entry.name))
    return found


# -- the staging mounts and argument lists ---------------------------------------------------


class _Stage:
    """The staging root: ``slots/<slot>/{data,tmp,shm}``, bound into each slot's sandbox, on a
    tmpfs with shared propagation; ``scratch``, a private tmpfs where a bind is made read-only
    before it moves into ``slots``. Mounted by the engine in its own mount namespace (the
    host's), which the parked sandboxes were started from."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.slots = root / "slots"
        self.scratch = root / "scratch"
        self.ready = False

    def ensure(self) -> None:
        """set_up(), unless this object has done it already."""
        if not self.ready:
            self.set_up()

    def set_up(self) -> None:
        """Mounts both tmpfs, after detaching what a crashed engine left."""
        self.tear_down()
        os.makedirs(self.root, mode=0o755, exist_ok=True)
        for path, options, propagation in (
            (self.slots, _STAGE_TMPFS, mounts.MS_SHARED),
            (self.scratch, _SCRATCH_TMPFS, mounts.MS_PRIVATE),
        ):
            path.mkdir(mode=0o755, exist_ok=True)
            mounts.mount("c2d-stage", path, "tmpfs", mounts.MS_NOSUID | mounts.MS_NODEV, options)
            # Its own peer group (shared) or none (private), whatever its parent's is.
            mounts.mount(None, path, None, propagation)
        self.ready = True

    def tear_down(self) -> None:
        """Detaches every staging mount (jobs' included) and removes the empty directories."""
        for point in reversed(mounts.mounted_under(self.root)):
            mounts.unmount(point)
        for path in (self.slots, self.scratch, self.root):
            with contextlib.suppress(FileNotFoundError):
                path.rmdir()
        self.ready = False

    def slot_dir(self, slot: int) -> Path:
        return self.slots / str(slot)

    def prepare_slot(self, slot: int) -> Path:
        """The slot's empty staging directories, root-owned and traversable."""
        top = self.slot_dir(slot)
        for path in (top, *(top / name for name, _ in _SLOT_BINDS)):
            with contextlib.suppress(FileExistsError):
                path.mkdir()
            os.chmod(path, 0o755)  # noqa: S103 (the job uid traverses them)
        return top

    def mount_job(
        self, slot: int, uid: int, job_mounts: Sequence[Mount], limits: Limits
    ) -> list[str]:
        """Mounts the job's /tmp and /dev/shm and its inputs on the slot's staging directories;
        returns the sandbox paths of read-only inputs not readable by others (so not by the
        job's uid either). Raises _SpecError for a source that is not what its mount needs.
        On any error, what was mounted is detached again."""
        top = self.slot_dir(slot)
        size = max(4096, limits.disk_bytes)
        tmpfs = f"size={size},mode=0700,uid={uid},gid={uid}"
        unreadable = []
        try:
            for name in _SLOT_TMPFS:
                mounts.mount("c2d-job", top / name, "tmpfs", _JOB_MOUNT_FLAGS, tmpfs)
            for index, mount in enumerate(job_mounts):
                mode = self._bind(top / "data", f"{slot}-{index}", mount)
                if not mount.writable and not mode & stat.S_IROTH:
                    unreadable.append(mount.sandbox_path)
        except BaseException:
            self.unmount_job(slot)
            raise
        return unreadable

    def _bind(self, data: Path, scratch_name: str, mount: Mount) -> int:
        """Binds one source at its place below `data`; returns the source's mode."""
        info = os.stat(mount.host_path)
        is_dir = stat.S_ISDIR(info.st_mode)
        if not (is_dir or (stat.S_ISREG(info.st_mode) and not mount.writable)):
            kind = "a directory" if mount.writable else "a regular file or a directory"
            raise _SpecError(f"the source of {mount.sandbox_path} is not {kind}")
        target = data / mount.sandbox_path.removeprefix("/data/")
        _make_points(data, target, is_dir)
        self._move_bind(mount.host_path, target, scratch_name, is_dir, mount.writable)
        return info.st_mode

    def _move_bind(
        self, source: Path, target: Path, scratch_name: str, is_dir: bool, writable: bool
    ) -> None:
        """Binds `source` on `target` (which exists) with the job mounts' flags, made on the
        private scratch first so that it never shows there with other flags."""
        scratch = self.scratch / scratch_name
        _make_points(self.scratch, scratch, is_dir)
        try:
            mounts.mount(source, scratch, None, mounts.MS_BIND)
            flags = _JOB_MOUNT_FLAGS | (0 if writable else mounts.MS_RDONLY)
            mounts.mount(None, scratch, None, mounts.MS_BIND | mounts.MS_REMOUNT | flags)
            mounts.mount(scratch, target, None, mounts.MS_MOVE)
        finally:
            mounts.unmount(scratch)  # still there only when the move failed
            _remove_point(scratch)

    def mount_root(self, slot: int, rootfs: Path) -> None:
        """Binds an image's root file system, read-only, nosuid and nodev, on the slot's root
        directory, where the job's bwrap takes it from: the job uid could not reach it in the
        image cache. unmount_job detaches it."""
        self.ensure()
        target = self.prepare_slot(slot) / _SLOT_ROOT
        with contextlib.suppress(FileExistsError):
            target.mkdir()
        os.chmod(target, 0o755)  # noqa: S103 (the job uid's bwrap traverses it)
        self._move_bind(rootfs, target, f"{slot}-root", is_dir=True, writable=False)

    def unmount_job(self, slot: int) -> bool:
        """Detaches the job's mounts and empties the slot's staging directories again; False
        when something could not be removed (the slot is then not parked again)."""
        top = self.slot_dir(slot)
        ok = True
        for point in reversed(mounts.mounted_under(top)):
            try:
                mounts.unmount(point)
            except OSError:
                ok = False
        for root, dirs, files in os.walk(top / "data", topdown=False):
            for name in files:
                ok = _remove_point(Path(root) / name) and ok
            for name in dirs:
                ok = _remove_point(Path(root) / name) and ok
        return ok


_JOB_MOUNT_FLAGS = mounts.MS_NOSUID | mounts.MS_NODEV


def _make_points(base: Path, target: Path, is_dir: bool) -> None:
    """Creates `target` (an empty directory or file) and its missing parents below `base`,
    root-owned and readable, whatever the engine's umask."""
    missing = []
    parent = target.parent
    while parent != base and not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for path in reversed(missing):
        path.mkdir()
        os.chmod(path, 0o755)  # noqa: S103 (the job uid traverses them)
    if is_dir:
        target.mkdir()
        os.chmod(target, 0o755)  # noqa: S103
    else:
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444))


def _remove_point(path: Path) -> bool:
    """Removes an empty mount point; never recursive (one still mounted is left alone)."""
    try:
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        else:
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return True


def _identity_files(uid: int, gid: int) -> tuple[bytes, bytes]:
    """/etc/passwd and /etc/group for the job: some programs look their uid up; in the job's
    user namespace only its uid is mapped, everything else shows as the overflow id 65534."""
    passwd = (
        f"c2d:x:{uid}:{gid}:compute job:/tmp:/usr/sbin/nologin\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
    )
    return passwd.encode(), f"c2d:x:{gid}:\nnogroup:x:65534:\n".encode()


class _SpecError(Exception):
    """A mount the sandbox cannot set up; the message names sandbox paths only."""


@dataclass(frozen=True)
class _Tools:
    sh: str
    bwrap: str
    setpriv: str


@dataclass(frozen=True)
class _NetworkTools:
    slirp4netns: str
    nsenter: str
    ip: str


def _launcher_argv(
    tools: _Tools,
    *,
    procs_files: Sequence[str],
    uid: int,
    gid: int,
    slot_dir: Path,
    network: bool,
    fds: Mapping[str, int],
    image: ImageRoot | None = None,
) -> list[str]:
    """The launch chain's command line (see the module docstring); `fds` are the launcher's
    ends of its pipes. An image job's root is the slot's root directory (see
    _Stage.mount_root), with the image's own files instead of the host's runtime."""
    # Step 1: --pdeathsig: a parked sandbox dies with the engine (the engine is the parent;
    # exec keeps the signal until the uid changes). Positional parameters carry the cgroup
    # files; nothing is interpolated.
    chain = [tools.setpriv, "--pdeathsig=SIGKILL", "--"]
    chain += [tools.sh, "-c", _LAUNCHER_SCRIPT, "c2d-launch", str(len(procs_files))]
    chain += [str(p) for p in procs_files]

    # Step 2: the job's identity. --pdeathsig again because the uid change clears it.
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

    # Step 3: bwrap. --remount-ro / follows every mount (bwrap creates mount points in its
    # root tmpfs); the staging directories stay writable binds so that the job's own mounts,
    # arriving later, keep their own flags (they are root-owned: the job cannot write there).
    chain += [
        tools.bwrap,
        "--unshare-all",
        "--unshare-user",
        "--disable-userns",
        "--die-with-parent",
        "--new-session",
        "--clearenv",
        "--hostname",
        "c2d",
        "--json-status-fd",
        str(fds["status"]),
    ]
    if image is not None:
        # First: every later mount lands on it, on the mount points the cache made.
        chain += ["--ro-bind", str(slot_dir / _SLOT_ROOT), "/"]
    chain += [
        "--perms",
        "0444",
        "--ro-bind-data",
        str(fds["passwd"]),
        "/etc/passwd",
        "--perms",
        "0444",
        "--ro-bind-data",
        str(fds["group"]),
        "/etc/group",
    ]
    if network:
        # The network namespace stays the job's own (--unshare-all): the engine attaches
        # slirp4netns to it before the job's script is sent.
        # An image has its own /etc: only its resolv.conf is the job's.
        chain += [*(_network_options() if image is None else ()), "--perms", "0444"]
        chain += ["--ro-bind-data", str(fds["resolv"]), "/etc/resolv.conf"]
    if image is None:
        chain += _runtime_options()
    else:
        chain += ["--ro-bind", str(image.shell), IMAGE_SHELL]
    chain += ["--proc", "/proc", "--dev", "/dev"]
    for name, sandbox_path in _SLOT_BINDS:
        chain += ["--bind", str(slot_dir / name), sandbox_path]
    # /dev itself is a tmpfs without size: read-only, with /dev/shm the job's capped tmpfs.
    chain += ["--remount-ro", "/dev", "--remount-ro", "/", "--chdir", "/", "--"]
    # Step 4: the shell that waits for the job's script (busybox's ash in an image: its argv[0]
    # ends in "sh").
    shell = "/bin/sh" if image is None else IMAGE_SHELL
    chain += [shell, "-c", _NETWORK_WAITER_SCRIPT if network else _WAITER_SCRIPT, "sh"]
    return chain


def _job_script(
    argv: Sequence[str],
    env: Mapping[str, str],
    limits: Limits,
    image_env: Mapping[str, str] | None = None,
) -> bytes:
    """What the waiting shell runs: the limits, the environment, then the algorithm. Every
    value is single-quoted; the job's variables come after the defaults and the image's, which
    they may override (the image's PATH, when it has one, finds the algorithm's program)."""
    variables = {**_DEFAULT_ENV}
    if image_env:
        variables.update((k, v) for k, v in image_env.items() if k not in _SANDBOX_ENV)
    variables.update(env)
    # ulimit -f counts 512-byte blocks; dash sets soft and hard: the job cannot raise them.
    lines = [
        f"ulimit -c 0 && ulimit -f {max(0, limits.disk_bytes // 512)} || exit 125",
        "export " + " ".join(shlex.quote(f"{name}={value}") for name, value in variables.items()),
        "exec " + " ".join(shlex.quote(arg) for arg in argv) + " 2>&1",
    ]
    return "".join(line + "\n" for line in lines).encode()


@functools.cache
def _runtime_options() -> tuple[str, ...]:
    """The read-only runtime: /usr and what links into it (the host's layout, looked at
    once)."""
    options = ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        if os.path.isdir(f"/usr/{name}"):
            options += ["--symlink", f"usr/{name}", f"/{name}"]
    if os.path.exists("/etc/ld.so.cache"):
        options += ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    return tuple(options)


@functools.cache
def _network_options() -> tuple[str, ...]:
    options: list[str] = []
    for name in _NETWORK_ETC:
        if os.path.exists(f"/etc/{name}"):
            options += ["--ro-bind", f"/etc/{name}", f"/etc/{name}"]
    return tuple(options)


def _find_programs(*names: str) -> list[str]:
    found = []
    for name in names:
        # A fixed search path: the engine's own PATH must not choose what runs as root.
        path = shutil.which(name, path=_CHAIN_PATH)
        if path is None:
            raise SandboxUnavailable(f"{name} is not installed (or not executable)")
        found.append(os.path.abspath(path))
    return found


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
    if limits.memory_bytes < MIN_MEMORY_BYTES:
        raise ValueError(f"memory_bytes must be at least {MIN_MEMORY_BYTES}")
    if not spec.argv:
        raise ValueError("argv is empty")
    if any("\0" in arg for arg in spec.argv):
        raise ValueError("an argument holds a NUL byte")
    for name, value in spec.env.items():
        if not is_env_variable(name, value):
            raise ValueError(f"bad environment variable {name!r}")
    if spec.image is not None:
        if not (spec.image.rootfs.is_absolute() and spec.image.shell.is_absolute()):
            raise ValueError("an image's rootfs and shell must be absolute paths")
        for name, value in spec.image.env.items():
            if not is_env_variable(name, value):
                raise ValueError(f"bad environment variable {name!r} in the image")
    seen: set[str] = set()
    for mount in spec.mounts:
        path = mount.sandbox_path
        if not path.startswith("/data/") or posixpath.normpath(path) != path or "\0" in path:
            raise ValueError(f"sandbox_path must be a normalised path under /data/: {path!r}")
        if path in seen:
            raise ValueError(f"two mounts at {path}")
        seen.add(path)
    for path in seen:
        # Its mount point would have to be made inside another mount's host directory.
        if any(path.startswith(other + "/") for other in seen):
            raise ValueError(f"a mount inside another mount: {path}")


# -- the job's network -----------------------------------------------------------------------


_LINK_LOCAL = ipaddress.ip_network("169.254.0.0/16")


def _host_addresses(ip_json: bytes) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The addresses of the host's own interfaces (and their broadcast addresses) in `ip -j
    addr` output, but loopback, which inside the job is its own, and slirp4netns' network."""
    found: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    for link in json.loads(ip_json):
        for info in link.get("addr_info", []):
            for key in ("local", "broadcast"):
                with contextlib.suppress(TypeError, ValueError):
                    address = ipaddress.ip_address(info.get(key))
                    if not (address.is_loopback or address in _SLIRP_NETWORK):
                        found.add(address)
    return sorted(found, key=lambda a: (a.version, a))


async def _ip_addresses(tools: _NetworkTools) -> bytes:
    code, out, err = await _run_tool([tools.ip, "-j", "address", "show"])
    if code != 0:
        raise OSError(f"ip address show failed: {err.decode(errors='replace').strip()[:300]}")
    return out


def _unreachable_routes(
    addresses: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address],
) -> bytes:
    """`ip -batch` lines that make each address, and the link-local range, unreachable from
    the namespace they run in."""
    lines = [f"route add unreachable {a}/{a.max_prefixlen}\n" for a in addresses]
    # A cloud's metadata service (169.254.169.254) hands out the machine's credentials.
    lines.append(f"route add unreachable {_LINK_LOCAL}\n")
    return "".join(lines).encode()


async def _run_tool(
    argv: Sequence[str], stdin: bytes = b"", pass_fds: Sequence[int] = ()
) -> tuple[int, bytes, bytes]:
    """Runs a short root tool (ip, nsenter) to its end off the event loop's back: its status,
    stdout and stderr. Cancelled, it kills the tool."""
    pipes = [os.pipe() for _ in range(3)]
    (in_read, in_write), (out_read, out_write), (err_read, err_write) = pipes
    try:
        # A fork and exec, well under a millisecond; the tool's end is awaited on its pipes.
        popen = subprocess.Popen(  # noqa: ASYNC220
            argv,
            stdin=in_read,
            stdout=out_write,
            stderr=err_write,
            pass_fds=pass_fds,
            env={"PATH": _CHAIN_PATH},
            start_new_session=True,
        )
    except BaseException:
        for fd in itertools.chain(*pipes):
            os.close(fd)
        raise
    for fd in (in_read, out_write, err_write):
        os.close(fd)

    async def send() -> None:
        nonlocal in_write
        # _send_rest closes the pipe, whatever happens: the tool reads its input to its end.
        fd, in_write = in_write, -1
        await _send_rest(fd, memoryview(stdin))

    async def collect(fd: int) -> bytes:
        data = bytearray()
        async for chunk in _read_chunks(fd):
            data += chunk
        return bytes(data)

    sending = asyncio.ensure_future(send())
    reading = [asyncio.ensure_future(collect(fd)) for fd in (out_read, err_read)]
    try:
        await sending
        out, err = await asyncio.gather(*reading)
        # Both pipes at their end: the tool has let go of them, as it exits.
        return popen.wait(), out, err
    finally:
        # The tasks must have let go of the pipes (remove_reader) before they close.
        for task in (sending, *reading):
            task.cancel()
        await asyncio.gather(sending, *reading, return_exceptions=True)
        for fd in (in_write, out_read, err_read):
            if fd >= 0:
                os.close(fd)
        if popen.poll() is None:
            popen.kill()
            popen.wait()


# -- the result ------------------------------------------------------------------------------


def _exit_code(status: int) -> int:
    # bwrap reports a death by signal N as exit status 128 + N.
    if 128 < status < 128 + 65:
        return -(status - 128)
    return status


def _parse_status(data: bytes) -> tuple[bool, int | None]:
    """(bwrap started its child, the child's exit status if it reported one).
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
    configured range; up to _PARKED_LAUNCHERS free ones have a launcher parked (see the
    module docstring), started by sweep() and after each job's start, ended by close()."""

    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self._cgroups = _Cgroups(config.cgroup_root, config.cgroup_name)
        self._tools: _Tools | None = None
        self._network_tools: _NetworkTools | None = None  # found by check_network()
        # A uid slot is free, parked (a launcher waits on it), running, or quarantined.
        self._free_slots = list(range(config.uid_count))
        self._parked: list[_Launcher] = []
        self._running: dict[str, int] = {}
        self._groups: dict[str, str] = {}  # running job -> the name of its cgroups
        self._cancels: dict[str, asyncio.Event] = {}
        self._removals: set[asyncio.Future[bool]] = set()
        self._removing: set[str] = set()  # cgroups of retired launchers, being removed
        self._closed = False  # by close(): no launcher is parked until sweep()
        self._stage = _Stage(config.stage_root)
        self._uid_lock = -1  # see _claim_uid_range

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
        try:
            self._cgroups.check()
            self._smoke_test(tools)
        except BaseException:
            self._stage.tear_down()
            raise
        self._tools = tools

    def _find_tools(self) -> _Tools:
        return _Tools(*_find_programs("/bin/sh", self.config.bwrap, "setpriv"))

    def _find_network_tools(self) -> _NetworkTools:
        return _NetworkTools(*_find_programs(self.config.slirp4netns, "nsenter", "ip"))

    async def check_network(self) -> None:
        """Verifies, after check(), that a job allowed the network gets it filtered: finds
        slirp4netns, nsenter and ip, then runs a job that must see its tap device and find
        every address of the host unreachable. Raises SandboxUnavailable otherwise."""
        tools = self._network_tools = self._find_network_tools()
        addresses = [
            str(a) for a in _host_addresses(await _ip_addresses(tools)) if not a.is_link_local
        ]
        code = (
            "import json, socket, sys\n"
            "def reach(address):\n"
            "    family = socket.AF_INET6 if ':' in address else socket.AF_INET\n"
            "    with socket.socket(family) as s:\n"
            "        s.settimeout(5)\n"
            "        try:\n            s.connect((address, 9)); return 0\n"
            "        except OSError as e:\n            return e.errno\n"
            "print(json.dumps([[n for _, n in socket.if_nameindex()], "
            "[reach(a) for a in sys.argv[1:]]]))"
        )
        output = bytearray()

        async def collect(chunk: bytes) -> None:
            output.extend(chunk)

        limits = Limits(1.0, 64 << 20, 1 << 20, 8, _SMOKE_TIMEOUT_S, network=True)
        spec = SandboxSpec(
            job_id=f"network-check-{os.getpid()}",
            mounts=[],
            argv=[self.config.runtime_python, "-I", "-c", code, *addresses],
            env={},
            limits=limits,
        )
        result = await self.run(spec, collect)
        message = output.decode(errors="replace").strip()
        try:
            interfaces, errors = json.loads(output)
        except ValueError:
            interfaces, errors = [], []
        if result.outcome is not Outcome.OK or "tap0" not in interfaces:
            detail = result.detail or message[:500]
            raise SandboxUnavailable(f"a job's filtered network does not start: {detail}")
        if len(errors) != len(addresses):
            raise SandboxUnavailable(f"the network check's job printed {message[:500]!r}")
        reached = [a for a, e in zip(addresses, errors, strict=True) if e != errno.EHOSTUNREACH]
        if reached:
            raise SandboxUnavailable(
                f"a job's network reaches the host's own addresses: {', '.join(reached[:5])}"
            )

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
        self._claim_uid_range()

    def _claim_uid_range(self) -> None:
        """Holds a lock on this engine's uids for as long as it lives: two engines sharing a
        uid would each take the other's processes for strays to kill (a sweep kills every
        process of its uids but its own parked sandboxes). An open-file-description lock on
        the byte range [uid_base, uid_base + uid_count) of one file, so that ranges that
        merely overlap clash too, and the kernel drops it when the engine dies."""
        if self._uid_lock >= 0:
            return
        fd = os.open(_UID_LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        lock = struct.pack(
            _FLOCK, fcntl.F_WRLCK, os.SEEK_SET, self.config.uid_base, self.config.uid_count, 0
        )
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, lock)
        except OSError as error:
            os.close(fd)
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise SandboxUnavailable(f"cannot lock the job uid range: {error}") from None
            base, count = self.config.uid_base, self.config.uid_count
            raise SandboxUnavailable(
                f"job uid range {base}..{base + count - 1} is in use by another engine on this "
                "machine; give each engine its own C2D_SANDBOX_UID_BASE"
            ) from None
        self._uid_lock = fd

    def _check_stage_root(self) -> None:
        root = self.config.stage_root
        try:
            root.mkdir(mode=0o755, parents=True, exist_ok=True)
            os.chmod(root, 0o755)  # noqa: S103 (the job uids traverse it)
        except OSError as error:
            raise SandboxUnavailable(f"cannot create the staging root {root}: {error}") from None
        # The job uid's bwrap walks to its slot's directories through every ancestor.
        for path in [root, *root.parents]:
            info = os.stat(path)
            if not info.st_mode & stat.S_IXOTH:
                raise SandboxUnavailable(f"{path} is not traversable by the job uids")
            foreign = info.st_uid != 0 or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
            # A sticky ancestor (/tmp) is fine: nobody else can replace what root made in it.
            if foreign and not (info.st_mode & stat.S_ISVTX and path != root):
                raise SandboxUnavailable(f"{path} is writable by others than root")
        try:
            self._stage.set_up()
        except OSError as error:
            raise SandboxUnavailable(f"cannot mount the staging tmpfs on {root}: {error}") from None

    def _smoke_test(self, tools: _Tools) -> None:
        """Runs the whole launch chain once (without cgroups): proves that unprivileged user
        namespaces are allowed, that bwrap knows every option used, that mounts made after
        the sandbox was built reach it, read-only, even from a root-only directory, that the
        runtime works as the job uid with the file-size and core limits set, and that the
        algorithm gets its arguments as they were given."""
        uid = self.config.uid_base
        limits = Limits(1.0, 64 << 20, 1 << 20, 8, 10.0)
        args = ["a b", "", "$HOME", "'\"\\", "x\ny", "*", "$(id)"]
        code = (
            "import json, os, pwd, resource as r, sys\n"
            "try:\n    open('/data/probe', 'a').write('x'); ro = False\n"
            "except OSError as e:\n    ro = e.errno == 30\n"
            "print(json.dumps([os.getuid(), pwd.getpwuid(os.getuid()).pw_name, "
            "*r.getrlimit(r.RLIMIT_FSIZE), *r.getrlimit(r.RLIMIT_CORE), sys.argv[1:], "
            "open('/data/probe').read(), ro, os.environ.get('PROBE')]))"
        )
        expected = [uid, "c2d", 1 << 20, 1 << 20, 0, 0, args, "probe", True, "x'y\nz"]
        # A world-writable file in a root-only directory: readable, never writable, inside.
        hidden = self.config.stage_root / "probe"
        hidden.mkdir(mode=0o700, exist_ok=True)
        probe = hidden / "input"
        probe.write_text("probe")
        probe.chmod(0o666)
        self._stage.prepare_slot(0)
        launcher = _Launcher.spawn(
            tools,
            slot=0,
            uid=uid,
            group="",
            procs_files=[],
            slot_dir=self._stage.slot_dir(0),
            network=False,
        )
        try:
            self._stage.mount_job(0, uid, [Mount(probe, "/data/probe")], limits)
            script = _job_script(
                [self.config.runtime_python, "-I", "-c", code, *args], {"PROBE": "x'y\nz"}, limits
            )
            pending = launcher.start(script)
            for fd, rest in pending:  # never: the script is small
                os.set_blocking(fd, True)
                os.write(fd, rest)
                os.close(fd)
            try:
                launcher.popen.wait(timeout=_SMOKE_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                launcher.popen.kill()
                launcher.popen.wait()
            out = _read_all(launcher.fds["out"])
            err = _read_all(launcher.fds["err"])
        except OSError as error:
            raise SandboxUnavailable(f"the job's mounts cannot be made: {error}") from None
        finally:
            launcher.close()
            self._stage.unmount_job(0)
            probe.unlink()
            hidden.rmdir()
        try:
            ok = launcher.popen.returncode == 0 and json.loads(out) == expected
        except ValueError:
            ok = False
        if not ok:
            message = err.decode(errors="replace").strip() or out.decode(errors="replace").strip()
            if "--disable-userns" in message or "Unknown option" in message:
                reason = "bwrap is too old (0.8 or later is needed for --disable-userns)"
            elif "namespace" in message or "Operation not permitted" in message:
                reason = "unprivileged user namespaces are not permitted"
            else:
                reason = "the sandbox does not start"
            raise SandboxUnavailable(f"{reason}: {message[:500]}")

    async def sweep(self) -> None:
        """Kills and removes what a crashed engine left: job cgroups (its parked sandboxes'
        too, and network jobs' slirp4netns, which runs in them), staging mounts, and any
        process still running as a job uid but our own parked sandboxes. Then parks sandboxes
        for the next jobs."""
        log = _log
        ours = {launcher.group for launcher in self._parked} | set(self._groups.values())
        for group in sorted(self._cgroups.leftovers()):
            if group in self._running or group in ours:
                continue
            await self._kill_job(group)
            self._cgroups.remove(group)
            log.warning("sandbox.sweep.cgroup", job_id=group)
        self._stage.ensure()
        parked = {launcher.slot for launcher in self._parked}
        for slot in self._free_slots:
            if slot not in parked and not self._stage.unmount_job(slot):
                log.warning("sandbox.sweep.stage", slot=slot)
        stray = self._stray_uids()
        for pid in processes_of_uids(stray):
            _kill_if(pid, lambda p: bool(_uids_of(p) & stray))
            log.warning("sandbox.sweep.process", pid=pid)
        self._closed = False
        if self._tools is not None:
            self._refill()

    def _stray_uids(self) -> set[int]:
        """The job uids neither a running job nor a parked sandbox holds."""
        held = [*self._running.values(), *(launcher.slot for launcher in self._parked)]
        return set(self.uids) - {self.config.uid_base + slot for slot in held}

    def stray_processes(self) -> list[int]:
        """Processes running as a job uid that no running job or parked sandbox holds: left
        behind (what sweep() kills)."""
        return processes_of_uids(self._stray_uids())

    def close(self) -> None:
        """Ends the parked sandboxes, removes the parent cgroups and the staging mounts when no
        job is left in them (an engine stopping for good, or tests); a no-op for whatever is
        still in use. No launcher is parked again until sweep()."""
        self._closed = True
        while self._parked:
            self._retire(self._parked.pop(), wait=True)
        if self._uid_lock >= 0:
            os.close(self._uid_lock)  # the lock goes with it
            self._uid_lock = -1
        for group in list(self._removing):
            self._remove_groups_now(group)
        if not self._running:
            self._stage.tear_down()
        for path in self._cgroups.parents:
            with contextlib.suppress(OSError):
                path.rmdir()

    # -- parked launchers --------------------------------------------------------------------

    def _park(
        self,
        slot: int,
        group: str | None = None,
        *,
        network: bool = False,
        image: ImageRoot | None = None,
    ) -> _Launcher:
        """Starts a sandbox for `slot` in fresh cgroups of its own (an image job's on the image
        root already bound on the slot)."""
        assert self._tools is not None
        # Built for later at the least CPU weight; for a job waiting on it (which names its
        # group), at the job's.
        for_later = group is None
        group = group or f"{_PARK_PREFIX}{os.getpid()}-{next(_park_ids)}"
        self._stage.ensure()
        slot_dir = self._stage.prepare_slot(slot)
        self._cgroups.make(group, parked=for_later)
        try:
            return _Launcher.spawn(
                self._tools,
                slot=slot,
                uid=self.config.uid_base + slot,
                group=group,
                procs_files=self._cgroups.procs_files(group),
                slot_dir=slot_dir,
                network=network,
                image=image,
            )
        except BaseException:
            self._cgroups.remove(group)
            raise

    def _refill(self) -> None:
        """Parks launchers on free slots, up to _PARKED_LAUNCHERS: the cgroup joins and the
        launchers' start happen now, off the next jobs' path. On the event loop's thread (a
        fork and exec, well under a millisecond), never a worker thread: PR_SET_PDEATHSIG
        fires when the thread that forked the launcher ends, not the engine."""
        wanted = 0 if self._closed else min(_PARKED_LAUNCHERS, self.config.uid_count)
        while len(self._parked) < wanted and self._free_slots:
            slot = self._free_slots.pop(0)
            try:
                self._parked.append(self._park(slot))
            except (OSError, subprocess.SubprocessError) as error:
                self._free_slots.append(slot)
                self._free_slots.sort()
                _log.warning("sandbox.park_failed", error=str(error))
                return

    def _take_parked(self) -> _Launcher | None:
        """A parked launcher, one that has joined its cgroups first; dead ones are retired."""
        for launcher in [p for p in self._parked if not p.alive()]:
            self._parked.remove(launcher)
            self._retire(launcher, wait=False)
            _log.warning("sandbox.parked_launcher_died", status=launcher.popen.returncode)
        if not self._parked:
            return None
        # The oldest first: most likely to have joined already.
        launcher = next((p for p in self._parked if self._joined(p)), self._parked[0])
        self._parked.remove(launcher)
        return launcher

    def _joined(self, launcher: _Launcher) -> bool:
        if not launcher.joined:
            launcher.joined = self._cgroups.joined(launcher.pid, launcher.group)
        return launcher.joined

    def _retire(self, launcher: _Launcher, *, wait: bool) -> None:
        """Ends a parked sandbox, removes its cgroups and frees its slot; `wait` (closing)
        blocks until they are removed, otherwise a task finishes the removal. The whole
        cgroup is killed, not only the launcher: bwrap's child may not have asked for
        PR_SET_PDEATHSIG yet when a sandbox that was just parked is ended."""
        launcher.close()
        if wait:
            self._kill_group_now(launcher.group)
            self._remove_groups_now(launcher.group)
        else:
            self._removing.add(launcher.group)
            task = asyncio.ensure_future(self._end_group(launcher.group))
            self._removals.add(task)
            task.add_done_callback(self._removals.discard)
        self._free_slots.append(launcher.slot)
        self._free_slots.sort()

    async def _end_group(self, group: str) -> bool:
        await self._kill_job(group)
        return await self._remove_groups(group)

    def _kill_group_now(self, group: str) -> None:
        """_kill_job, blocking: only when closing, when no job runs."""
        deadline = time.monotonic() + _KILL_TIMEOUT_S
        belongs = _in_cgroup(self._cgroups.member_paths(group))
        self._cgroups.kill_switch(group)
        while (pids := self._cgroups.pids(group)) and time.monotonic() < deadline:
            for pid in pids:
                _kill_if(pid, belongs)
            time.sleep(0.001)

    async def _remove_groups(self, group: str) -> bool:
        """Removes emptied cgroups; a v1 memory group can refuse rmdir for a moment after
        its last task has gone. False when they are still there after _RMDIR_TIMEOUT_S."""
        deadline = time.monotonic() + _RMDIR_TIMEOUT_S
        pause = 0.0005
        while not self._cgroups.remove(group):
            if time.monotonic() > deadline:
                _log.error("sandbox.cgroup_left", group=group)
                return False
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.02)
        self._removing.discard(group)
        return True

    def _remove_groups_now(self, group: str) -> None:
        """_remove_groups, blocking: only when closing, when no job runs."""
        deadline = time.monotonic() + _RMDIR_TIMEOUT_S
        while not self._cgroups.remove(group) and time.monotonic() < deadline:
            time.sleep(0.001)
        self._removing.discard(group)

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
        steps = _Steps()
        _check_spec(spec)
        job_id = spec.job_id
        if job_id in self._running:
            raise ValueError(f"job {job_id} is already running")
        if self._tools is None:
            self._tools = self._find_tools()
        # A network job's sandbox is built for it (its resolv.conf, its network attached as it
        # starts), and so is an image job's (its root): none is parked for them.
        built = spec.limits.network or spec.image is not None
        launcher = None if built else self._take_parked()
        if launcher is not None:
            slot = launcher.slot
            self._groups[job_id] = launcher.group
        elif self._free_slots:
            slot = self._free_slots.pop(0)
        else:
            return SandboxResult(
                Outcome.SANDBOX_FAILED, -1, 0.0, "no free job uid: too many jobs at once"
            )
        uid = gid = self.config.uid_base + slot
        self._running[job_id] = slot
        own_cancel = asyncio.Event()
        self._cancels[job_id] = own_cancel
        log = _log.bind(job_id=job_id, uid=uid)
        steps.mark("take_slot")
        try:
            job = _Job(self, spec, uid, gid, launcher, on_output, [own_cancel, cancel], log, steps)
            await job.start()
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
        self._groups.pop(job_id, None)
        if slot is not None and not reusable:
            # A process that survived SIGKILL (stuck in the kernel) still runs as this uid:
            # no other job may share it. sweep() at the next start deals with it.
            _log.error("sandbox.uid_quarantined", job_id=job_id, uid=self.config.uid_base + slot)
        elif slot is not None:
            self._free_slots.append(slot)
            self._free_slots.sort()
            if len(self._parked) < min(_PARKED_LAUNCHERS, self.config.uid_count):
                asyncio.get_running_loop().call_soon(self._refill)

    async def _kill_job(self, group: str) -> bool:
        """Kills every process in the cgroups, repeating until none is left (a process may
        fork while its siblings die); True when they are empty. Waits on the processes'
        pidfds: a process leaves its cgroups as its pidfd becomes readable."""
        deadline = time.monotonic() + _KILL_TIMEOUT_S
        belongs = _in_cgroup(self._cgroups.member_paths(group))
        self._cgroups.kill_switch(group)
        pause = 0.0005
        while True:
            pids = self._cgroups.pids(group)
            if not pids:
                return True
            held: dict[int, int] = {}
            try:
                for pid in pids:
                    with contextlib.suppress(OSError):  # gone already
                        held[pid] = os.pidfd_open(pid)
                for pid, pidfd in held.items():
                    # The pidfd pins the process: a pid recycled since the listing is checked,
                    # and spared. (An exiting process fails the check on cgroup v1, where
                    # /proc shows it in the root: it needs no signal.)
                    if belongs(pid):
                        with contextlib.suppress(ProcessLookupError):
                            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                # Waited for: the pidfds of processes still listed once they were opened (a
                # pidfd opened on a recycled pid, of a process elsewhere, is not).
                listed = self._cgroups.pids(group)
                waiting = [pidfd for pid, pidfd in held.items() if pid in listed]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                if waiting:
                    await _exits(waiting, within=min(remaining, 0.1))
                elif listed:
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 0.02)
            finally:
                for pidfd in held.values():
                    os.close(pidfd)


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
        launcher: _Launcher | None,
        on_output: Callable[[bytes], Awaitable[None]],
        cancels: Sequence[asyncio.Event | None],
        log: Any,
        steps: _Steps,
    ) -> None:
        self.sandbox = sandbox
        self.cgroups = sandbox._cgroups
        self.spec = spec
        self.uid = uid
        self.gid = gid
        self.stage = sandbox._stage
        self.slot = uid - sandbox.config.uid_base
        self.launcher = launcher
        # The name of the job's cgroups: a parked launcher's, or the job id.
        self.group = launcher.group if launcher is not None else spec.job_id
        self.on_output = on_output
        self.cancels = [c for c in cancels if c is not None]
        self.log = log
        self.steps = steps
        self.mounts = list(spec.mounts)
        self.tail = bytearray()
        self.chain_stderr = bytearray()
        self.started = time.monotonic()
        self.result: SandboxResult | None = None
        self.failure: BaseException | None = None
        self.proc: _Child | None = None
        self.readers: list[asyncio.Future[None]] = []
        self.writers: list[asyncio.Future[None]] = []
        self.network: _Network | None = None
        # What bwrap's status pipe said before the job's start (a network job's child-pid).
        self.status_head = b""

    async def start(self) -> None:
        """Everything up to "go", without a pause but for a crashed engine's leftovers: the
        caller awaits it directly (a task would wait for the event loop's next round). An
        early end is kept in `result`, an exception in `failure`, for run()."""
        try:
            if self.cgroups.exists(self.spec.job_id):
                # Left by a crashed engine for this very job: never let its processes live on.
                self.log.warning("sandbox.leftover_cgroup")
                await self.sandbox._kill_job(self.spec.job_id)
                self.cgroups.remove(self.spec.job_id)
            self.steps.mark("leftover_checks")
            script = self._prepare()
            if isinstance(script, SandboxResult):
                self.result = script
                return
            if self.spec.limits.network:
                self.result = await self._attach_network()
                self.steps.mark("network")
            if self.result is None:
                self.result = self._go(script)
        except BaseException as error:  # re-raised by run(), once cleaned up
            self.failure = error

    def _prepare(self) -> bytes | SandboxResult:
        """The sandbox, its limits and its mounts; returns the job's script, or the result
        when the job cannot start."""
        spec, limits = self.spec, self.spec.limits
        try:
            if self.launcher is None:
                # None was parked (a burst of jobs, the first one, a network or image job): the
                # job waits for what a parked sandbox has done already.
                if spec.image is not None:
                    self.stage.mount_root(self.slot, spec.image.rootfs)
                self.launcher = self.sandbox._park(
                    self.slot, group=spec.job_id, network=limits.network, image=spec.image
                )
                self.steps.mark("park")
            elif self.sandbox._joined(self.launcher):
                # The job's name on its cgroups (v1), for whoever looks at them. Not before
                # the launcher is in them: it joins them by their path.
                self.group = self.cgroups.rename(self.group, spec.job_id)
                self.sandbox._groups[spec.job_id] = self.group
            self.cgroups.limit(self.group, limits)
            self.steps.mark("cgroup_limits")
            for mount in self.mounts:
                if mount.writable:
                    _hand_over(mount.host_path, self.uid, self.gid)
            for sandbox_path in self.stage.mount_job(self.slot, self.uid, self.mounts, limits):
                self.log.warning("sandbox.mount_unreadable", sandbox_path=sandbox_path)
            image_env = None if spec.image is None else spec.image.env
            script = _job_script(spec.argv, spec.env, limits, image_env)
            self.steps.mark("stage")
        except _SpecError as error:
            return self._result(Outcome.SANDBOX_FAILED, -1, str(error))
        except (OSError, subprocess.SubprocessError) as error:
            self.log.error("sandbox.setup_failed", error=self._scrub(str(error)))
            code = errno.errorcode.get(getattr(error, "errno", None) or 0, "error")
            return self._result(Outcome.SANDBOX_FAILED, -1, f"sandbox setup failed: {code}")
        return script

    async def _attach_network(self) -> SandboxResult | None:
        """Connects the job's network namespace to the outside, away from the host's own
        addresses (see the module docstring), while the job's shell still waits for its
        script. Fails closed: a job whose network cannot be filtered does not run."""
        assert self.launcher is not None and self.sandbox._tools is not None
        network = self.network = _Network()
        blocked: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
        try:
            tools = self.sandbox._network_tools
            if tools is None:
                tools = self.sandbox._network_tools = self.sandbox._find_network_tools()
            # The host's addresses are read while bwrap clones, slirp4netns starts while the
            # routes are added: none of them needs the others.
            listing = asyncio.ensure_future(_ip_addresses(tools))
            try:
                async with asyncio.timeout(_NETWORK_SETUP_TIMEOUT_S):
                    network.netns = await self._open_netns()
                    sh = self.sandbox._tools.sh
                    network.start(sh, tools, self.cgroups.procs_files(self.group))
                    blocked = _host_addresses(await listing)
                    await network.block(tools, blocked)
                    await network.ready()
            finally:
                listing.cancel()
                await asyncio.gather(listing, return_exceptions=True)
            # slirp4netns' child has ended: from now on, slirp4netns itself counts beside the
            # chain.
            limits = self.spec.limits
            self.cgroups.limit_processes(self.group, limits.max_processes + _CHAIN_PROCESSES + 1)
        except (
            OSError,
            ValueError,  # ip's output, not what it should be
            SandboxUnavailable,
            TimeoutError,
            subprocess.SubprocessError,
        ) as error:
            self.log.error(
                "sandbox.network_failed",
                error=str(error) or type(error).__name__,
                slirp4netns=network.stderr.decode(errors="replace").strip()[-500:],
            )
            return self._result(
                Outcome.SANDBOX_FAILED, -1, "sandbox setup failed: the job's network"
            )
        self.log.debug("sandbox.network_attached", blocked=[str(a) for a in blocked])
        return None

    async def _open_netns(self) -> int:
        """Waits for the sandbox's shell to be up, then opens the network namespace of its init
        (bwrap's first status line names its pid and namespaces), checked to be the one bwrap
        made, never the host's."""
        assert self.launcher is not None
        async with contextlib.aclosing(_read_chunks(self.launcher.fds["out"])) as chunks:
            # Nothing else is in the pipe: the job's script has not been sent.
            if await anext(chunks, b"") != b".":
                raise OSError("the sandbox ended before its network was attached")
        data = bytearray()
        async with contextlib.aclosing(_read_chunks(self.launcher.fds["status"])) as chunks:
            async for chunk in chunks:
                data += chunk
                if b"\n" in data:
                    break
        self.status_head = bytes(data)  # for _classify, with the rest of the status
        line, newline, _ = self.status_head.partition(b"\n")
        try:
            record = json.loads(line) if newline else None
        except ValueError:
            record = None
        pid = record.get("child-pid") if isinstance(record, dict) else None
        if not isinstance(pid, int) or not isinstance(record, dict):
            raise OSError("the sandbox ended before its network was attached")
        netns = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        inode = os.fstat(netns).st_ino
        expected = record.get("net-namespace", inode)
        if inode != expected or inode == os.stat("/proc/self/ns/net").st_ino:
            os.close(netns)
            raise OSError("the sandbox's init is not in a network namespace of its own")
        return netns

    def _go(self, script: bytes) -> SandboxResult | None:
        """Hands the job's script to the waiting shell: the job starts."""
        if any(c.is_set() for c in self.cancels):
            return self._result(Outcome.CANCELLED, -1, "cancelled")
        launcher = self.launcher
        assert launcher is not None
        try:
            pending = launcher.start(script)
        except OSError as error:
            self.log.error("sandbox.launch_failed", error=str(error))
            return self._result(Outcome.SANDBOX_FAILED, -1, "the sandbox could not be launched")
        self.proc = _Child(launcher.popen, launcher.take("pidfd"))
        self.readers = [
            asyncio.ensure_future(self._pump_output(launcher.fds["out"])),
            asyncio.ensure_future(
                _read_capped(launcher.fds["err"], self.chain_stderr, _CHAIN_STDERR_CAP)
            ),
        ]
        self.writers = [asyncio.ensure_future(_send_rest(fd, rest)) for fd, rest in pending]
        # Parking another launcher costs CPU the job would compete for on a small machine: it
        # waits for a job to end, unless none is left parked for the next job.
        if not self.sandbox._parked:
            asyncio.get_running_loop().call_soon(self.sandbox._refill)
        self.steps.mark("go")
        self.log.debug("sandbox.launched", pid=self.proc.popen.pid)
        return None

    async def run(self) -> SandboxResult:
        """Follows the launched job to its end, then cleans up (whatever start() did)."""
        job_id = self.spec.job_id
        try:
            if self.failure is not None:
                raise self.failure
            if self.result is not None:
                return self.result
            return await self._follow()
        finally:
            empty = await self._clean_up()
            self.sandbox._release(job_id, reusable=empty)
            self.steps.mark("release")
            self.log.debug("sandbox.timing", **self.steps.ms)

    async def _follow(self) -> SandboxResult:
        assert self.proc is not None and self.launcher is not None
        proc, launcher = self.proc, self.launcher
        try:
            ended = await self._wait(proc, self.spec.limits.max_duration_s)
            self.steps.mark("chain_ran")
            # Whatever the main process left (it cannot, in its pid namespace; but the
            # cgroup is the authority) dies, and is gone, before the result is known.
            await self.sandbox._kill_job(self.group)
            self.steps.mark("kill_after_exit")
            _, still = await asyncio.wait(self.readers, timeout=_DRAIN_TIMEOUT_S)
            for reader in still:
                reader.cancel()
            status = self.status_head + _read_all(launcher.fds["status"])
        finally:
            proc.close()
            tasks = [*self.readers, *self.writers]
            for task in tasks:
                task.cancel()
            # The readers must have let go of their pipes (remove_reader) before they close.
            await asyncio.gather(*tasks, return_exceptions=True)
            launcher.close()
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
        await self.sandbox._kill_job(self.group)
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

    def _classify(self, ended: str, returncode: int | None, status: bytes) -> SandboxResult:
        limits = self.spec.limits
        cloned, child_status = _parse_status(status)
        ran = child_status is not None
        raw = child_status if child_status is not None else returncode
        code = _exit_code(raw if raw is not None else -1)
        chain_message = self.chain_stderr.decode(errors="replace").strip()
        if chain_message:
            chain_message = self._scrub(chain_message)
        try:
            counters: _Counters | None = self.cgroups.counters(self.group)
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
        slot_data = self.stage.slot_dir(self.slot) / "data"
        for mount in self.mounts:
            for host in {str(mount.host_path), os.path.realpath(mount.host_path)}:
                pairs.append((host, f"<{mount.sandbox_path}>"))
            relative = mount.sandbox_path.removeprefix("/data/")
            pairs.append((str(slot_data / relative), f"<{mount.sandbox_path}>"))
        pairs.append((str(self.stage.root), "<stage>"))
        if self.spec.image is not None:
            pairs.append((str(self.spec.image.rootfs), "<image>"))
        for host, alias in sorted(pairs, key=lambda p: -len(p[0])):
            text = text.replace(host, alias)
        return text

    async def _clean_up(self) -> bool:
        """Kills what is left, removes the cgroups and the staging; False when processes
        of the job could not be killed."""
        empty = await self.sandbox._kill_job(self.group)
        if self.launcher is not None:
            self.launcher.close()  # reaps one never started, killed just now
        if self.network is not None and not await self.network.close():
            self.log.error("sandbox.slirp4netns_left", pid=self.network.pid)
            empty = False
        if not self.stage.unmount_job(self.slot):
            self.log.error("sandbox.stage_left")
            empty = False
        self.steps.mark("cleanup_kill")
        await self.sandbox._remove_groups(self.group)
        self.steps.mark("cgroup_rmdir")
        if not empty:
            self.log.error("sandbox.processes_left")
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


class _Network:
    """A network job's slirp4netns and what the engine holds of it: the job's network
    namespace, slirp4netns' readiness pipe, its exit pipe (it ends when that pipe closes: when
    the engine closes it, or dies) and its stderr."""

    def __init__(self) -> None:
        self.netns = -1
        self.popen: subprocess.Popen[bytes] | None = None
        self.fds: dict[str, int] = {}  # ready, err (read ends); exit (write end)
        self.stderr = bytearray()
        self.reader: asyncio.Future[None] | None = None

    @property
    def pid(self) -> int | None:
        return None if self.popen is None else self.popen.pid

    def start(self, sh: str, tools: _NetworkTools, procs_files: Sequence[str]) -> None:
        """Starts slirp4netns in the job's cgroups (it joins them before its exec, like the
        launcher)."""
        theirs: list[int] = []
        for name in ("ready", "exit", "err"):
            read_end, write_end = os.pipe()
            self.fds[name] = write_end if name == "exit" else read_end
            theirs.append(read_end if name == "exit" else write_end)
        ready, exit_fd, err = theirs
        argv = [sh, "-c", _LAUNCHER_SCRIPT, "c2d-network", str(len(procs_files)), *procs_files]
        argv += [tools.slirp4netns, *_SLIRP_OPTIONS, f"--ready-fd={ready}", f"--exit-fd={exit_fd}"]
        argv += ["--netns-type=path", f"/proc/self/fd/{self.netns}", "tap0"]
        try:
            self.popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,  # its progress report
                stderr=err,
                pass_fds=[ready, exit_fd, self.netns],
                env={"PATH": _CHAIN_PATH},
                start_new_session=True,
            )
        finally:
            for fd in theirs:
                os.close(fd)
        self.reader = asyncio.ensure_future(
            _read_capped(self.fds["err"], self.stderr, _NETWORK_STDERR_CAP)
        )

    async def block(
        self,
        tools: _NetworkTools,
        addresses: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address],
    ) -> None:
        """Makes each address unreachable inside the job's namespace (as root: the job has no
        CAP_NET_ADMIN there to undo it)."""
        netns = f"/proc/self/fd/{self.netns}"
        argv = [tools.nsenter, f"--net={netns}", "--", tools.ip, "-force", "-batch", "-"]
        code, _, err = await _run_tool(argv, _unreachable_routes(addresses), [self.netns])
        if code != 0:
            message = err.decode(errors="replace").strip()[:300]
            raise OSError(f"the host's addresses stay reachable: {message}")

    async def ready(self) -> None:
        """Waits until slirp4netns has configured tap0 (it writes "1" to its ready pipe)."""
        async with contextlib.aclosing(_read_chunks(self.fds["ready"])) as chunks:
            async for chunk in chunks:
                if b"1" in chunk:
                    return
        raise OSError("slirp4netns ended before the job's network was up")

    async def close(self) -> bool:
        """Ends slirp4netns, unless the job's cgroups took it along, and lets go of the rest;
        False when it could not be killed."""
        gone = True
        if self.popen is not None and self.popen.returncode is None:
            # Not reaped yet: the pid is still slirp4netns', a zombie at worst.
            pidfd = os.pidfd_open(self.popen.pid)
            try:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                await _exits([pidfd], within=_KILL_TIMEOUT_S)
            finally:
                os.close(pidfd)
            gone = self.popen.poll() is not None
        if self.reader is not None:
            self.reader.cancel()
            # It must have let go of its pipe (remove_reader) before that closes.
            await asyncio.gather(self.reader, return_exceptions=True)
        for name, fd in self.fds.items():
            if fd >= 0:
                os.close(fd)
                self.fds[name] = -1
        if self.netns >= 0:
            os.close(self.netns)
            self.netns = -1
        return gone


class _Child:
    """A child process whose end the event loop learns from a pidfd (which it takes over)."""

    def __init__(self, popen: subprocess.Popen[bytes], pidfd: int) -> None:
        self.popen = popen
        self._loop = asyncio.get_running_loop()
        self._exited = asyncio.Event()
        self._pidfd = pidfd
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


class _Launcher:
    """The first process of a launch chain (see _launcher_argv), a parked sandbox once it has
    exec'd its way down, waiting for the job's script. Holds the engine's ends of its pipes:
    its stdin, and its stdout, stderr and bwrap's status, which become the job's. Bound to one
    uid slot: the chain's uid is on its command line."""

    def __init__(self, slot: int, group: str, popen: subprocess.Popen[bytes], fds: dict[str, int]):
        self.slot = slot
        self.group = group
        self.popen = popen
        self.fds = fds  # go (write end); out, err, status (read ends); pidfd
        self.joined = False  # known to be in all its cgroups (see Sandbox._joined)

    @classmethod
    def spawn(
        cls,
        tools: _Tools,
        *,
        slot: int,
        uid: int,
        group: str,
        procs_files: Sequence[str],
        slot_dir: Path,
        network: bool,
        image: ImageRoot | None = None,
    ) -> _Launcher:
        ours: dict[str, int] = {}
        theirs: dict[str, int] = {}
        # Files bwrap copies from pipes, the same for every job of the slot (they fit in a
        # pipe).
        passwd, group_file = _identity_files(uid, uid)
        files = {"passwd": passwd, "group": group_file}
        if network:
            files["resolv"] = _RESOLV_CONF
        try:
            for name in (*_LAUNCHER_PIPES, *(("resolv",) if network else ())):
                read_end, write_end = os.pipe()
                writes = name not in ("out", "err", "status")
                ours[name] = write_end if writes else read_end
                theirs[name] = read_end if writes else write_end
            for name, data in files.items():
                fd = ours.pop(name)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
            argv = _launcher_argv(
                tools,
                procs_files=procs_files,
                uid=uid,
                gid=uid,
                slot_dir=slot_dir,
                network=network,
                fds=theirs,
                image=image,
            )
            # Our own pipes and a pidfd rather than asyncio's subprocess: its wait() also
            # waits for the pipes to close, and it spends a thread per child.
            popen = subprocess.Popen(
                argv,
                stdin=theirs["go"],
                stdout=theirs["out"],
                stderr=theirs["err"],
                pass_fds=[fd for n, fd in theirs.items() if n not in ("go", "out", "err")],
                env={"PATH": _CHAIN_PATH},
                start_new_session=True,
            )
        except BaseException:
            for fd in [*ours.values(), *theirs.values()]:
                os.close(fd)
            raise
        for fd in theirs.values():
            os.close(fd)
        try:
            ours["pidfd"] = os.pidfd_open(popen.pid)
        except OSError:
            popen.kill()
            popen.wait()
            for fd in ours.values():
                os.close(fd)
            raise
        return cls(slot, group, popen, ours)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.returncode is None and not _exited(self.fds["pidfd"])

    def take(self, name: str) -> int:
        """Hands one of the engine's ends over to the caller, who closes it."""
        fd = self.fds[name]
        self.fds[name] = -1
        return fd

    def start(self, script: bytes) -> list[tuple[int, memoryview]]:
        """Hands the job's script to the waiting shell. Returns the pipe with what did not fit
        in it yet (a large environment), for _send_rest."""
        go = self.take("go")
        rest = _send_some(go, memoryview(script))
        if rest:
            return [(go, rest)]
        os.close(go)
        return []

    def close(self) -> None:
        """Closes the ends still held; kills and reaps the launcher if it was never started."""
        pidfd = self.fds.get("pidfd", -1)
        if self.popen.returncode is None and pidfd >= 0 and self.fds["go"] >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            self.popen.wait()
        for name, fd in self.fds.items():
            if fd >= 0:
                os.close(fd)
                self.fds[name] = -1


def _send_some(fd: int, data: memoryview) -> memoryview:
    """Writes what a pipe takes without blocking; returns the rest (empty when the reader is
    gone: nothing will read it)."""
    os.set_blocking(fd, False)
    try:
        while data:
            data = data[os.write(fd, data) :]
    except BlockingIOError:
        pass
    except BrokenPipeError:
        return memoryview(b"")
    return data


async def _send_rest(fd: int, data: memoryview) -> None:
    """Writes the rest as the reader takes it, then closes the pipe."""
    loop = asyncio.get_running_loop()
    try:
        while data:
            writable: asyncio.Future[None] = loop.create_future()
            loop.add_writer(fd, _settle, writable)
            try:
                await writable
            finally:
                loop.remove_writer(fd)
            data = _send_some(fd, data)
    finally:
        os.close(fd)


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


async def _read_capped(fd: int, into: bytearray, cap: int) -> None:
    """Reads a pipe to its end, keeping its first `cap` bytes in `into` (the rest is dropped:
    the writer never blocks on it)."""
    async for chunk in _read_chunks(fd):
        into += chunk[: max(0, cap - len(into))]


async def _read_chunks(fd: int) -> AsyncGenerator[bytes, None]:
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
