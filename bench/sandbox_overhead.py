"""`python -m bench.sandbox_overhead`: what the job sandbox adds to a trivial job, against a bare
bubblewrap run of the same script, interleaved.

Prints, over N runs each (30 by default):
- wall time, median and p95: Sandbox.run() (call to return) against a bare `bwrap ... python3`
  (spawn to reaped), and the difference, the sandbox's overhead (also as the median and p95 of
  the differences of each pair of runs);
- when the algorithm's first line runs (the script prints CLOCK_MONOTONIC, the host's clock:
  jobs get no time namespace) and from its last line to the return, both against the bare run;
- the sandbox's own steps (its `sandbox.timing` debug log), median and p95 of each.

Needs root, bubblewrap and cgroups, as the engine does; uses its own uid range, cgroup name
and staging root, so it can run beside an engine."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import structlog

from bench.baseline import BARE_BWRAP, PYTHON, percentile
from operator_engine.sandbox import Limits, Mount, Outcome, Sandbox, SandboxConfig, SandboxSpec

# Prints the monotonic clock when it starts and when it is done, and writes its output.
TRIVIAL = (
    "import time; print(time.monotonic(), flush=True); "
    "open('/data/outputs/out.txt', 'w').write('ok'); print(time.monotonic(), flush=True)"
)
CONFIG = SandboxConfig(
    uid_base=1_600_300_000,
    uid_count=4,
    stage_root=Path("/run/c2d-bench-overhead"),
    cgroup_name="c2d-bench-overhead",
)
LIMITS = Limits(
    cpus=1.0, memory_bytes=256 << 20, disk_bytes=16 << 20, max_processes=32, max_duration_s=30
)


class Capture:
    """Keeps the sandbox's debug events (with the time they were logged) and drops the rest."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, _: Any, __: str, event: MutableMapping[str, Any]) -> Any:
        if str(event.get("event", "")).startswith("sandbox."):
            self.events.append({**event, "at": time.monotonic()})
        raise structlog.DropEvent


async def bare_run() -> tuple[float, float, float, float]:
    """(started, first line, last line, reaped) of a bare bwrap run, monotonic seconds."""
    loop = asyncio.get_running_loop()
    out_r, out_w = os.pipe()
    started = time.monotonic()
    proc = subprocess.Popen(  # as the sandbox spawns: fork/exec, then a pidfd wait
        [*BARE_BWRAP, PYTHON, "-c", TRIVIAL], stdin=subprocess.DEVNULL, stdout=out_w
    )
    os.close(out_w)
    pidfd = os.pidfd_open(proc.pid)
    exited = asyncio.Event()
    loop.add_reader(pidfd, exited.set)
    try:
        await exited.wait()
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    proc.wait()
    reaped = time.monotonic()
    with os.fdopen(out_r, "rb") as out:
        first, last = (float(v) for v in out.read().split())
    if proc.returncode != 0:
        raise RuntimeError(f"the bare run failed: {proc.returncode}")
    return started, first, last, reaped


async def sandboxed_run(
    sandbox: Sandbox, outputs: Path, index: int
) -> tuple[float, float, float, float]:
    output = bytearray()

    async def on_output(chunk: bytes) -> None:
        output.extend(chunk)

    for entry in outputs.iterdir():
        entry.unlink()
    spec = SandboxSpec(
        job_id=f"overhead-{index}",
        mounts=[Mount(outputs, "/data/outputs", writable=True)],
        argv=[PYTHON, "-c", TRIVIAL],
        env={},
        limits=LIMITS,
    )
    started = time.monotonic()
    result = await sandbox.run(spec, on_output)
    returned = time.monotonic()
    if result.outcome is not Outcome.OK:
        raise RuntimeError(f"the sandboxed run failed: {result}")
    first, last = (float(v) for v in output.split())
    return started, first, last, returned


def summary(name: str, values: list[float], unit: float = 1000) -> str:
    return (
        f"{name:<34} median {statistics.median(values) * unit:7.2f} ms"
        f"   p95 {percentile(values, 95) * unit:7.2f} ms"
    )


async def measure(runs: int, steps: bool) -> None:
    capture = Capture()
    structlog.configure(
        processors=[capture],
        wrapper_class=structlog.make_filtering_bound_logger(0),
        cache_logger_on_first_use=True,  # as the engine does
    )
    sandbox = Sandbox(CONFIG)
    sandbox.check()
    await sandbox.sweep()
    home = Path(tempfile.mkdtemp(prefix="c2d-overhead-"))
    outputs = home / "outputs"
    outputs.mkdir()
    bare: list[tuple[float, float, float, float]] = []
    boxed: list[tuple[float, float, float, float]] = []
    pre_launch: list[float] = []
    step_ms: dict[str, list[float]] = {}
    try:
        # One of each first: the page cache and the sandbox's pools warm up.
        await bare_run()
        await sandboxed_run(sandbox, outputs, -1)
        for index in range(runs):
            # A quiet moment between runs, as between a node's jobs: a kernel that defers
            # work (RCU grace periods) shows what it costs.
            await asyncio.sleep(0.05)
            bare.append(await bare_run())
            await asyncio.sleep(0.05)
            capture.events.clear()
            boxed.append(await sandboxed_run(sandbox, outputs, index))
            launched = [e["at"] for e in capture.events if e["event"] == "sandbox.launched"]
            if launched:
                pre_launch.append(launched[0] - boxed[-1][0])
            await asyncio.sleep(0.05)  # teardown may go on after the return
            for event in capture.events:
                if event["event"] == "sandbox.timing":
                    for step, ms in event.items():
                        if isinstance(ms, float) and step != "at":
                            step_ms.setdefault(step, []).append(ms)
    finally:
        await sandbox.sweep()
        sandbox.close()
        shutil.rmtree(home, ignore_errors=True)

    bare_wall = [r[3] - r[0] for r in bare]
    boxed_wall = [r[3] - r[0] for r in boxed]
    print(f"{runs} runs each, interleaved, of python3 -c {TRIVIAL!r}")
    print(summary("bare bwrap", bare_wall))
    print(summary("Sandbox.run", boxed_wall))
    overhead = statistics.median(boxed_wall) - statistics.median(bare_wall)
    p95_overhead = percentile(boxed_wall, 95) - percentile(bare_wall, 95)
    print(
        f"{'overhead':<34} median {overhead * 1000:7.2f} ms   p95 {p95_overhead * 1000:7.2f} ms"
        f"   ({statistics.median(boxed_wall) / statistics.median(bare_wall):.2f}x)"
    )
    # Each sandboxed run less the bare run just before it: steadier on a busy machine.
    print(
        summary(
            "overhead, paired runs", [s - b for s, b in zip(boxed_wall, bare_wall, strict=True)]
        )
    )
    print()
    print(summary("bare: start -> first line", [r[1] - r[0] for r in bare]))
    print(summary("sandbox: run() -> first line", [r[1] - r[0] for r in boxed]))
    if pre_launch:
        print(summary("sandbox: run() -> launched", pre_launch))
    print(summary("bare: last line -> reaped", [r[3] - r[2] for r in bare]))
    print(summary("sandbox: last line -> returned", [r[3] - r[2] for r in boxed]))
    if steps and step_ms:
        print()
        print("the sandbox's steps (sandbox.timing):")
        for step, values in step_ms.items():
            print(summary(f"  {step}", values, unit=1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--no-steps", action="store_true", help="leave out the step table")
    args = parser.parse_args()
    if os.geteuid() != 0 or shutil.which("bwrap") is None:
        print("needs root and bubblewrap", file=sys.stderr)
        return 2
    asyncio.run(measure(args.runs, not args.no_steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
