"""`make bench`: what the mesh adds to a job, measured against a bare bubblewrap run of the same
script in the same run.

Figures:
- job latency through the REST edge, start -> results listed (final state seen on the SSE
  watch), p50 and p95 over N jobs, against a bare `bwrap ... python3 script` run: target <= 1.5x;
- log latency, a line printed by the algorithm to its arrival at an SSE client: target <= 50 ms;
- sustained jobs per second with the queue full, beside bare runs per second at the same
  concurrency."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import structlog
from c2d.provider.v1 import provider_pb2 as pb
from google.protobuf import json_format, struct_pb2

from bench.baseline import BARE_BWRAP, PYTHON, percentile
from cli.supervisor import Mesh, Supervisor, free_address
from sdk.client import Client
from sdk.keys import Key

TRIVIAL = "open('/data/outputs/out.txt', 'w').write('ok')\n"
LOGGER = (
    "import time\n"
    "for i in range({lines}):\n"
    "    print(f'line {{i}} {{time.time():.6f}}', flush=True)\n"
    "    time.sleep(0.05)\n"
)


def bare_runs(count: int) -> list[float]:
    """Wall time of `bwrap ... python3 -c TRIVIAL`, the floor a job cannot beat."""
    times = []
    for _ in range(count):
        started = time.perf_counter()
        subprocess.run([*BARE_BWRAP, PYTHON, "-c", TRIVIAL], check=True)
        times.append(time.perf_counter() - started)
    return times


def bare_throughput(count: int, concurrency: int) -> float:
    started = time.perf_counter()
    running: list[subprocess.Popen[bytes]] = []
    for _ in range(count):
        if len(running) >= concurrency:
            running.pop(0).wait()
        running.append(subprocess.Popen([*BARE_BWRAP, PYTHON, "-c", TRIVIAL]))
    for process in running:
        process.wait()
    return count / (time.perf_counter() - started)


async def sandbox_runs(count: int, home: Path) -> list[float]:
    """The same script through the engine's sandbox alone, no services around it: the floor
    under the mesh's job latency."""
    from bench.sandbox_overhead import CONFIG, sandboxed_run
    from operator_engine.sandbox import Sandbox

    sandbox = Sandbox(CONFIG)
    sandbox.check()
    await sandbox.sweep()
    outputs = home / "sandbox-outputs"
    outputs.mkdir()
    times = []
    try:
        await sandboxed_run(sandbox, outputs, -1)
        for index in range(count):
            started, _, _, returned = await sandboxed_run(sandbox, outputs, index)
            times.append(returned - started)
    finally:
        sandbox.close()
    return times


class Rest:
    """The REST edge, signing as the SDK does."""

    def __init__(self, base: str, client: Client) -> None:
        self.http = httpx.AsyncClient(base_url=base, timeout=60)
        self.client = client
        self.token_headers: dict[str, str] = {}

    async def start(self) -> None:
        self.token_headers = dict(await self.client.token_metadata())

    async def start_job(self, dataset: str, algorithm: str) -> str:
        request = pb.StartComputeRequest(
            request_id=uuid.uuid4().hex,
            dataset=dataset,
            algorithm=algorithm,
            parameters=struct_pb2.Struct(),
        )
        headers = dict(self.client.signature_metadata("StartCompute", request))
        reply = await self.http.post(
            "/v1/jobs", json=json_format.MessageToDict(request), headers=headers
        )
        reply.raise_for_status()
        return str(reply.json()["job"]["name"])

    async def until_listed(self, name: str) -> dict[str, Any]:
        """Follows the SSE watch until the job is final with its results listed. The stream
        ends by itself after the final state; read to its end, its connection is kept for the
        next request, as a client that keeps connections alive would."""
        final: dict[str, Any] | None = None
        async with self.http.stream(
            "GET", f"/v1/{name}:watch", headers=self.token_headers
        ) as reply:
            async for line in reply.aiter_lines():
                if line.startswith("data:"):
                    job = json.loads(line[5:])["job"]
                    if job.get("state") in ("STATE_SUCCEEDED", "STATE_FAILED", "STATE_CANCELLED"):
                        final = dict(job)
        if final is None:
            raise RuntimeError(f"{name}: the watch ended before a final state")
        return final

    async def log_latencies(self, name: str) -> list[float]:
        latencies = []
        async with self.http.stream(
            "GET", f"/v1/{name}:streamLogs", headers=self.token_headers
        ) as reply:
            pending = ""
            async for line in reply.aiter_lines():
                if not line.startswith("data:"):
                    continue
                arrived = time.time()
                pending += json.loads(line[5:])["chunk"].get("text", "")
                *complete, pending = pending.split("\n")
                for text in complete:
                    if text.startswith("line "):
                        latencies.append(arrived - float(text.split()[2]))
        return latencies

    async def close(self) -> None:
        await self.http.aclose()


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


# Beside the default engine's (1_600_000_000) and the overhead bench's (1_600_300_000).
BENCH_UID_BASE = 1_600_500_000


async def run(args: argparse.Namespace) -> int:
    home = Path(tempfile.mkdtemp(prefix="c2d-bench-"))
    tag = uuid.uuid4().hex[:8]
    owner = Key.load_or_create(home / "key.json")
    mesh = Mesh.defaults(home, owner.address, provider=free_address(), gateway=free_address())
    environments = home / "environments.json"
    environments.write_text(
        json.dumps([{"name": "default", "max_concurrent_jobs": args.concurrency}])
    )
    mesh.env.update(
        {
            "C2D_ENVIRONMENTS_FILE": str(environments),
            # A uid range, cgroup and stage of its own: the bench's engine sweeps processes of
            # its uids at start, which must never be a running node's jobs.
            "C2D_SANDBOX_UID_BASE": str(BENCH_UID_BASE),
            "C2D_SANDBOX_CGROUP": f"c2d-bench-{tag}",
            "C2D_SANDBOX_STAGE_ROOT": f"/run/c2d-bench-{tag}",
            "C2D_LOG_LEVEL": args.log_level or ("info" if args.keep else "warning"),
        }
    )
    supervisor = Supervisor(mesh, log_dir=home / "logs")
    await supervisor.start()
    try:
        return await measure(args, mesh, owner, home)
    finally:
        await supervisor.stop()
        if args.keep:
            print(f"kept the node's state and logs in {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)


async def measure(args: argparse.Namespace, mesh: Mesh, owner: Key, home: Path) -> int:
    data = home / "data" / "input.txt"
    data.parent.mkdir(parents=True)
    data.write_text("1\n")
    data.chmod(0o644)
    async with Client(mesh.provider, owner) as client:
        trivial = await client.publish_algorithm(TRIVIAL.encode(), "python3 $ALGO")
        logger = await client.publish_algorithm(
            LOGGER.format(lines=args.log_lines).encode(), "python3 $ALGO"
        )
        dataset = await client.publish_dataset(
            [data],
            policy=pb.ComputePolicy(
                publisher_trusted_algorithms=[
                    await client.trust(trivial.did),
                    await client.trust(logger.did),
                ]
            ),
        )
        rest = Rest(f"http://{mesh.gateway}", client)
        await rest.start()
        try:
            # Warm up both paths once: first-use costs are not what is measured.
            await rest.until_listed(await rest.start_job(dataset.name, trivial.name))
            bare_runs(3)

            bare = bare_runs(args.jobs)
            jobs = []
            for _ in range(args.jobs):
                started = time.perf_counter()
                job = await rest.until_listed(await rest.start_job(dataset.name, trivial.name))
                jobs.append(time.perf_counter() - started)
                if job["state"] != "STATE_SUCCEEDED" or not job.get("results"):
                    print(f"a benchmark job did not succeed: {job}", file=sys.stderr)
                    return 1

            sandbox_alone = await sandbox_runs(args.jobs, home)

            name = await rest.start_job(dataset.name, logger.name)
            latencies = await rest.log_latencies(name)

            bare_rate = bare_throughput(args.burst, args.concurrency)
            started = time.perf_counter()
            # Signed calls go one at a time (nonces must arrive in order); they are quick.
            names = [await rest.start_job(dataset.name, trivial.name) for _ in range(args.burst)]
            await asyncio.gather(*(rest.until_listed(n) for n in names))
            rate = args.burst / (time.perf_counter() - started)
        finally:
            await rest.close()

    ms = 1000.0
    p50, p95 = statistics.median(jobs), percentile(jobs, 95)
    b50, b95 = statistics.median(bare), percentile(bare, 95)
    l50, l95 = statistics.median(latencies), percentile(latencies, 95)
    ratio50, ratio95 = p50 / b50, p95 / b95
    print(f"\njob latency, REST start -> results listed ({args.jobs} jobs, one at a time)")
    print(f"  bare bwrap run   p50 {b50 * ms:7.1f} ms   p95 {b95 * ms:7.1f} ms")
    print(f"  mesh job         p50 {p50 * ms:7.1f} ms   p95 {p95 * ms:7.1f} ms")
    print(
        f"  ratio            p50 {ratio50:7.2f} x    p95 {ratio95:7.2f} x    "
        f"target <= 1.5x: {verdict(ratio50 <= 1.5)}"
    )
    s50 = statistics.median(sandbox_alone)
    print(
        f"  for scale: the sandbox alone (Sandbox.run, no mesh) p50 {s50 * ms:7.1f} ms, "
        f"{s50 / b50:.2f}x the bare run"
    )
    print(f"\nlog latency, algorithm print -> SSE client ({len(latencies)} lines)")
    print(
        f"  p50 {l50 * ms:6.1f} ms   p95 {l95 * ms:6.1f} ms   max "
        f"{max(latencies) * ms:6.1f} ms   target <= 50 ms: {verdict(l95 * ms <= 50)}"
    )
    print(f"\nsustained throughput, {args.burst} jobs queued at once, {args.concurrency} at a time")
    print(f"  bare bwrap runs  {bare_rate:6.1f} /s")
    print(f"  mesh jobs        {rate:6.1f} /s   ratio {rate / bare_rate:5.2f}")
    summary = {
        "job_p50_ms": p50 * ms,
        "job_p95_ms": p95 * ms,
        "bare_p50_ms": b50 * ms,
        "bare_p95_ms": b95 * ms,
        "ratio_p50": ratio50,
        "ratio_p95": ratio95,
        "log_p50_ms": l50 * ms,
        "log_p95_ms": l95 * ms,
        "jobs_per_s": rate,
        "bare_runs_per_s": bare_rate,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--jobs", type=int, default=30)
    parser.add_argument("--burst", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--log-lines", type=int, default=40)
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--log-level", help="the services' log level (default warning)")
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the node's state and its services' logs (at info level)",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("the benchmark runs the local sandbox, which needs root")
    # The services log to their own files; this process's sandbox logs are not wanted here.
    structlog.configure(
        processors=[structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(40),
    )
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
