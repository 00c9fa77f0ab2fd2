"""Builds the Operator Engine's gRPC server; refuses to start when the sandbox cannot enforce
its limits."""

from __future__ import annotations

import structlog
from c2d.engine.v1 import engine_pb2, engine_pb2_grpc

from mesh import config as mesh_config
from mesh.server import Server
from mesh.storage import storage_from_url
from operator_engine.backends import Backend
from operator_engine.config import EngineConfig
from operator_engine.disks import DisksUnavailable, JobDisks
from operator_engine.images import ImageCache
from operator_engine.runner import Runner
from operator_engine.sandbox import Sandbox, SandboxConfig, SandboxUnavailable
from operator_engine.servicer import EngineServicer

log = structlog.get_logger()
SERVICE_NAME = engine_pb2.DESCRIPTOR.services_by_name["EngineService"].full_name


async def build(config: EngineConfig) -> tuple[Server, Backend]:
    """Checks the backend (raises SandboxUnavailable with the reason), picks up what a previous
    engine left behind, and returns the server with its backend, not yet started."""
    if config.backend == "kubernetes":
        backend: Backend = await _kubernetes_backend(config)
    else:
        backend = await _local_backend(config)
    servicer = EngineServicer(backend)
    server = Server(
        "operator_engine",
        lambda s: engine_pb2_grpc.add_EngineServiceServicer_to_server(servicer, s),
        [SERVICE_NAME],
        tls=config.tls,
    )
    server.bind(config.listen)
    return server, backend


async def _kubernetes_backend(config: EngineConfig) -> Backend:
    # Imported here: the local engine never loads the Kubernetes client.
    from operator_engine.backends.kubernetes import ClusterUnavailable, KubernetesBackend, connect
    from operator_engine.backends.kubernetes_config import KubernetesSettings

    try:
        settings = KubernetesSettings.from_env()
        api = await connect(settings)
    except (ValueError, ClusterUnavailable) as error:
        raise SandboxUnavailable(f"Kubernetes backend: {error}") from None
    config.workspace_root.mkdir(parents=True, exist_ok=True, mode=0o700)
    backend = KubernetesBackend(config, settings, api, storage_from_url(config.storage_url))
    try:
        await backend.check()
        await backend.recover()
    except ClusterUnavailable as error:
        await api.close()
        raise SandboxUnavailable(f"Kubernetes backend: {error}") from None
    log.info("jobs run in Kubernetes", namespace=settings.namespace)
    return backend


async def _local_backend(config: EngineConfig) -> Runner:
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
        images = ImageCache(
            store=config.image_store or mesh_config.home() / "images",
            cache=config.image_cache or config.workspace_root.parent / "images",
            fetch_timeout_s=config.image_fetch_timeout_s,
            max_image_bytes=config.image_max_bytes,
            budget_bytes=config.image_cache_bytes,
        )
        # Without skopeo, umoci or a static busybox the engine still runs host-runtime jobs; a
        # job naming an image then fails in configure, saying which is missing.
        images.check()
        storage = storage_from_url(config.storage_url)
        runner = Runner(config, sandbox, storage, disks, images)
        # Jobs a previous engine left: queued ones queue again, interrupted ones end with a
        # reason; the other disks it left are removed.
        await runner.recover()
    except BaseException:
        sandbox.close()  # its parked sandboxes and staging mounts, when no job started
        raise
    for env in config.environments:
        disks.want(env.disk_bytes, env.max_concurrent_jobs)
    return runner
