"""Whole jobs on dataset files fetched from S3 and HTTP(S), through the Operator Engine's own
gRPC API: a real engine (local runner, real sandbox), moto's S3 server and an HTTP server on
127.0.0.1, the node's source credentials in a file. The algorithm reads its inputs, and reports
everything it can see (its environment, every file under /data, every process's environment):
no secret, no location of the data is among it."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from c2d.common.v1 import job_pb2
from c2d.engine.v1 import engine_pb2, engine_pb2_grpc

from mesh import jobs as job_facts
from mesh.channels import open_channel
from mesh.storage import result_key, storage_from_url
from operator_engine.config import EngineConfig
from operator_engine.mounts import mounted_under
from operator_engine.runner import Runner
from operator_engine.server import build
from operator_engine.sources import SourceSettings
from tests.conftest import SandboxIdentity, engine_config, needs_root
from tests.pods.http_source import TOKEN, HttpSource
from tests.s3_server import ACCESS_KEY_ID, REGION, S3Server

pytestmark = needs_root

DATASET = "5e" * 32
KEY = "exports/2026/readings.csv"
S3_SECRET = "e2e-s3-secret-8d7c6b"
LOCAL, FROM_S3, FROM_HTTP = b"1\n2\n3\n", b"10\n20\n", b"100\n200\n"

# Sums its inputs, checks it cannot write them, and reports all it can read.
ALGORITHM = b"""
import json, os
total = 0
writable = []
folder = os.path.join("/data/inputs", json.loads(os.environ["DIDS"])[0])
for name in sorted(os.listdir(folder), key=int):
    path = os.path.join(folder, name)
    with open(path) as f:
        total += sum(int(line) for line in f if line.strip())
    try:
        open(path, "ab").close()
        writable.append(name)
    except OSError:
        pass
seen = [json.dumps(dict(os.environ))]
for root, _, files in os.walk("/data"):
    for name in files:
        try:
            with open(os.path.join(root, name), "rb") as f:
                seen.append(f.read().decode("utf-8", "replace"))
        except OSError:
            pass
for pid in os.listdir("/proc"):
    for part in ("environ", "cmdline"):
        try:
            with open(f"/proc/{pid}/{part}", "rb") as f:
                seen.append(f.read().decode("utf-8", "replace"))
        except OSError:
            pass
params = json.load(open("/data/inputs/algoCustomData.json"))
with open("/data/outputs/result.json", "w") as f:
    json.dump({
        "total": total,
        "writable": writable,
        "credentials_file_visible": os.path.exists(params["credentials_file"]),
    }, f)
with open("/data/outputs/seen.txt", "w") as f:
    f.write("\\n".join(seen))
print("total", total, flush=True)
"""


@dataclass
class Engine:
    config: EngineConfig
    runner: Runner
    stub: engine_pb2_grpc.EngineServiceStub
    credentials_file: Path


@pytest.fixture
async def engine(tmp_path: Path, s3_server: S3Server) -> AsyncIterator[Engine]:
    """An engine whose source credentials name the test's S3 server and HTTP token, read from
    an owner-only file as the engine reads C2D_SOURCE_CREDENTIALS."""
    credentials = tmp_path / "secrets" / "sources.json"
    credentials.parent.mkdir(mode=0o700)
    store = {
        "endpoint_url": s3_server.endpoint_url,
        "region": REGION,
        "access_key_id": ACCESS_KEY_ID,
        "secret_access_key": S3_SECRET,
    }
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    document = {"store": {"s3": store}, "api": {"http": {"headers": bearer}}}
    credentials.write_text(json.dumps(document))
    credentials.chmod(0o600)
    home = tmp_path / "home"
    sandbox = SandboxIdentity.new()
    config = engine_config(home, sandbox)
    config.data_root.mkdir(parents=True)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("C2D_SOURCE_CREDENTIALS", str(credentials))
        # Short, so that the hung server's test ends soon; the files here take milliseconds.
        env.setenv("C2D_SOURCE_TIMEOUT_S", "2")
        config = dataclasses.replace(config, sources=SourceSettings.from_env())
    server, runner = await build(config)
    await server.start()
    channel = open_channel(server.address)
    try:
        yield Engine(config, runner, engine_pb2_grpc.EngineServiceStub(channel), credentials)
    finally:
        await channel.close()
        await runner.close()
        await server.stop(0.5)
        runner.sandbox.close()
        assert mounted_under(home) == [], "the engine left a job disk mounted"


def job_spec(engine: Engine, files: list[engine_pb2.DatasetFileSource]) -> engine_pb2.JobSpec:
    return engine_pb2.JobSpec(
        job_id=job_facts.new_job_id(),
        owner="0x" + "12" * 20,
        datasets=[
            engine_pb2.DatasetInput(id=DATASET, files=files, ddo_json='{"name": "readings"}')
        ],
        algorithm=engine_pb2.AlgorithmInput(
            code=ALGORITHM,
            code_sha256=hashlib.sha256(ALGORITHM).hexdigest(),
            entrypoint="python3 $ALGO",
        ),
        parameters_json=json.dumps({"credentials_file": str(engine.credentials_file)}),
        environment="default",
    )


def fetched(content: bytes, **location: str) -> engine_pb2.DatasetFileSource:
    return engine_pb2.DatasetFileSource(
        size_bytes=len(content), sha256=hashlib.sha256(content).hexdigest(), **location
    )


async def run(engine: Engine, spec: engine_pb2.JobSpec) -> job_pb2.Job:
    await engine.stub.RunJob(engine_pb2.RunJobRequest(spec=spec), timeout=10)
    final = job_pb2.Job()
    async with asyncio.timeout(60):
        async for update in engine.stub.WatchJob(engine_pb2.WatchJobRequest(job_id=spec.job_id)):
            final = update.job
    return final


async def gone(path: Path) -> None:
    """Waits for the cleanup that follows a job's final state to remove `path`."""
    async with asyncio.timeout(10):
        while path.exists():
            await asyncio.sleep(0.02)


async def result(config: EngineConfig, job: job_pb2.Job, name: str) -> bytes:
    storage = storage_from_url(config.storage_url)
    (found,) = [r for r in job.results if r.name == name]
    job_id = job.name.removeprefix("jobs/")
    return b"".join([chunk async for chunk in storage.read(job_id, result_key(found))])


async def test_a_job_reads_files_fetched_from_s3_and_http_and_never_sees_a_secret(
    engine: Engine, s3_server: S3Server, s3_bucket: str, http_source: HttpSource
) -> None:
    local = engine.config.data_root / "readings-local.csv"
    local.write_bytes(LOCAL)
    local.chmod(0o644)
    s3_server.put_object(s3_bucket, KEY, FROM_S3)
    http_source.serve("readings.csv", FROM_HTTP)
    spec = job_spec(
        engine,
        [
            engine_pb2.DatasetFileSource(path=str(local)),
            fetched(FROM_S3, s3_url=f"s3://{s3_bucket}/{KEY}", credentials="store"),
            fetched(
                FROM_HTTP, http_url=http_source.url("/private/readings.csv"), credentials="api"
            ),
        ],
    )

    job = await run(engine, spec)

    assert job.state == job_pb2.Job.STATE_SUCCEEDED, job.message
    report = json.loads(await result(engine.config, job, "result.json"))
    assert report == {"total": 6 + 30 + 300, "writable": [], "credentials_file_visible": False}
    configuration = (await result(engine.config, job, "configuration.log")).decode()
    assert f"file 1 of dataset {DATASET}: {len(FROM_S3)} bytes fetched from S3" in configuration
    assert f"file 2 of dataset {DATASET}: {len(FROM_HTTP)} bytes fetched from HTTP" in configuration
    assert http_source.seen == [("/private/readings.csv", f"Bearer {TOKEN}")]

    # Nothing the algorithm could read, nor anything the consumer receives, holds a secret or
    # where the data is.
    seen = (await result(engine.config, job, "seen.txt")).decode()
    assert "readings" in seen  # the DDO: the report is really of what it read
    received = [seen, configuration, job.message]
    received.append((await result(engine.config, job, "algorithm.log")).decode())
    for secret in (S3_SECRET, TOKEN, ACCESS_KEY_ID, s3_bucket, KEY, s3_server.endpoint_url):
        for text in received:
            assert secret not in text, secret
    for text in received:
        assert http_source.base_url not in text
    # The fetched copies go with the job.
    await gone(engine.runner.get(spec.job_id).workspace / "dataset-inputs")


async def test_a_checksum_mismatch_fails_the_job_as_data_provisioning_with_its_logs(
    engine: Engine, s3_server: S3Server, s3_bucket: str, http_source: HttpSource
) -> None:
    s3_server.put_object(s3_bucket, KEY, FROM_S3)
    http_source.serve("readings.csv", FROM_HTTP)
    wrong = fetched(FROM_HTTP, http_url=http_source.url("/private/readings.csv"))
    wrong.credentials = "api"
    wrong.sha256 = hashlib.sha256(b"what the owner recorded").hexdigest()
    spec = job_spec(
        engine, [fetched(FROM_S3, s3_url=f"s3://{s3_bucket}/{KEY}", credentials="store"), wrong]
    )

    job = await run(engine, spec)

    assert job.state == job_pb2.Job.STATE_FAILED
    assert job.failure_reason == job_pb2.FAILURE_REASON_DATA_PROVISIONING_FAILED
    assert job.status_code == 31
    assert job.message == f"file 1 of dataset {DATASET}: content does not match its recorded sha256"
    kinds = {r.name: r.kind for r in job.results}
    assert kinds["configuration.log"] == job_pb2.ResultFile.KIND_CONFIGURATION_LOG
    configuration = (await result(engine.config, job, "configuration.log")).decode()
    assert f"{len(FROM_S3)} bytes fetched from S3" in configuration
    assert "configure failed: file 1 of dataset" in configuration
    for text in (configuration, job.message):
        for secret in (s3_bucket, KEY, http_source.base_url, TOKEN, S3_SECRET):
            assert secret not in text
    await gone(engine.runner.get(spec.job_id).workspace / "dataset-inputs")


async def test_a_hung_server_fails_the_job_in_bounded_time(
    engine: Engine, http_source: HttpSource
) -> None:
    """The reference system's known failure: a job stuck in configuring after a hung download."""
    spec = job_spec(engine, [fetched(FROM_HTTP, http_url=http_source.url("/hang"))])
    started = time.monotonic()
    job = await run(engine, spec)
    assert time.monotonic() - started < 10
    assert (job.state, job.failure_reason) == (
        job_pb2.Job.STATE_FAILED,
        job_pb2.FAILURE_REASON_DATA_PROVISIONING_FAILED,
    )
    assert job.message == f"file 0 of dataset {DATASET}: timed out (no answer within 2 s)"
    assert "configure failed" in (await result(engine.config, job, "configuration.log")).decode()


async def test_a_stop_does_not_wait_for_a_download(engine: Engine, http_source: HttpSource) -> None:
    http_source.serve("readings.csv", FROM_HTTP * 50)
    spec = job_spec(
        engine, [fetched(FROM_HTTP * 50, http_url=http_source.url("/slow/readings.csv"))]
    )
    await engine.stub.RunJob(engine_pb2.RunJobRequest(spec=spec), timeout=10)
    async with asyncio.timeout(10):
        async for update in engine.stub.WatchJob(engine_pb2.WatchJobRequest(job_id=spec.job_id)):
            if update.job.state == job_pb2.Job.STATE_CONFIGURING:
                break
    await asyncio.sleep(0.3)  # into the download
    started = time.monotonic()
    stopped = await engine.stub.StopJob(engine_pb2.StopJobRequest(job_id=spec.job_id), timeout=10)
    assert time.monotonic() - started < 1.5
    assert stopped.job.state == job_pb2.Job.STATE_CANCELLED
    configuration = (await result(engine.config, stopped.job, "configuration.log")).decode()
    assert "configure stopped" in configuration
    await gone(engine.runner.get(spec.job_id).workspace / "dataset-inputs")
