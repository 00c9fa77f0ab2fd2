"""Builds the Operator Service's gRPC server and the parts it owns."""

from __future__ import annotations

from dataclasses import dataclass

from c2d.engine.v1 import engine_pb2_grpc
from c2d.operator.v1 import operator_pb2, operator_pb2_grpc
from grpc.aio import Channel

from mesh.channels import open_channel
from mesh.server import Server
from mesh.storage import Storage, storage_from_url
from operator_service.config import OperatorConfig
from operator_service.retention import Retention, Sweeper
from operator_service.servicer import ENGINE, OperatorServicer
from operator_service.store import JobStore
from operator_service.tracker import Tracker

SERVICE_NAME = operator_pb2.DESCRIPTOR.services_by_name["OperatorService"].full_name


@dataclass
class OperatorService:
    server: Server
    store: JobStore
    tracker: Tracker
    engine_channel: Channel
    sweeper: Sweeper

    async def start(self) -> None:
        await self.server.start()
        await self.tracker.resume()
        self.sweeper.start()

    async def close(self) -> None:
        # Before the registry closes under it.
        await self.sweeper.close()
        await self.tracker.close()
        await self.engine_channel.close()
        await self.store.close()


async def build(config: OperatorConfig, storage: Storage | None = None) -> OperatorService:
    """The service on `config`, its results in `storage` (default: the storage that
    `config.storage_url` names)."""
    store = await JobStore.open(config.database)
    channel = open_channel(config.engine_address, config.tls, server_name=config.engine_tls_name)
    engine = engine_pb2_grpc.EngineServiceStub(channel)
    if storage is None:
        storage = storage_from_url(config.storage_url)
    retention = Retention(engine)
    tracker = Tracker(store, engine, config.engine_lease_s, retention)
    sweeper = Sweeper(store, engine, storage, retention, config.retention_sweep_s)
    servicer = OperatorServicer(store, tracker, engine, storage)
    server = Server(
        "operator_service",
        lambda s: operator_pb2_grpc.add_OperatorServiceServicer_to_server(servicer, s),
        [SERVICE_NAME],
        downstream=ENGINE,
        tls=config.tls,
    )
    server.bind(config.listen)
    return OperatorService(server, store, tracker, channel, sweeper)
