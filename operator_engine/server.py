"""Builds the Operator Engine's gRPC server; refuses to start when the sandbox cannot enforce
its limits."""

from __future__ import annotations

import structlog
from c2d.engine.v1 import engine_pb2, engine_pb2_grpc

from mesh.server import Server
from mesh.storage import storage_from_url
from operator_engine.config import EngineConfig
from operator_engine.disks import DisksUnavailable, JobDisks
from operator_engine.runner import Runner
from operator_engine.sandbox import Sandbox, SandboxConfig, SandboxUnavailable
from operator_engine.servicer import EngineServicer

log = structlog.get_logger()
SERVICE_NAME = engine_pb2.DESCRIPTOR.services_by_name["EngineService"].full_name


async def build(config: EngineConfig) -> tuple[Server, Runner]:
    """Checks the sandbox (raises SandboxUnavailable with the reason), sweeps what a crashed
    engine left behind, and returns the server with its runner, not yet started."""
    sandbox = Sandbox(
        SandboxConfig(
            uid_base=config.sandbox_uid_base,
            uid_count=config.sandbox_uid_count,
            stage_root=config.sandbox_stage_root,
            cgroup_name=config.sandbox_cgroup_name,
        )
    )
    sandbox.check()
    try:
        await sandbox.sweep()
        networked = [env.name for env in config.environments if env.network_allowed]
        if networked:
            # Their jobs may get the network, only ever filtered (never the node's loopback or
            # its own addresses): without the filter the engine does not start.
            try:
                await sandbox.check_network()
            except SandboxUnavailable as error:
                raise SandboxUnavailable(
                    f"environment {', '.join(networked)} allows the network: {error}"
                ) from None
        disks = JobDisks(config.workspace_root.parent / "disks")
        try:
            disks.check()
        except DisksUnavailable as error:
            raise SandboxUnavailable(f"cannot enforce the disk limit: {error}") from None
        config.workspace_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        runner = Runner(config, sandbox, storage_from_url(config.storage_url), disks)
        # Jobs a previous engine left: queued ones queue again, interrupted ones end with a
        # reason; the other disks it left are removed.
        await runner.recover()
    except BaseException:
        sandbox.close()  # its parked sandboxes and staging mounts, when no job started
        raise
    for env in config.environments:
        disks.want(env.disk_bytes, env.max_concurrent_jobs)
    servicer = EngineServicer(runner)
    server = Server(
        "operator_engine",
        lambda s: engine_pb2_grpc.add_EngineServiceServicer_to_server(servicer, s),
        [SERVICE_NAME],
    )
    server.bind(config.listen)
    return server, runner
