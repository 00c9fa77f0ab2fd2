"""`python -m bench.image_start`: what running an algorithm in a container image adds to a job's
start, with the image already in the engine's cache, against a host-runtime job, interleaved.

Both run the same trivial Python script through Sandbox.run; the image is the host's own
python3 packed into an OCI image (tests.operator_engine.oci_images), so only the sandbox
differs: the host job takes a parked sandbox, the image job has ImageCache.prepare() (a cache
hit) and its sandbox built as it starts, on the image's root. Prints, over N runs each (30 by
default), the median and p95 of run() -> the script's first line and of the whole run, the
difference in milliseconds and the ratio.

Needs root, bubblewrap, cgroups, umoci, skopeo and busybox-static; uses its own uid range,
cgroup name and staging root, so it can run beside an engine."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import structlog
from c2d.common.v1 import container_pb2

from bench.baseline import percentile
from operator_engine.images import ImageCache
from operator_engine.sandbox import (
    ImageRoot,
    Limits,
    Mount,
    Outcome,
    Sandbox,
    SandboxConfig,
    SandboxSpec,
)
from tests.operator_engine.oci_images import build_python_image

TRIVIAL = (
    "import time; print(time.monotonic(), flush=True); "
    "open('/data/outputs/out.txt', 'w').write('ok')"
)
CONFIG = SandboxConfig(
    uid_base=1_600_500_000,
    uid_count=8,
    stage_root=Path("/run/c2d-bench-image"),
    cgroup_name="c2d-bench-image",
)
LIMITS = Limits(
    cpus=1.0, memory_bytes=256 << 20, disk_bytes=16 << 20, max_processes=32, max_duration_s=30
)


def drop(_: Any, __: str, event: MutableMapping[str, Any]) -> Any:
    raise structlog.DropEvent


async def one_run(
    sandbox: Sandbox,
    outputs: Path,
    name: str,
    prepare: Any | None,
) -> tuple[float, float]:
    """(run() -> first line, run() -> returned), seconds; `prepare` makes the image root."""
    output = bytearray()

    async def on_output(chunk: bytes) -> None:
        output.extend(chunk)

    for entry in outputs.iterdir():
        entry.unlink()
    started = time.monotonic()
    root: ImageRoot | None = None
    if prepare is not None:
        root = (await prepare()).root
    spec = SandboxSpec(
        job_id=name,
        mounts=[Mount(outputs, "/data/outputs", writable=True)],
        argv=["python3", "-c", TRIVIAL]
        if root is not None
        else ["/usr/bin/python3", "-c", TRIVIAL],
        env={},
        limits=LIMITS,
        image=root,
    )
    result = await sandbox.run(spec, on_output)
    returned = time.monotonic()
    if result.outcome is not Outcome.OK:
        raise RuntimeError(f"the run failed: {result}")
    first = float(output.split()[0])
    return first - started, returned - started


def summary(name: str, values: list[float]) -> str:
    return (
        f"{name:<30} median {statistics.median(values) * 1000:7.2f} ms"
        f"   p95 {percentile(values, 95) * 1000:7.2f} ms"
    )


async def measure(runs: int) -> None:
    structlog.configure(processors=[drop], cache_logger_on_first_use=True)
    home = Path(tempfile.mkdtemp(prefix="c2d-bench-image-"))
    sandbox = Sandbox(CONFIG)
    try:
        built = time.monotonic()
        digest = build_python_image(home / "store", "python")
        images = ImageCache(
            store=home / "store",
            cache=home / "cache",
            fetch_timeout_s=120,
            max_image_bytes=1 << 30,
            budget_bytes=1 << 40,
        )
        images.check()
        container = container_pb2.Container(image="local/python", checksum=digest)
        fetched = time.monotonic()
        first = await images.prepare(container)  # the cold start, once: fetch and unpack
        images.release(first)
        cold = time.monotonic() - fetched
        print(f"image built in {fetched - built:.2f} s; cold prepare (fetch, unpack) {cold:.2f} s")

        async def prepare() -> Any:
            image = await images.prepare(container)
            images.release(image)  # the job's end, early: only its start is measured
            return image

        sandbox.check()
        await sandbox.sweep()
        outputs = home / "outputs"
        outputs.mkdir()
        host: list[tuple[float, float]] = []
        boxed: list[tuple[float, float]] = []
        await one_run(sandbox, outputs, "warm-host", None)
        await one_run(sandbox, outputs, "warm-image", prepare)
        for index in range(runs):
            await asyncio.sleep(0.05)  # a quiet moment, as between a node's jobs
            host.append(await one_run(sandbox, outputs, f"host-{index}", None))
            await asyncio.sleep(0.05)
            boxed.append(await one_run(sandbox, outputs, f"image-{index}", prepare))
    finally:
        await sandbox.sweep()
        sandbox.close()
        shutil.rmtree(home, ignore_errors=True)

    print(f"{runs} runs each, interleaved, of python3 -c {TRIVIAL!r}, image cache warm")
    for label, column in (("start (run -> first line)", 0), ("whole run", 1)):
        h = [r[column] for r in host]
        i = [r[column] for r in boxed]
        print(summary(f"host runtime: {label}", h))
        print(summary(f"image:        {label}", i))
        extra = statistics.median(i) - statistics.median(h)
        ratio = statistics.median(i) / statistics.median(h)
        paired = statistics.median([b - a for a, b in zip(h, i, strict=True)])
        print(
            f"{'extra':<30} median {extra * 1000:7.2f} ms   paired {paired * 1000:7.2f} ms"
            f"   ({ratio:.2f}x)"
        )
        print()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    tools = ("bwrap", "umoci", "skopeo", "busybox")
    if os.geteuid() != 0 or not all(shutil.which(tool) for tool in tools):
        print(f"needs root and {', '.join(tools)}", file=sys.stderr)
        return 2
    asyncio.run(measure(args.runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
