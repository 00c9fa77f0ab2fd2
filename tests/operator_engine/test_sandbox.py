"""The local sandbox, for real: bubblewrap, cgroups and job uids on this machine, as root.

Each test runs small Python algorithms through Sandbox.run and checks from the host what the
job could see and do, how it ended, and that nothing of it is left afterwards."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from operator_engine.mounts import mounted_under
from operator_engine.sandbox import (
    Limits,
    Mount,
    Outcome,
    Sandbox,
    SandboxConfig,
    SandboxResult,
    SandboxSpec,
    SandboxUnavailable,
    processes_of_uids,
)

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("bwrap") is None,
    reason="the sandbox needs root (it switches to job uids and makes cgroups) and bubblewrap",
)

PYTHON = "/usr/bin/python3"
DATASET = "ab" * 32
# Apart from an engine's defaults, so that tests and a running engine never meet.
CONFIG = SandboxConfig(
    uid_base=1_600_200_000,
    uid_count=8,
    stage_root=Path("/run/c2d-sandbox-test"),
    cgroup_name="c2d-test",
)
LIMITS = Limits(
    cpus=1.0,
    memory_bytes=256 << 20,
    disk_bytes=16 << 20,
    max_processes=32,
    max_duration_s=20.0,
)


@pytest.fixture(scope="module")
def checked() -> Iterator[Sandbox]:
    sandbox = Sandbox(CONFIG)
    sandbox.check()
    yield sandbox
    sandbox.close()
    for parent in [CONFIG.cgroup_root / c / CONFIG.cgroup_name for c in ("memory", "pids", "cpu")]:
        assert not parent.exists()
    assert not CONFIG.stage_root.exists()


@pytest.fixture
async def sandbox(checked: Sandbox) -> AsyncIterator[Sandbox]:
    await checked.sweep()
    yield checked
    assert checked.stray_processes() == [], "a job process outlived its run"


@dataclass
class Workspace:
    """What an engine lays out for one job: root-only, like the engine's own workspace."""

    root: Path
    input_file: Path
    outputs: Path
    algorithm_dir: Path

    @classmethod
    def make(cls, base: Path, code: str) -> Workspace:
        root = base / "ws"
        root.mkdir(mode=0o700)
        input_file = root / "input.csv"
        input_file.write_text("a,b\n1,2\n")
        input_file.chmod(0o644)
        algorithm_dir = root / "transformations"
        algorithm_dir.mkdir(mode=0o755)
        (algorithm_dir / "algorithm").write_text(textwrap.dedent(code))
        (algorithm_dir / "algorithm").chmod(0o444)
        outputs = root / "outputs"
        outputs.mkdir(mode=0o700)
        return cls(root, input_file, outputs, algorithm_dir)

    def mounts(self) -> list[Mount]:
        return [
            Mount(self.input_file, f"/data/inputs/{DATASET}/0"),
            Mount(self.algorithm_dir, "/data/transformations"),
            Mount(self.outputs, "/data/outputs", writable=True),
        ]


@dataclass
class Run:
    result: SandboxResult
    chunks: list[tuple[float, bytes]] = field(default_factory=list)

    @property
    def output(self) -> bytes:
        return b"".join(chunk for _, chunk in self.chunks)

    def json(self) -> dict[str, object]:
        lines = [line for line in self.output.splitlines() if line.startswith(b"{")]
        value = json.loads(lines[-1])
        assert isinstance(value, dict)
        return value


def spec_for(ws: Workspace, job_id: str, limits: Limits = LIMITS) -> SandboxSpec:
    return SandboxSpec(
        job_id=job_id,
        mounts=ws.mounts(),
        argv=[PYTHON, "/data/transformations/algorithm"],
        env={"DIDS": json.dumps([DATASET]), "OUTPUTS": "/data/outputs"},
        limits=limits,
    )


def assert_cleaned_up(sandbox: Sandbox, job_id: str, *, alone: bool = True) -> None:
    root, name = CONFIG.cgroup_root, CONFIG.cgroup_name
    for group in [root / c / name / job_id for c in ("memory", "pids", "cpu")]:
        assert not group.exists(), f"{group} was left behind"
    assert not (root / name / job_id).exists()
    if alone:  # no other job runs: nothing is mounted for one, no process has a job uid
        stage = CONFIG.stage_root
        assert mounted_under(stage) == [stage / "slots", stage / "scratch"]
        assert sandbox.stray_processes() == []


async def run_job(
    sandbox: Sandbox,
    ws: Workspace,
    job_id: str,
    limits: Limits = LIMITS,
    cancel: asyncio.Event | None = None,
    alone: bool = True,
) -> Run:
    run = Run(result=SandboxResult(Outcome.SANDBOX_FAILED, -1, 0.0, "not run"))

    async def on_output(chunk: bytes) -> None:
        run.chunks.append((time.monotonic(), chunk))

    run.result = await sandbox.run(spec_for(ws, job_id, limits), on_output, cancel)
    assert_cleaned_up(sandbox, job_id, alone=alone)
    return run


async def run_code(
    sandbox: Sandbox, tmp_path: Path, code: str, limits: Limits = LIMITS, job_id: str = "job"
) -> tuple[Run, Workspace]:
    ws = Workspace.make(tmp_path, code)
    return await run_job(sandbox, ws, job_id, limits), ws


# -- what the job sees -----------------------------------------------------------------------


async def test_the_job_runs_as_its_own_unprivileged_uid_and_sees_only_its_sandbox(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    run, _ = await run_code(
        sandbox,
        tmp_path,
        """
        import json, os
        status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines())
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
        cmdlines = [open(f"/proc/{p}/cmdline", "rb").read() for p in pids]
        print(json.dumps({
            "uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(),
            "groups": os.getgroups(),
            "cap_eff": status["CapEff"].strip(), "cap_bnd": status["CapBnd"].strip(),
            "no_new_privs": status["NoNewPrivs"].strip(),
            "shadow": os.path.exists("/etc/shadow"), "root": os.path.exists("/root"),
            "work": os.path.exists("/work"), "home": os.path.exists("/home"),
            "sys": os.path.exists("/sys/fs/cgroup"),
            "pids": len(pids), "host_seen": any(b"pytest" in c for c in cmdlines),
            "etc": sorted(os.listdir("/etc")), "cwd": os.getcwd(),
            "env": sorted(os.environ),
        }))
        """,
    )
    assert run.result.outcome is Outcome.OK, run.output
    seen = run.json()
    assert seen["uid"] == seen["euid"] == seen["gid"]
    assert seen["uid"] in sandbox.uids
    assert seen["uid"] != 0
    assert seen["groups"] == []
    assert seen["cap_eff"] == seen["cap_bnd"] == "0000000000000000"
    assert seen["no_new_privs"] == "1"
    assert not any(seen[k] for k in ("shadow", "root", "work", "home", "sys", "host_seen"))
    assert seen["pids"] <= 3  # bwrap's init, the algorithm, perhaps nothing else
    assert seen["etc"] == ["group", "ld.so.cache", "passwd"]
    assert seen["cwd"] == "/"
    assert "DIDS" in seen["env"] and "OUTPUTS" in seen["env"]


async def test_inputs_are_read_only_and_outputs_belong_to_the_job_uid(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    run, ws = await run_code(
        sandbox,
        tmp_path,
        f"""
        import json, os
        path = "/data/inputs/{DATASET}/0"
        text = open(path).read()
        errors = []
        for attempt in (lambda: open(path, "a"), lambda: os.unlink(path),
                        lambda: open("/data/transformations/x", "w"),
                        lambda: open("/usr/x", "w"), lambda: open("/x", "w")):
            try:
                attempt()
                errors.append(None)
            except OSError as e:
                errors.append(e.errno)
        with open("/data/outputs/result.txt", "w") as out:
            out.write(text.upper())
        print(json.dumps({{"uid": os.getuid(), "text": text, "errors": errors}}))
        """,
    )
    assert run.result.outcome is Outcome.OK, run.output
    seen = run.json()
    assert seen["text"] == "a,b\n1,2\n"
    assert None not in seen["errors"]  # every write attempt failed
    result = ws.outputs / "result.txt"
    assert result.read_text() == "A,B\n1,2\n"
    assert result.stat().st_uid == seen["uid"]
    assert ws.outputs.stat().st_uid == seen["uid"]
    assert ws.outputs.stat().st_mode & 0o777 == 0o700
    assert ws.input_file.read_text() == "a,b\n1,2\n"


async def test_the_network_is_unreachable(sandbox: Sandbox, tmp_path: Path) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    try:
        run, _ = await run_code(
            sandbox,
            tmp_path,
            f"""
            import json, socket
            results = {{}}
            for name, address in (("public", ("1.1.1.1", 53)), ("loopback", ("127.0.0.1", {port}))):
                try:
                    socket.create_connection(address, timeout=3).close()
                    results[name] = "connected"
                except OSError as e:
                    results[name] = e.errno
            try:
                socket.getaddrinfo("example.com", 443)
                results["dns"] = "resolved"
            except OSError as e:
                results["dns"] = str(e)
            results["interfaces"] = [name for _, name in socket.if_nameindex()]
            print(json.dumps(results))
            """,
        )
    finally:
        server.close()
    assert run.result.outcome is Outcome.OK, run.output
    seen = run.json()
    assert seen["public"] != "connected"
    assert seen["loopback"] != "connected"
    assert seen["dns"] != "resolved"
    assert seen["interfaces"] == ["lo"]


async def test_no_new_user_namespace_inside(sandbox: Sandbox, tmp_path: Path) -> None:
    run, _ = await run_code(
        sandbox,
        tmp_path,
        """
        import ctypes, json, subprocess
        tool = subprocess.run(["unshare", "-U", "true"], capture_output=True, text=True)
        libc = ctypes.CDLL(None, use_errno=True)
        direct = libc.unshare(0x10000000)  # CLONE_NEWUSER
        print(json.dumps({"tool": tool.returncode, "stderr": tool.stderr,
                          "direct": direct, "errno": ctypes.get_errno()}))
        """,
    )
    assert run.result.outcome is Outcome.OK, run.output
    seen = run.json()
    assert seen["tool"] != 0
    assert seen["direct"] == -1


# -- live output -----------------------------------------------------------------------------


async def test_output_reaches_the_callback_while_the_job_runs(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    run, _ = await run_code(
        sandbox,
        tmp_path,
        """
        import sys, time
        print("A", flush=True)
        time.sleep(2)
        print("B", time.monotonic(), flush=True)
        print("to stderr", file=sys.stderr)
        """,
    )
    assert run.result.outcome is Outcome.OK, run.output
    a_arrived = next(t for t, chunk in run.chunks if b"A" in chunk)
    b_line = next(line for line in run.output.splitlines() if line.startswith(b"B "))
    b_printed = float(b_line.split()[1])  # CLOCK_MONOTONIC is the host's: no time namespace
    assert a_arrived < b_printed - 1.5
    assert b"to stderr" in run.output


# -- limits and how jobs end -----------------------------------------------------------------


async def test_a_memory_bomb_ends_out_of_memory(sandbox: Sandbox, tmp_path: Path) -> None:
    limits = Limits(
        cpus=1, memory_bytes=64 << 20, disk_bytes=16 << 20, max_processes=32, max_duration_s=20
    )
    run, _ = await run_code(
        sandbox,
        tmp_path,
        """
        hog = []
        while True:
            hog.append(b"x" * (1 << 20))
        """,
        limits,
    )
    assert run.result.outcome is Outcome.OUT_OF_MEMORY, run.result
    assert run.result.exit_code == -signal.SIGKILL
    assert "64 MiB" in run.result.detail


async def test_a_fork_bomb_ends_with_too_many_processes(sandbox: Sandbox, tmp_path: Path) -> None:
    run, _ = await run_code(
        sandbox,
        tmp_path,
        """
        import os
        while True:
            os.fork()
        """,
    )
    assert run.result.outcome is Outcome.TOO_MANY_PROCESSES, run.result
    assert run.result.exit_code != 0
    assert sandbox.stray_processes() == []


async def test_an_endless_loop_times_out_and_leaves_nothing(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    limits = Limits(
        cpus=1, memory_bytes=256 << 20, disk_bytes=16 << 20, max_processes=32, max_duration_s=2
    )
    started = time.monotonic()
    run, _ = await run_code(
        sandbox,
        tmp_path,
        """
        import os
        if os.fork() == 0:
            os.setsid()
        while True:
            pass
        """,
        limits,
    )
    elapsed = time.monotonic() - started
    assert run.result.outcome is Outcome.TIMED_OUT, run.result
    assert 2.0 <= elapsed < 3.0
    assert run.result.detail == "timed out after 2 s"


async def test_a_double_forked_daemon_dies_with_its_job(sandbox: Sandbox, tmp_path: Path) -> None:
    run, ws = await run_code(
        sandbox,
        tmp_path,
        """
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                with open("/data/outputs/daemon.log", "a") as log:
                    while True:
                        log.write("alive\\n")
                        log.flush()
                        time.sleep(0.05)
            os._exit(0)
        time.sleep(0.3)
        print("main done")
        """,
    )
    assert run.result.outcome is Outcome.OK, run.result
    size = (ws.outputs / "daemon.log").stat().st_size
    assert size > 0  # the daemon did run
    await asyncio.sleep(0.3)
    assert (ws.outputs / "daemon.log").stat().st_size == size
    assert sandbox.stray_processes() == []


async def test_tmp_is_capped_and_private(sandbox: Sandbox, tmp_path: Path) -> None:
    limits = Limits(
        cpus=1, memory_bytes=256 << 20, disk_bytes=8 << 20, max_processes=32, max_duration_s=20
    )
    marker = f"c2d-fill-{os.getpid()}"
    run, _ = await run_code(
        sandbox,
        tmp_path,
        f"""
        import json
        result = {{}}
        # Files of 1 MiB each, so that the tmpfs fills up before any file reaches the
        # file-size limit.
        for path in ("/tmp/{marker}", "/dev/shm/{marker}"):
            written = 0
            try:
                while True:
                    with open(f"{{path}}-{{written >> 20}}", "wb") as f:
                        f.write(b"x" * (1 << 20))
                    written += 1 << 20
            except OSError as e:
                result[path] = [e.errno, written]
        try:
            open("/dev/{marker}", "w")
            result["dev"] = "writable"
        except OSError as e:
            result["dev"] = e.errno
        print(json.dumps(result))
        """,
        limits,
    )
    assert run.result.outcome is Outcome.OK, run.output
    seen = run.json()
    for path in (f"/tmp/{marker}", f"/dev/shm/{marker}"):
        error, written = seen[path]
        assert error == 28  # ENOSPC
        assert written <= 8 << 20
    assert seen["dev"] == 30  # EROFS
    assert not list(Path("/tmp").glob(f"{marker}*"))
    assert not list(Path("/dev/shm").glob(f"{marker}*"))


async def test_a_file_beyond_the_disk_limit_ends_disk_full(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    limits = Limits(
        cpus=1, memory_bytes=256 << 20, disk_bytes=4 << 20, max_processes=32, max_duration_s=20
    )
    run, ws = await run_code(
        sandbox,
        tmp_path,
        """
        with open("/data/outputs/big.bin", "wb") as f:
            for _ in range(8):
                f.write(b"x" * (1 << 20))
        """,
        limits,
    )
    assert run.result.outcome is Outcome.DISK_FULL, run.result
    assert (ws.outputs / "big.bin").stat().st_size == 4 << 20


async def test_a_nonzero_exit_is_reported_with_its_code(sandbox: Sandbox, tmp_path: Path) -> None:
    run, _ = await run_code(sandbox, tmp_path, "import sys; print('bye'); sys.exit(3)")
    assert run.result.outcome is Outcome.EXIT_NONZERO
    assert run.result.exit_code == 3
    assert run.result.detail == "algorithm exited with code 3"
    assert run.output == b"bye\n"


async def test_a_cancelled_job_ends_cancelled(sandbox: Sandbox, tmp_path: Path) -> None:
    ws = Workspace.make(tmp_path, "import time; print('started', flush=True); time.sleep(60)")
    cancel = asyncio.Event()
    job = asyncio.create_task(run_job(sandbox, ws, "cancel-me", cancel=cancel))
    await asyncio.sleep(0.5)
    started = time.monotonic()
    cancel.set()
    run = await job
    # Ended by the cancel, not by its 60 s sleep (a loose bound: this is no speed test).
    assert time.monotonic() - started < 10
    assert run.result.outcome is Outcome.CANCELLED
    assert run.output == b"started\n"


async def test_a_caller_that_gives_up_still_gets_the_job_killed(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    ws = Workspace.make(tmp_path, "import time; print('started', flush=True); time.sleep(60)")
    job = asyncio.create_task(run_job(sandbox, ws, "abandoned"))
    await asyncio.sleep(0.5)
    started = time.monotonic()
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    assert time.monotonic() - started < 10  # killed, not left to its 60 s sleep
    assert_cleaned_up(sandbox, "abandoned")


async def test_two_jobs_at_once_get_different_uids(sandbox: Sandbox, tmp_path: Path) -> None:
    code = "import json, os, time; time.sleep(0.5); print(json.dumps({'uid': os.getuid()}))"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ws_a, ws_b = Workspace.make(tmp_path / "a", code), Workspace.make(tmp_path / "b", code)
    run_a, run_b = await asyncio.gather(
        run_job(sandbox, ws_a, "job-a", alone=False), run_job(sandbox, ws_b, "job-b", alone=False)
    )
    assert run_a.result.outcome is run_b.result.outcome is Outcome.OK
    assert run_a.json()["uid"] != run_b.json()["uid"]
    assert ws_a.outputs.stat().st_uid != ws_b.outputs.stat().st_uid


async def test_a_sandbox_that_cannot_start_says_so_without_host_paths(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    ws = Workspace.make(tmp_path, "print('never runs')")
    spec = spec_for(ws, "broken")
    # A FIFO cannot be an input: the job's mounts are not made and the job never starts.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    spec = SandboxSpec(
        job_id=spec.job_id,
        mounts=[*spec.mounts, Mount(fifo, "/data/inputs/fifo")],
        argv=spec.argv,
        env=spec.env,
        limits=spec.limits,
    )
    chunks: list[bytes] = []

    async def on_output(chunk: bytes) -> None:
        chunks.append(chunk)

    result = await sandbox.run(spec, on_output)
    assert_cleaned_up(sandbox, "broken")
    assert result.outcome is Outcome.SANDBOX_FAILED, result
    assert result.detail == "the source of /data/inputs/fifo is not a regular file or a directory"
    assert str(tmp_path) not in result.detail
    assert chunks == []


# -- the engine's side -----------------------------------------------------------------------


# A stand-in engine: runs one job, prints its output, and is killed by the test.
ENGINE_SCRIPT = """
import asyncio, json, sys
from pathlib import Path
from operator_engine.sandbox import Limits, Mount, Sandbox, SandboxConfig, SandboxSpec

params = json.loads(sys.argv[1])
config = dict(params["config"], stage_root=Path(params["config"]["stage_root"]))
mounts = [Mount(Path(host), path, writable) for host, path, writable in params["mounts"]]

async def on_output(chunk):
    print("job output", chunk, flush=True)

async def main():
    spec = SandboxSpec("orphan", mounts, params["argv"], {}, Limits(1, 256 << 20, 1 << 20, 8, 60))
    await Sandbox(SandboxConfig(**config)).run(spec, on_output)

asyncio.run(main())
"""


# An engine of its own: it mounts its own staging, which another engine on the same staging
# root would detach.
ORPHAN = SandboxConfig(
    uid_base=1_600_200_300,
    uid_count=8,
    stage_root=Path("/run/c2d-sandbox-test-orphan"),
    cgroup_name="c2d-test-orphan",
)


async def test_the_job_dies_with_the_engine_and_the_next_engine_cleans_up(
    tmp_path: Path,
) -> None:
    ws = Workspace.make(tmp_path, "import time; print('up', flush=True); time.sleep(60)")
    params = {
        "config": {
            "uid_base": ORPHAN.uid_base,
            "uid_count": ORPHAN.uid_count,
            "stage_root": str(ORPHAN.stage_root),
            "cgroup_name": ORPHAN.cgroup_name,
        },
        "mounts": [[str(m.host_path), m.sandbox_path, m.writable] for m in ws.mounts()],
        "argv": [PYTHON, "/data/transformations/algorithm"],
    }
    engine = tmp_path / "engine.py"
    engine.write_text(ENGINE_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(engine), json.dumps(params)],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).parents[2],
    )
    assert proc.stdout is not None
    for _ in range(20):  # the engine's own log lines come first
        if b"job output" in proc.stdout.readline():
            break
    job_procs = ORPHAN.cgroup_root / "memory" / ORPHAN.cgroup_name / "orphan" / "cgroup.procs"
    assert job_procs.read_text().split() != []
    proc.kill()  # the engine dies without cleaning anything up
    proc.wait()
    # The job's processes die with it. (A sandbox parked a moment before the engine died may
    # be left waiting, as bwrap's child had not yet asked to die with its parent: the next
    # engine's sweep kills it.)
    assert await until(lambda: job_procs.read_text().split() == [])
    # Its job's mounts are still on the host, for the next engine to detach.
    assert len(mounted_under(ORPHAN.stage_root / "slots")) > 3
    restarted = Sandbox(ORPHAN)
    restarted.check()
    await restarted.sweep()
    stage = ORPHAN.stage_root
    assert mounted_under(stage) == [stage / "slots", stage / "scratch"]
    assert groups_of(ORPHAN) == {launcher.group for launcher in restarted._parked}
    assert restarted.stray_processes() == []
    restarted.close()
    assert_closed(ORPHAN)


# -- parked launchers -------------------------------------------------------------------------

# Each with cgroups, uids and a staging root of its own: these tests make and end sandboxes.
ONE_SLOT = SandboxConfig(
    uid_base=1_600_200_100,
    uid_count=1,
    stage_root=Path("/run/c2d-sandbox-test-one"),
    cgroup_name="c2d-test-one",
)
CRASHED = SandboxConfig(
    uid_base=1_600_200_200,
    uid_count=8,
    stage_root=Path("/run/c2d-sandbox-test-crashed"),
    cgroup_name="c2d-test-crashed",
)
CONTROLLERS = ("memory", "pids", "cpu")


def groups_of(config: SandboxConfig) -> set[str]:
    """The cgroups under the config's parent (in the memory hierarchy)."""
    parent = config.cgroup_root / "memory" / config.cgroup_name
    return {p.name for p in parent.iterdir() if p.is_dir()} if parent.exists() else set()


def assert_closed(config: SandboxConfig) -> None:
    for controller in CONTROLLERS:
        assert not (config.cgroup_root / controller / config.cgroup_name).exists()
    assert not config.stage_root.exists()
    uids = range(config.uid_base, config.uid_base + config.uid_count)
    assert processes_of_uids(uids) == []


async def until(condition: Callable[[], bool], timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True


def alive(pid: int) -> bool:
    """Running, not a zombie."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status


@pytest.fixture
async def one_slot() -> AsyncIterator[Sandbox]:
    """A sandbox with a single uid slot: every job runs on the same one, one after another."""
    sandbox = Sandbox(ONE_SLOT)
    sandbox.check()
    await sandbox.sweep()
    yield sandbox
    sandbox.close()
    assert_closed(ONE_SLOT)


async def test_jobs_start_from_parked_sandboxes_in_fresh_limited_cgroups(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    parked = list(sandbox._parked)
    assert len(parked) == 4
    assert len({launcher.slot for launcher in parked}) == 4
    for launcher in parked:
        assert alive(launcher.pid)
        assert launcher.group.startswith("_park-")
        assert await until(lambda p=launcher: sandbox._cgroups.joined(p.pid, p.group))
        # Built and waiting as the slot's own uid, bwrap's monitor, its init and the shell.
        uid = CONFIG.uid_base + launcher.slot
        assert await until(lambda p=launcher, u=uid: processes_of_uids({u}).count(p.pid) == 1)
        memory = CONFIG.cgroup_root / "memory" / CONFIG.cgroup_name / launcher.group
        assert await until(lambda m=memory: len((m / "cgroup.procs").read_text().split()) == 3)
    assert sandbox.stray_processes() == []

    seen: dict[str, object] = {}
    ws = Workspace.make(
        tmp_path,
        "import resource as r, time\n"
        "print('up', *r.getrlimit(r.RLIMIT_FSIZE), *r.getrlimit(r.RLIMIT_CORE), flush=True)\n"
        "time.sleep(0.5)\n",
    )
    output = bytearray()

    async def on_output(chunk: bytes) -> None:
        output.extend(chunk)
        if b"up" in chunk:
            root, name = CONFIG.cgroup_root, CONFIG.cgroup_name
            memory, pids, cpu = (root / c / name / "started" for c in CONTROLLERS)
            seen["procs"] = (memory / "cgroup.procs").read_text().split()
            seen["memory"] = int((memory / "memory.limit_in_bytes").read_text())
            seen["pids"] = int((pids / "pids.max").read_text())
            seen["quota"] = int((cpu / "cpu.cfs_quota_us").read_text())
            seen["mounts"] = mounted_under(CONFIG.stage_root / "slots")

    slot = sandbox._take_parked()
    assert slot is not None
    sandbox._parked.insert(0, slot)  # the job takes this one
    result = await sandbox.run(spec_for(ws, "started"), on_output)
    assert_cleaned_up(sandbox, "started")
    assert result.outcome is Outcome.OK, result
    # The file-size and core limits, hard and soft.
    disk = LIMITS.disk_bytes // 512 * 512
    assert output.split() == [b"up", *(str(n).encode() for n in (disk, disk, 0, 0))]
    # The job ran in a parked sandbox's cgroups, renamed and limited when it started.
    assert len(seen["procs"]) == 3  # type: ignore[arg-type]
    assert seen["memory"] == LIMITS.memory_bytes
    assert seen["pids"] == LIMITS.max_processes + 2
    assert seen["quota"] == 100_000
    # Its mounts were made on the slot's staging directories while it ran, and only then.
    top = CONFIG.stage_root / "slots" / str(slot.slot)
    mounted = seen["mounts"]
    assert isinstance(mounted, list)
    assert mounted[:3] == [CONFIG.stage_root / "slots", top / "tmp", top / "shm"]
    assert set(mounted[3:]) == {
        top / "data" / m.sandbox_path.removeprefix("/data/") for m in ws.mounts()
    }
    # Another sandbox was parked after it ended.
    assert await until(lambda: len(sandbox._parked) == 4)
    after = list(sandbox._parked)
    assert len({launcher.pid for launcher in parked} - {launcher.pid for launcher in after}) == 1


async def test_one_slot_runs_hostile_jobs_back_to_back_in_fresh_cgroups(
    one_slot: Sandbox, tmp_path: Path
) -> None:
    limits = Limits(
        cpus=1, memory_bytes=64 << 20, disk_bytes=16 << 20, max_processes=16, max_duration_s=2
    )
    jobs = [
        ("hog = []\nwhile True:\n    hog.append(b'x' * (1 << 20))\n", Outcome.OUT_OF_MEMORY),
        ("import os\nwhile True:\n    os.fork()\n", Outcome.TOO_MANY_PROCESSES),
        ("while True:\n    pass\n", Outcome.TIMED_OUT),
        ("import os; print(os.getuid())", Outcome.OK),
        ("import os; print(os.getuid())", Outcome.OK),
    ]
    for index, (code, outcome) in enumerate(jobs):
        # The slot's launcher is parked again (off the previous job's path) and has joined
        # its fresh cgroups before the next job takes it.
        assert await until(lambda: len(one_slot._parked) == 1)
        launcher = one_slot._parked[0]
        assert await until(lambda p=launcher: one_slot._cgroups.joined(p.pid, p.group))
        workdir = tmp_path / str(index)
        workdir.mkdir()
        ws = Workspace.make(workdir, code)
        output = bytearray()

        async def on_output(chunk: bytes, output: bytearray = output) -> None:
            output.extend(chunk)

        result = await one_slot.run(spec_for(ws, f"back-{index}", limits), on_output)
        # Counters start afresh: an OOM or a fork bomb before does not taint the next job.
        assert result.outcome is outcome, (index, result, bytes(output))
        assert groups_of(ONE_SLOT) <= {p.group for p in one_slot._parked}
        assert one_slot.stray_processes() == []
        if outcome is Outcome.OK:
            assert output.strip() == str(ONE_SLOT.uid_base).encode()


async def test_a_job_on_a_launcher_still_joining_its_cgroups_is_limited(
    one_slot: Sandbox, tmp_path: Path
) -> None:
    one_slot.close()  # ends the parked launcher
    assert one_slot._parked == []
    await one_slot.sweep()  # parks a new one; the job takes it at once
    limits = Limits(
        cpus=1, memory_bytes=64 << 20, disk_bytes=16 << 20, max_processes=16, max_duration_s=20
    )
    ws = Workspace.make(tmp_path, "hog = []\nwhile True:\n    hog.append(b'x' * (1 << 20))\n")

    async def ignore(chunk: bytes) -> None:
        pass

    result = await one_slot.run(spec_for(ws, "early", limits), ignore)
    assert result.outcome is Outcome.OUT_OF_MEMORY, result
    assert await until(lambda: groups_of(ONE_SLOT) == {p.group for p in one_slot._parked})


async def test_sweep_keeps_its_own_parked_launchers(sandbox: Sandbox) -> None:
    before = [(launcher.pid, launcher.group) for launcher in sandbox._parked]
    await sandbox.sweep()
    assert [(launcher.pid, launcher.group) for launcher in sandbox._parked] == before
    assert all(alive(pid) for pid, _ in before)
    assert {group for _, group in before} <= groups_of(CONFIG)


async def test_parked_launchers_that_died_are_replaced(sandbox: Sandbox, tmp_path: Path) -> None:
    dead = list(sandbox._parked)
    for launcher in dead:
        os.kill(launcher.pid, signal.SIGKILL)
    assert await until(lambda: not any(alive(launcher.pid) for launcher in dead))
    run, _ = await run_code(sandbox, tmp_path, "print('fine')")
    assert run.result.outcome is Outcome.OK, run.result
    assert run.output == b"fine\n"
    # The dead ones' cgroups are removed, new launchers wait in fresh ones.
    assert await until(lambda: groups_of(CONFIG) == {p.group for p in sandbox._parked})
    assert len(sandbox._parked) == 4
    assert not {p.group for p in dead} & {p.group for p in sandbox._parked}
    assert all(alive(p.pid) for p in sandbox._parked)


# A stand-in engine that parks launchers, says which, and is killed by the test.
PARKING_ENGINE_SCRIPT = """
import asyncio, json, sys
from pathlib import Path
from operator_engine.sandbox import Sandbox, SandboxConfig

config = json.loads(sys.argv[1])
sandbox = Sandbox(SandboxConfig(**dict(config, stage_root=Path(config["stage_root"]))))
sandbox.check()

async def main():
    await sandbox.sweep()
    print(json.dumps([[p.pid, p.group] for p in sandbox._parked]), flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_parked_launchers_die_with_the_engine_and_sweep_removes_their_cgroups(
    tmp_path: Path,
) -> None:
    engine = tmp_path / "engine.py"
    engine.write_text(PARKING_ENGINE_SCRIPT)
    config = {
        "uid_base": CRASHED.uid_base,
        "uid_count": CRASHED.uid_count,
        "stage_root": str(CRASHED.stage_root),
        "cgroup_name": CRASHED.cgroup_name,
    }
    proc = subprocess.Popen(
        [sys.executable, str(engine), json.dumps(config)],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).parents[2],
    )
    assert proc.stdout is not None
    parked: list[list[object]] = []
    for _ in range(50):  # the engine's own log lines come first
        line = proc.stdout.readline()
        if line.startswith(b"[["):
            parked = json.loads(line)
            break
    try:
        assert len(parked) == 4
        for pid, group in parked:
            assert isinstance(pid, int) and isinstance(group, str)
            assert alive(pid)
            assert f"PPid:\t{proc.pid}\n" in Path(f"/proc/{pid}/status").read_text()
        assert groups_of(CRASHED) == {group for _, group in parked}
    finally:
        proc.kill()  # the engine dies without cleaning anything up
        proc.wait()
    # PR_SET_PDEATHSIG (and the end of their stdin) end them with the engine.
    assert await until(lambda: not any(alive(int(str(pid))) for pid, _ in parked))
    assert groups_of(CRASHED) == {group for _, group in parked}  # left for the next engine
    restarted = Sandbox(CRASHED)
    await restarted.sweep()
    assert groups_of(CRASHED) == set()
    restarted.close()
    assert_closed(CRASHED)


async def test_arguments_and_environment_reach_the_algorithm_unchanged(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    args = [
        "a b",
        "",
        "$HOME",
        "`id`",
        "$(id)",
        "'\"",
        "x\ny",
        "\\n",
        "*",
        "-e",
        "é",
        "${_C2D_ARG0}",
    ]
    env = {"DIDS": "[]", "TRICKY": "line 1\nline 2 $HOME `id` '\"", "EMPTY": ""}
    # Larger than a pipe holds: the bwraps' options are sent as they read them.
    big = {f"BIG{i}": chr(ord("a") + i) * 60_000 for i in range(5)}
    code = (
        "import json, os, sys\n"
        "print(json.dumps({'argv': sys.argv[1:], 'env': {k: v for k, v in os.environ.items()"
        " if not k.startswith('BIG')}, 'big': {k: [len(v), v[0]] for k, v in os.environ.items()"
        " if k.startswith('BIG')}}))\n"
    )
    ws = Workspace.make(tmp_path, code)
    spec = SandboxSpec(
        job_id="arguments",
        mounts=ws.mounts(),
        argv=[PYTHON, "/data/transformations/algorithm", *args],
        env={**env, **big},
        limits=LIMITS,
    )
    chunks: list[bytes] = []

    async def on_output(chunk: bytes) -> None:
        chunks.append(chunk)

    result = await sandbox.run(spec, on_output)
    assert_cleaned_up(sandbox, "arguments")
    assert result.outcome is Outcome.OK, (result, b"".join(chunks)[-500:])
    seen = json.loads(b"".join(chunks))
    assert seen["argv"] == args
    assert {k: v for k, v in seen["env"].items() if k in env} == env
    assert not [k for k in seen["env"] if k.startswith("_C2D")]
    assert seen["big"] == {k: [60_000, v[0]] for k, v in big.items()}


async def test_bad_names_nul_bytes_and_nested_mounts_are_refused(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    async def ignore(chunk: bytes) -> None:
        pass

    nested = [Mount(tmp_path, "/data/inputs"), Mount(tmp_path, "/data/inputs/x")]
    bad = [
        SandboxSpec("bad", [], [PYTHON, "-c", "pass"], {"A-B": "1"}, LIMITS),
        SandboxSpec("bad", [], [PYTHON, "-c", "pass\0"], {}, LIMITS),
        SandboxSpec("bad", [], [PYTHON, "-c", "pass"], {"A": "\0"}, LIMITS),
        SandboxSpec("bad", nested, [PYTHON, "-c", "pass"], {}, LIMITS),
    ]
    for spec in bad:
        with pytest.raises(ValueError):
            await sandbox.run(spec, ignore)
    assert "bad" not in sandbox._running


def test_check_refuses_a_uid_range_that_collides_with_users() -> None:
    with pytest.raises(SandboxUnavailable, match="collides with root"):
        Sandbox(SandboxConfig(uid_base=0, cgroup_name="c2d-test")).check()
    with pytest.raises(SandboxUnavailable, match="not a valid uid range"):
        Sandbox(SandboxConfig(uid_base=2**32 - 10, uid_count=64)).check()


def test_check_refuses_a_uid_range_another_engine_holds(checked: Sandbox) -> None:
    """Two engines sharing uids would kill each other's processes as strays: the second one
    does not start, whether its range is the same or merely overlaps; once the first one is
    gone, the range is free."""
    overlapping = dataclasses.replace(
        CONFIG,
        uid_base=CONFIG.uid_base + CONFIG.uid_count - 1,
        stage_root=Path("/run/c2d-sandbox-test-second"),
        cgroup_name="c2d-test-second",
    )
    for config in (dataclasses.replace(overlapping, uid_base=CONFIG.uid_base), overlapping):
        second = Sandbox(config)
        with pytest.raises(SandboxUnavailable, match="in use by another engine"):
            second.check()
        second.close()
    apart = Sandbox(dataclasses.replace(overlapping, uid_base=CONFIG.uid_base + CONFIG.uid_count))
    apart._claim_uid_range()  # the range just past this engine's is free
    apart.close()


def test_check_refuses_a_missing_bwrap() -> None:
    with pytest.raises(SandboxUnavailable, match="/nonexistent/bwrap is not installed"):
        Sandbox(SandboxConfig(bwrap="/nonexistent/bwrap", cgroup_name="c2d-test")).check()


def test_check_refuses_a_missing_runtime() -> None:
    with pytest.raises(SandboxUnavailable, match="runtime"):
        Sandbox(SandboxConfig(runtime_python="/usr/bin/python2.2", cgroup_name="c2d-test")).check()


async def test_trivial_runs_one_after_another_leak_no_descriptor(sandbox: Sandbox) -> None:
    """20 runs in a row, each from a parked sandbox: every one succeeds and none leaves a pipe
    or pidfd open. (What a run costs against a bare one is measured by `python -m bench`,
    not here: timing assertions do not belong in unit tests.)"""

    async def ignore(chunk: bytes) -> None:
        pass

    fds_before = len(os.listdir("/proc/self/fd"))
    for i in range(20):
        spec = SandboxSpec(f"trivial-{i}", [], [PYTHON, "-c", "pass"], {}, LIMITS)
        result = await sandbox.run(spec, ignore)
        assert result.outcome is Outcome.OK
    assert len(os.listdir("/proc/self/fd")) == fds_before  # no pipe or pidfd leaked
