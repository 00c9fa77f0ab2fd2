"""`c2d demo`: a whole job on a fresh local node, as a data owner and a consumer would run it,
checked against the same computation done directly on the host."""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import shutil
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

from c2d.provider.v1 import provider_pb2 as pb

from cli.follow import follow
from cli.output import kind_name
from cli.storage import storage_env
from cli.supervisor import Mesh, Supervisor, free_address
from mesh import config as mesh_config
from sdk.client import Client
from sdk.keys import Key

ROWS = 5000
COLUMNS = ("age", "glucose", "blood_pressure")


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def make_dataset(path: Path, rows: int = ROWS) -> None:
    """Fresh random 'patient' measurements: nothing real, but shaped like what the node
    protects."""
    rng = random.Random()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for _ in range(rows):
            writer.writerow(
                [rng.randint(18, 90), round(rng.gauss(100, 15), 2), round(rng.gauss(120, 12), 1)]
            )
    path.chmod(0o644)


def expected_summary(path: Path) -> dict[str, dict[str, float]]:
    """The demo algorithm's statistics, computed independently on the host."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    summary: dict[str, dict[str, float]] = {}
    for column in COLUMNS:
        values = [float(r[column]) for r in rows]
        mean = math.fsum(values) / len(values)
        summary[column] = {
            "count": len(values),
            "mean": mean,
            "min": min(values),
            "max": max(values),
            "stdev": math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values)),
        }
    return summary


def matches(got: dict[str, Any], want: dict[str, dict[str, float]]) -> list[str]:
    problems = []
    for column, stats in want.items():
        for name, value in stats.items():
            actual = got.get(column, {}).get(name)
            if actual is None or not math.isclose(actual, value, rel_tol=1e-9, abs_tol=1e-9):
                problems.append(f"{column}.{name}: job {actual}, host {value}")
    return problems


async def run_demo(args: argparse.Namespace) -> int:
    base = mesh_config.home()
    home = base / "demo"
    shutil.rmtree(home, ignore_errors=True)
    mesh_config.ensure_private_dir(home)
    owner = Key.load_or_create(base / "key.json")
    consumer = Key.load_or_create(home / "consumer-key.json")
    mesh = Mesh.defaults(
        home,
        owner.address,
        provider=free_address(),
        gateway=free_address(),
    )
    try:
        mesh.env.update(await storage_env(args))
    except ValueError as error:
        print(f"c2d demo: {error}", file=sys.stderr)
        return 2
    supervisor = Supervisor(mesh, log_dir=home / "logs")
    chain_node = None
    if args.paid:
        from cli.paid_demo import start_chain

        step("starting a local chain (ganache) with Ocean's contracts")
        chain_node, local = await start_chain(home, [owner.address, consumer.address])
        mesh.env.update(local.env())
        mesh.env["C2D_ENVIRONMENTS_FILE"] = str(home / "environments.json")

    step("starting the mesh: operator engine, operator service, provider, REST edge")
    started = time.monotonic()
    try:
        await supervisor.start()
    except RuntimeError as error:
        print(f"c2d demo: {error}", file=sys.stderr)
        for log_file in sorted((home / "logs").glob("*.log")):
            print(f"--- {log_file.name} (last lines)", file=sys.stderr)
            print("\n".join(log_file.read_text().splitlines()[-15:]), file=sys.stderr)
        if chain_node is not None:
            await chain_node.stop()
        return 1
    print(
        f"up in {time.monotonic() - started:.2f}s: provider {mesh.provider}, "
        f"REST http://{mesh.gateway}, state in {home}"
    )
    try:
        if args.paid:
            from cli.paid_demo import paid_scenario

            return await paid_scenario(mesh, home, owner, consumer, local)
        return await _scenario(mesh, home, owner, consumer)
    finally:
        step("stopping the mesh")
        stopping = time.monotonic()
        await supervisor.stop()
        if chain_node is not None:
            await chain_node.stop()
        print(f"stopped in {time.monotonic() - stopping:.2f}s")


def algorithm_code() -> bytes:
    """The demos' algorithm: column statistics of the patients' file."""
    return resources.files("cli").joinpath("demo_algorithm.py").read_bytes()


async def _scenario(mesh: Mesh, home: Path, owner: Key, consumer: Key) -> int:
    data_file = home / "data" / "patients.csv"
    make_dataset(data_file)
    code = algorithm_code()

    async with Client(mesh.provider, owner) as as_owner:
        step(f"data owner {owner.address} publishes an algorithm and a dataset")
        algorithm = await as_owner.publish_algorithm(
            code,
            "python3 $ALGO",
            metadata=pb.AssetMetadata(title="column statistics", license="MIT"),
        )
        print(f"algorithm {algorithm.did}")
        dataset = await as_owner.publish_dataset(
            [data_file],
            metadata=pb.AssetMetadata(title="patients (random, generated now)"),
            policy=pb.ComputePolicy(
                publisher_trusted_algorithms=[await as_owner.trust(algorithm.did)]
            ),
        )
        print(
            f"dataset   {dataset.did} ({dataset.files[0].size_bytes} bytes, trusts only "
            "the algorithm above, pinned by its checksums)"
        )

    async with Client(mesh.provider, consumer) as as_consumer:
        step(f"consumer {consumer.address} runs the algorithm on the dataset")
        job = await as_consumer.start_compute([dataset.did], algorithm=algorithm.did)
        in_s3 = mesh.env.get("C2D_STORAGE", "").startswith("s3://")
        return await finish(as_consumer, job.name, home, data_file, presigned=in_s3)


async def finish(
    client: Client, job_name: str, home: Path, data_file: Path, *, presigned: bool = False
) -> int:
    """Follows the job to its end, downloads its results, and checks the summary against
    the same computation on the host; with `presigned` (results in S3), fetches the summary
    once more by a presigned URL, straight from the store."""
    print(f"job {job_name.removeprefix('jobs/')}")
    final = await follow(client, job_name)
    if final.state != final.STATE_SUCCEEDED:
        print(f"c2d demo: the job did not succeed: {final.message}", file=sys.stderr)
        return 1

    step("consumer downloads the results (each checked against its sha256)")
    out = home / "downloads" / job_name.removeprefix("jobs/")
    out.mkdir(parents=True)
    summary: dict[str, Any] = {}
    for result in final.results:
        dest = out / f"{result.index}-{Path(result.name).name}"
        await client.download_result(final.name, result, dest)
        print(f"  {result.name:20} {kind_name(result.kind):18} {result.size_bytes:7} bytes")
        if result.name == "summary.json":
            summary = json.loads(dest.read_text())
    print(json.dumps(summary, indent=2, sort_keys=True))
    if presigned:
        await _fetch_by_url(client, final)

    step("checking the job's results against the same computation on the host")
    problems = matches(summary, expected_summary(data_file))
    if problems:
        print("MISMATCH:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    print(f"all {sum(len(s) for s in summary.values())} figures match the host's computation")
    return 0


async def _fetch_by_url(client: Client, job: Any) -> None:
    import hashlib

    import httpx

    result = next(r for r in job.results if r.name == "summary.json")
    step("results are in S3: the consumer asks for a presigned URL and fetches summary.json by it")
    response = await client.result_url(job.name, result)
    async with httpx.AsyncClient(timeout=30) as http:
        fetched = await http.get(response.url)
    fetched.raise_for_status()
    digest = hashlib.sha256(fetched.content).hexdigest()
    if digest != result.sha256:
        raise SystemExit("c2d demo: the presigned download does not match its sha256")
    expires = response.expire_time.ToDatetime().strftime("%H:%M:%S UTC")
    print(f"  {len(fetched.content)} bytes, sha256 ok, URL valid until {expires}")
