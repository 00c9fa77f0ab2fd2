"""`python -m bench.storage_throughput [--size-mib N]`: how fast results move into and out of S3
storage, and how much memory that takes, against local disk measured in the same run.

One file of N MiB (512 by default, random bytes) is stored with `put_blocking` (what the publish
stage calls, from a thread with no event loop) and read back with `read()`, hashing as it goes
(what a download does), by each storage. Every measurement runs in a fresh child process, which
reports its throughput and its peak RSS growth: the peak (VmHWM) is reset after the storage is
made and warmed up, so the growth is what the transfer itself took. S3 is moto's server on
127.0.0.1 in a process of its own, so its copy of the file counts for nobody here.

Prints MiB/s for both storages and the S3/local ratios, and checks the target: the peak growth
stays under 64 MiB however large the file (memory must not grow with it)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

MIB = 1 << 20
# Peak memory growth of a transfer must stay below this, whatever the file's size.
TARGET_GROWTH_MIB = 64
JOB = "0123456789abcdef0123456789abcdef"
KEY = "0000"
WARM_KEY = "warm-up"
# moto's server in a process of its own: prints its port, serves until its stdin closes.
MOTO_SERVER = """
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()
server.stop()
"""
CREDENTIALS = {
    "C2D_S3_REGION": "us-east-1",
    "C2D_S3_ACCESS_KEY_ID": "bench-access-key",
    "C2D_S3_SECRET_ACCESS_KEY": "bench-secret-key",
}


# -- in the child: one transfer, measured ------------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> bool:
    """Resets the process's peak RSS to its current RSS (Linux 4.0+); False when it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class _Meter:
    """Peak RSS growth from the moment it starts: VmHWM after minus VmRSS before, with the peak
    reset at the start (or ru_maxrss before and after, where the peak cannot be reset)."""

    def start(self) -> None:
        gc.collect()
        self.reset = _reset_peak()
        self.before_kib = (
            _status_kib("VmRSS")
            if self.reset
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        )
        self.started = time.perf_counter()

    def stop(self) -> dict[str, float]:
        seconds = time.perf_counter() - self.started
        peak = (
            _status_kib("VmHWM")
            if self.reset
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        )
        return {
            "seconds": seconds,
            "growth_mib": max(0, peak - self.before_kib) / 1024,
            "rss_before_mib": _status_kib("VmRSS") / 1024 if self.reset else 0.0,
        }


def child(operation: str, url: str, path: Path) -> dict[str, Any]:
    import io

    from mesh.logging import configure_logging
    from mesh.storage import storage_from_url

    configure_logging("bench", level="warning")
    storage = storage_from_url(url)
    meter = _Meter()
    if operation == "put":
        # Warm-up: the client, its loop thread and a connection exist before the measure.
        storage.put_blocking(JOB, WARM_KEY, io.BytesIO(b"warm" * 256))
        with path.open("rb", buffering=0) as source:
            meter.start()
            stored = storage.put_blocking(JOB, KEY, source)
            figures = meter.stop()
        return {**figures, "size": stored.size, "sha256": stored.sha256}

    async def read() -> dict[str, Any]:
        async for _ in storage.read(JOB, WARM_KEY):
            pass
        digest = hashlib.sha256()
        size = 0
        meter.start()
        async for chunk in storage.read(JOB, KEY):
            digest.update(chunk)
            size += len(chunk)
        return {**meter.stop(), "size": size, "sha256": digest.hexdigest()}

    return asyncio.run(read())


# -- in the parent -----------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def start_moto() -> tuple[subprocess.Popen[str], str]:
    server = subprocess.Popen(
        [sys.executable, "-c", MOTO_SERVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # a line per request
        text=True,
    )
    assert server.stdout is not None
    port = server.stdout.readline().strip()
    if not port:
        server.kill()
        raise RuntimeError("moto's server did not start (is moto[s3] installed?)")
    return server, f"http://127.0.0.1:{port}"


def make_bucket(endpoint: str) -> str:
    from mesh.s3 import S3Settings

    bucket = f"bench-{uuid.uuid4().hex[:12]}"
    settings = S3Settings.from_env({**CREDENTIALS, "C2D_S3_ENDPOINT": endpoint})

    async def create() -> None:
        async with settings.client() as client:
            await client.create_bucket(Bucket=bucket)

    asyncio.run(create())
    return bucket


def make_file(path: Path, size_mib: int) -> str:
    """Random bytes (nothing compresses or dedupes them), and their sha256."""
    digest = hashlib.sha256()
    with path.open("wb") as out:
        for _ in range(size_mib):
            block = os.urandom(MIB)
            digest.update(block)
            out.write(block)
    return digest.hexdigest()


def run_child(operation: str, url: str, path: Path, env: dict[str, str]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "bench.storage_throughput", "--child", operation, url, str(path)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the {operation} child failed:\n{done.stderr}")
    figures: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return figures


def measure(size_mib: int, work: Path) -> tuple[dict[str, dict[str, Any]], str]:
    from mesh.s3 import PART_SIZE
    from mesh.storage_s3 import MAX_IN_FLIGHT

    path = work / "result.bin"
    expected = make_file(path, size_mib)
    server, endpoint = start_moto()
    try:
        bucket = make_bucket(endpoint)
        env = {**os.environ, **CREDENTIALS, "C2D_S3_ENDPOINT": endpoint}
        urls = {"local": f"file://{work / 'results'}", "s3": f"s3://{bucket}/bench"}
        figures: dict[str, dict[str, Any]] = {}
        for name, url in urls.items():
            for operation in ("put", "read"):
                result = run_child(operation, url, path, env)
                if (result["size"], result["sha256"]) != (size_mib * MIB, expected):
                    raise RuntimeError(f"{name} {operation}: the bytes differ from the file's")
                figures[f"{name}_{operation}"] = result
    finally:
        assert server.stdin is not None
        server.stdin.close()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
    where = f"parts of {PART_SIZE // MIB} MiB, {MAX_IN_FLIGHT} in flight"
    return figures, where


def report(size_mib: int, figures: dict[str, dict[str, Any]], where: str) -> dict[str, float]:
    def rate(name: str) -> float:
        return float(size_mib / figures[name]["seconds"])

    def growth(name: str) -> float:
        return float(figures[name]["growth_mib"])

    print(
        f"\nresults storage, a {size_mib} MiB file: put_blocking, then read() hashing as it "
        "goes, each in a fresh process"
    )
    print(f"S3: moto's server on 127.0.0.1 in its own process; {where}")
    print(f"{'':16}{'upload':>12}{'download':>12}{'peak RSS growth':>22}{'RSS before':>14}")
    for label, name in (("local disk", "local"), ("S3 (moto)", "s3")):
        print(
            f"  {label:<14}{rate(f'{name}_put'):>8.1f} MiB/s{rate(f'{name}_read'):>7.1f} MiB/s"
            f"{growth(f'{name}_put'):>9.1f} / {growth(f'{name}_read'):.1f} MiB"
            f"{figures[f'{name}_put']['rss_before_mib']:>10.1f} MiB"
        )
    up_ratio = rate("s3_put") / rate("local_put")
    down_ratio = rate("s3_read") / rate("local_read")
    print(f"  {'S3 / local':<14}{up_ratio:>10.2f} x{down_ratio:>11.2f} x")
    worst = max(growth("s3_put"), growth("s3_read"))
    print(
        f"peak memory growth of S3 vs the file: upload {growth('s3_put'):.1f} MiB "
        f"({growth('s3_put') / size_mib:.1%}), download {growth('s3_read'):.1f} MiB "
        f"({growth('s3_read') / size_mib:.1%}) of {size_mib} MiB; "
        f"target < {TARGET_GROWTH_MIB} MiB: {verdict(worst < TARGET_GROWTH_MIB)}"
    )
    return {
        "size_mib": size_mib,
        "local_upload_mib_s": rate("local_put"),
        "local_download_mib_s": rate("local_read"),
        "s3_upload_mib_s": rate("s3_put"),
        "s3_download_mib_s": rate("s3_read"),
        "s3_upload_ratio": up_ratio,
        "s3_download_ratio": down_ratio,
        "s3_upload_growth_mib": growth("s3_put"),
        "s3_download_growth_mib": growth("s3_read"),
        "local_upload_growth_mib": growth("local_put"),
        "local_download_growth_mib": growth("local_read"),
    }


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], sys.argv[3], Path(sys.argv[4]))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    if args.size_mib < 1:
        parser.error("--size-mib must be at least 1")
    work = Path(tempfile.mkdtemp(prefix="c2d-bench-storage-"))
    try:
        figures, where = measure(args.size_mib, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = report(args.size_mib, figures, where)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
