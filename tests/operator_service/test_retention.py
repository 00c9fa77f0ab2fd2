"""Retention of results, with a real engine, Operator Service and Provider: a job in an
environment with a retention gets `results_expire_time` = its end time plus the retention; after
it, the Operator Service's sweeper deletes its results and its workspace on the engine, the job
stays listed with `results_expired`, and downloads are NOT_FOUND (RESULTS_EXPIRED). A job in an
environment without one keeps its results; a storage that fails to delete is tried again at the
next sweep; a restarted Operator Service still expires results; the engine's recovery leaves no
job disk behind for a final job. The settings and the registry's index need no sandbox."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import structlog
from c2d.common.v1 import job_pb2
from c2d.engine.v1 import engine_pb2
from c2d.operator.v1 import operator_pb2, operator_pb2_grpc

from cli.main import _results_expiry, build_parser
from mesh import jobs as job_facts
from mesh.channels import open_channel
from mesh.storage import LocalStorage, Storage
from operator_engine.config import EngineConfig, EnvironmentSpec
from operator_engine.disks import JobDisks
from operator_engine.mounts import mounted_under
from operator_engine.runner import _DISK_FILE, Runner
from operator_engine.server import build as build_engine
from operator_service.config import OperatorConfig
from operator_service.server import OperatorService
from operator_service.server import build as build_operator
from operator_service.store import JobStore
from provider.config import ProviderConfig
from provider.server import build as build_provider
from sdk.keys import Key
from tests.conftest import (
    LocalMesh,
    SandboxIdentity,
    engine_config,
    needs_root,
    new_key,
    write_key,
)
from tests.e2e.test_job import error_info, publish_pair, run_to_end
from tests.operator_service.node import job_spec

State = job_pb2.Job.State
RETENTION_S = 1.0
RETENTION_NS = round(RETENTION_S * 1e9)
SWEEP_S = 0.2
ENVIRONMENTS = (
    EnvironmentSpec(),
    EnvironmentSpec(name="brief", result_retention_s=RETENTION_S),
)
WRITES_AN_OUTPUT = b"print('hello', flush=True)\nopen('/data/outputs/out.txt', 'w').write('42')\n"


# -- real services -----------------------------------------------------------------------------


@dataclass
class Engine:
    home: Path
    config: EngineConfig
    runner: Runner
    address: str

    def results(self, job_id: str) -> Path:
        """The job's folder in the (local) results storage."""
        return Path(self.config.storage_url) / job_id

    def workspace(self, job_id: str) -> Path:
        return self.config.workspace_root / job_id


@contextlib.asynccontextmanager
async def running_engine(home: Path) -> AsyncIterator[Engine]:
    """An engine with ENVIRONMENTS on state under `home` (fresh, or what one before left)."""
    sandbox = SandboxIdentity.new()
    config = engine_config(home, sandbox, ENVIRONMENTS)
    config.data_root.mkdir(parents=True, exist_ok=True)
    server, runner = await build_engine(config)
    assert isinstance(runner, Runner)  # the local backend
    await server.start()
    try:
        yield Engine(home, config, runner, server.address)
    finally:
        await runner.close()
        await server.stop(0.5)
        runner.sandbox.close()
        assert mounted_under(home) == [], "the engine left a job disk mounted"
        assert not sandbox.stage_root.exists(), "the engine left its staging root"


@dataclass
class Operator:
    service: OperatorService
    stub: operator_pb2_grpc.OperatorServiceAsyncStub

    async def job(self, job_id: str, caller: str) -> job_pb2.Job:
        request = operator_pb2.GetJobRequest(job_id=job_id, owner=caller)
        return (await self.stub.GetJob(request)).job

    async def run(self, spec: engine_pb2.JobSpec) -> job_pb2.Job:
        """Creates the job and returns it final."""
        await self.stub.CreateJob(operator_pb2.CreateJobRequest(spec=spec))
        request = operator_pb2.WatchJobRequest(job_id=spec.job_id, owner=spec.owner)
        async with asyncio.timeout(60):
            updates = [response.job async for response in self.stub.WatchJob(request)]
        return updates[-1]

    async def read(self, job_id: str, caller: str, index: int) -> bytes:
        request = operator_pb2.ReadResultRequest(job_id=job_id, owner=caller, index=index)
        return b"".join([r.data async for r in self.stub.ReadResult(request)])


@contextlib.asynccontextmanager
async def running_operator(
    home: Path,
    *,
    sweep_s: float = SWEEP_S,
    storage: Storage | None = None,
    lease_s: float = 10,
) -> AsyncIterator[Operator]:
    """An Operator Service in front of the engine of `home` (running or not), its registry
    under `home` (so one started after another takes up its registry), sweeping every
    `sweep_s`."""
    service = await build_operator(
        OperatorConfig(
            listen=f"unix:{home / 'run' / 'operator.sock'}",
            engine_address=f"unix:{home / 'run' / 'engine.sock'}",  # as engine_config's
            database=home / "operator" / "operator.db",
            storage_url=str(home / "results"),
            engine_lease_s=lease_s,
            retention_sweep_s=sweep_s,
        ),
        storage,
    )
    await service.start()
    channel = open_channel(service.server.address)
    try:
        yield Operator(service, operator_pb2_grpc.OperatorServiceStub(channel))
    finally:
        await channel.close()
        await service.tracker.close()
        await service.server.stop(0.5)
        await service.close()


@contextlib.asynccontextmanager
async def running_provider(
    engine: Engine, operator: Operator, owner: Key
) -> AsyncIterator[LocalMesh]:
    provider = await build_provider(
        ProviderConfig(
            listen="127.0.0.1:0",
            operator_address=operator.service.server.address,
            database=engine.home / "provider" / "provider.db",
            data_root=engine.config.data_root,
            owners=frozenset({owner.address}),
        )
    )
    await provider.server.start()
    try:
        yield LocalMesh(
            home=engine.home,
            data_root=engine.config.data_root,
            provider_address=provider.server.address,
            operator_address=operator.service.server.address,
            engine_address=engine.address,
            owner=owner,
            stray_processes=engine.runner.sandbox.stray_processes,
        )
    finally:
        await provider.server.stop(0.5)
        await provider.close()


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 10) -> None:
    async with asyncio.timeout(timeout_s):
        while not await check():
            await asyncio.sleep(0.05)


def utc_seconds(nanos: int) -> str:
    """A time as the expiry message names it."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(nanos // 1_000_000_000))


class FailingDeletes(LocalStorage):
    """The node's local storage, whose deletes fail while `failing` (the storage is down)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.failing = True
        self.attempts = 0

    async def delete_job(self, job_id: str) -> None:
        self.attempts += 1
        if self.failing:
            raise OSError("storage unreachable (a test's failing storage)")
        await super().delete_job(job_id)


# -- through the Provider ----------------------------------------------------------------------


@needs_root
async def test_results_expire_after_their_environments_retention(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    owner_key, consumer_key = new_key(), new_key()
    key_file = tmp_path / "consumer.json"
    write_key(key_file, consumer_key)
    async with (
        running_engine(tmp_path / "home") as engine,
        running_operator(engine.home) as operator,
        running_provider(engine, operator, owner_key) as mesh,
        mesh.client(owner_key) as owner,
        mesh.client(consumer_key) as consumer,
    ):
        environments = {e.name: e for e in await consumer.list_environments()}
        assert environments["brief"].result_retention.ToNanoseconds() == RETENTION_NS
        assert not environments["default"].HasField("result_retention")

        algorithm, dataset = await publish_pair(mesh, owner)
        with structlog.testing.capture_logs() as logs:
            brief = await consumer.start_compute(
                [dataset.did], algorithm=algorithm.did, environment="brief"
            )
            kept = await consumer.start_compute([dataset.did], algorithm=algorithm.did)
            _, brief_final = await run_to_end(consumer, brief)
            _, kept_final = await run_to_end(consumer, kept)
            assert brief_final.state == State.STATE_SUCCEEDED, brief_final.message
            assert kept_final.state == State.STATE_SUCCEEDED, kept_final.message
            # Fixed when the job ends: its end time plus the retention.
            expire_ns = brief_final.end_time.ToNanoseconds() + RETENTION_NS
            assert brief_final.results_expire_time.ToNanoseconds() == expire_ns
            assert not brief_final.results_expired
            assert not kept_final.HasField("results_expire_time")

            async def brief_expired() -> bool:
                return (await consumer.get_job(brief.name)).results_expired

            await eventually(brief_expired)
        assert time.time_ns() >= expire_ns
        brief_id, kept_id = (job.name.removeprefix("jobs/") for job in (brief, kept))

        # Its results and its scratch space are gone; the job is still listed, results too.
        assert not engine.results(brief_id).exists()
        assert not engine.workspace(brief_id).exists()
        assert brief_id not in engine.runner.jobs
        expired = await consumer.get_job(brief.name)
        assert list(expired.results) == list(brief_final.results)
        assert expired.results_expire_time == brief_final.results_expire_time
        listed = {job.name: job for job in await consumer.list_jobs()}
        assert listed[brief.name].results_expired and not listed[kept.name].results_expired

        # A download, or the published log, is NOT_FOUND, saying so and when.
        output = next(r for r in brief_final.results if r.name == "total.json")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await consumer.download_result(brief.name, output, tmp_path / "total.json")
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_info(refused.value).reason == "RESULTS_EXPIRED"
        assert f"expired at {utc_seconds(expire_ns)}" in (refused.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as no_log:
            [chunk async for chunk in consumer.stream_logs(brief.name)]
        assert error_info(no_log.value).reason == "RESULTS_EXPIRED"

        # The job in the environment without a retention keeps its results.
        kept_output = next(r for r in kept_final.results if r.name == "total.json")
        saved = await consumer.download_result(kept.name, kept_output, tmp_path / "kept.json")
        assert saved.read_text() == '{"total": 6}'
        assert engine.results(kept_id).is_dir()

        # What the CLI shows of it.
        async def c2d(*argv: str) -> str:
            args = build_parser().parse_args(
                [*argv, "--provider", mesh.provider_address, "--key-file", str(key_file)]
            )
            capsys.readouterr()
            assert await args.run(args) == 0
            return capsys.readouterr().out

        shown = await c2d("environments")
        assert "results kept 1 s after the job ends" in shown
        assert "results kept until the job is deleted" in shown
        expiry = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(expire_ns // 1_000_000_000))
        assert _results_expiry(brief_final) == f"results expire at {expiry}"
        assert f"results expired at {expiry}" in await c2d("compute", "status", brief_id)
        assert "results expire" not in await c2d("compute", "status", kept_id)
        lines_shown = (await c2d("compute", "list")).splitlines()
        assert any(
            line.startswith(brief_id) and "(results expired)" in line for line in lines_shown
        )
        assert not any(line.startswith(kept_id) and "expired" in line for line in lines_shown)

        # One line per expired job, one summary for the sweep that expired it.
        lines = [e for e in logs if e["event"] == "results expired"]
        assert [e["job_id"] for e in lines] == [brief_id]
        assert [e["expired"] for e in logs if e["event"] == "retention sweep"] == [1]

        # Deleting a job deletes it all, expired or not.
        for job in (brief, kept):
            await consumer.delete_job(job.name)
            with pytest.raises(grpc.aio.AioRpcError) as gone:
                await consumer.get_job(job.name)
            assert gone.value.code() == grpc.StatusCode.NOT_FOUND
        assert not engine.results(kept_id).exists()
        assert not engine.workspace(kept_id).exists()


# -- the Operator Service alone --------------------------------------------------------------


@needs_root
async def test_a_failing_storage_is_tried_again_and_the_service_stays_up(tmp_path: Path) -> None:
    owner = new_key().address
    async with running_engine(tmp_path / "home") as engine:
        storage = FailingDeletes(Path(engine.config.storage_url))
        async with running_operator(engine.home, storage=storage) as operator:
            spec = job_spec(engine.config.data_root, owner, WRITES_AN_OUTPUT, environment="brief")
            with structlog.testing.capture_logs() as logs:
                final = await operator.run(spec)
                assert final.state == State.STATE_SUCCEEDED, final.message

                async def tried(times: int) -> bool:
                    return storage.attempts >= times

                await eventually(lambda: tried(3))
                # Not marked, not deleted; yet not served past its time.
                job = await operator.job(spec.job_id, owner)
                assert not job.results_expired
                assert engine.results(spec.job_id).is_dir()
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await operator.read(spec.job_id, owner, 0)
                assert error_info(refused.value).reason == "RESULTS_EXPIRED"
                # The sweeper goes on.
                more = storage.attempts + 2
                await eventually(lambda: tried(more))

                storage.failing = False

                async def expired() -> bool:
                    return (await operator.job(spec.job_id, owner)).results_expired

                await eventually(expired)
            assert not engine.results(spec.job_id).exists()
            assert not engine.workspace(spec.job_id).exists()
    failures = [e for e in logs if e["event"].startswith("could not delete expired results")]
    assert len(failures) >= 3
    assert all(e["job_id"] == spec.job_id and "OSError" in e["error"] for e in failures)
    sweeps = [e for e in logs if e["event"] == "retention sweep"]
    assert sweeps[0]["retrying"] == 1 and sweeps[0]["expired"] == 0
    assert sweeps[-1]["expired"] == 1


@needs_root
async def test_a_restarted_operator_service_expires_results_that_came_due_meanwhile(
    tmp_path: Path,
) -> None:
    owner = new_key().address
    async with running_engine(tmp_path / "home") as engine:
        spec = job_spec(engine.config.data_root, owner, WRITES_AN_OUTPUT, environment="brief")
        # Sweeps only at start (before the job ends), then not for an hour.
        async with running_operator(engine.home, sweep_s=3600) as operator:
            final = await operator.run(spec)
        assert final.state == State.STATE_SUCCEEDED, final.message
        # Down past the expiry: nothing deleted them.
        expire_ns = final.results_expire_time.ToNanoseconds()
        await asyncio.sleep(max(0.0, (expire_ns - time.time_ns()) / 1e9) + 0.1)
        assert engine.results(spec.job_id).is_dir()

        async with running_operator(engine.home, sweep_s=3600) as operator:

            async def expired() -> bool:
                return (await operator.job(spec.job_id, owner)).results_expired

            # Its sweep at start, on what the registry kept.
            await eventually(expired)
            job = await operator.job(spec.job_id, owner)
            assert job.results_expire_time.ToNanoseconds() == expire_ns
            assert len(job.results) == len(final.results) > 0
        assert not engine.results(spec.job_id).exists()
        assert not engine.workspace(spec.job_id).exists()


@needs_root
async def test_a_job_that_ended_while_its_retention_was_unknown_expires_once_it_is_known(
    tmp_path: Path,
) -> None:
    """The Operator Service came back while the engine was down, and ended a job of its
    registry `engine lost` before it could ask the engine for the job's environment: the job
    is due at its end, and the sweeper fixes its expiry once the engine answers."""
    home = tmp_path / "home"
    owner = new_key().address
    spec = job_spec(home / "data", owner, environment="brief")
    store = await JobStore.open(home / "operator" / "operator.db")
    queued = job_pb2.Job(
        name=job_facts.job_name(spec.job_id),
        owner=owner,
        environment="brief",
        state=State.STATE_QUEUED,
    )
    await store.insert(spec, queued, time.time())  # its lease is over
    await store.close()

    async with running_operator(home, lease_s=0.5) as operator:

        async def ended() -> bool:
            return job_facts.is_final((await operator.job(spec.job_id, owner)).state)

        await eventually(ended)
        lost = await operator.job(spec.job_id, owner)
        assert lost.failure_reason == job_pb2.FAILURE_REASON_ENGINE_LOST
        assert not lost.HasField("results_expire_time")
        await asyncio.sleep(3 * SWEEP_S)  # due, but nothing to decide with
        assert not (await operator.job(spec.job_id, owner)).results_expired

        async with running_engine(home):

            async def expired() -> bool:
                return (await operator.job(spec.job_id, owner)).results_expired

            # Once the engine has been asked again (failed lists are not retried at once).
            await eventually(expired, timeout_s=15)
        job = await operator.job(spec.job_id, owner)
        expected = lost.end_time.ToNanoseconds() + RETENTION_NS
        assert job.results_expire_time.ToNanoseconds() == expected


@needs_root
async def test_recovery_releases_the_disk_a_final_job_left(tmp_path: Path) -> None:
    """An engine cut off between a job's end and its cleanup leaves the job's disk mounted;
    the next engine's recovery removes it rather than keep it until the job is deleted."""
    home = tmp_path / "home"
    owner = new_key().address
    async with running_engine(home) as engine, running_operator(home, sweep_s=3600) as operator:
        spec = job_spec(engine.config.data_root, owner, WRITES_AN_OUTPUT)
        final = await operator.run(spec)
        assert final.state == State.STATE_SUCCEEDED, final.message
        workspace = engine.workspace(spec.job_id)
        disks = JobDisks(engine.config.workspace_root.parent / "disks")
    # What the cut-off engine left: the job's disk, mounted and still named in its workspace.
    left = await disks.take(ENVIRONMENTS[0].disk_bytes)
    (workspace / _DISK_FILE).write_text(str(left))
    assert left in mounted_under(home)

    async with running_engine(home) as engine:
        assert left not in mounted_under(home)
        assert not left.exists() and not (disks.images / f"{left.name}.img").exists()
        assert not (workspace / _DISK_FILE).exists()
        # The job itself is kept, final, with its results.
        recovered = engine.runner.get(spec.job_id).job
        assert recovered.state == State.STATE_SUCCEEDED
        assert list(recovered.results) == list(final.results)


# -- settings and the registry ---------------------------------------------------------------


@pytest.mark.parametrize("seconds", [-1.0, float("nan"), float("inf")])
def test_an_environments_retention_is_a_number_of_seconds(seconds: float) -> None:
    with pytest.raises(ValueError, match="result_retention_s"):
        EnvironmentSpec(name="odd", result_retention_s=seconds)


def test_the_sweep_interval_is_a_positive_number(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("C2D_HOME", str(tmp_path))
    assert OperatorConfig.from_env().retention_sweep_s == 60.0
    monkeypatch.setenv("C2D_RETENTION_SWEEP_S", "0.5")
    assert OperatorConfig.from_env().retention_sweep_s == 0.5
    for bad in ("0", "-1", "soon"):
        monkeypatch.setenv("C2D_RETENTION_SWEEP_S", bad)
        with pytest.raises(ValueError, match="C2D_RETENTION_SWEEP_S"):
            OperatorConfig.from_env()


async def test_a_sweep_reads_due_jobs_by_an_index_and_an_older_registry_gains_it(
    tmp_path: Path,
) -> None:
    database = tmp_path / "operator" / "operator.db"
    owner = new_key().address
    # A registry as the version before retention left it, with a job that ended then.
    store = await JobStore.open(database)
    old_id = job_facts.new_job_id()
    old = job_pb2.Job(name=job_facts.job_name(old_id), owner=owner, state=State.STATE_SUCCEEDED)
    await store.insert(engine_pb2.JobSpec(job_id=old_id, owner=owner), old, 0.0)
    await store.close()
    db = sqlite3.connect(database)
    db.executescript(
        "DROP INDEX jobs_by_results_due; ALTER TABLE jobs DROP COLUMN results_due; "
        "PRAGMA user_version = 1;"
    )
    db.close()

    store = await JobStore.open(database)
    try:
        due_id = job_facts.new_job_id()
        due = job_pb2.Job(name=job_facts.job_name(due_id), owner=owner, state=State.STATE_QUEUED)
        await store.insert(engine_pb2.JobSpec(job_id=due_id, owner=owner), due, 0.0)
        due.state = State.STATE_SUCCEEDED
        await store.save(due, results_due=100.0)

        statements: list[str] = []
        store.db.set_trace_callback(statements.append)
        # The job that ended before retention keeps its results: it is never due.
        assert await store.due(1000.0, 10) == [(100.0, due_id)]
        assert await store.due(99.0, 10) == []
        assert await store.due(1000.0, 10, after=(100.0, due_id)) == []
        store.db.set_trace_callback(None)
        # The last page's statement, as it ran (with its values).
        query = [s for s in statements if "results_due <=" in s][-1]
        plan = " ".join(str(row) for row in store.db.execute(f"EXPLAIN QUERY PLAN {query}"))
        assert "USING COVERING INDEX jobs_by_results_due" in plan, plan

        expired = await store.mark_expired(due_id)
        assert expired is not None and expired.results_expired
        assert await store.due(1000.0, 10) == []
        assert await store.mark_expired(job_facts.new_job_id()) is None
    finally:
        await store.close()
