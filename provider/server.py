"""Builds the Provider's gRPC server and the parts it owns."""

from __future__ import annotations

from dataclasses import dataclass

from c2d.operator.v1 import operator_pb2_grpc
from c2d.provider.v1 import provider_pb2, provider_pb2_grpc
from grpc.aio import Channel

from mesh.channels import open_channel
from mesh.server import Server
from provider.approvals import ApprovalBook
from provider.audit import AuditLog
from provider.config import ProviderConfig
from provider.orders import ChainAccess, Payments
from provider.provenance import ProvenanceBook
from provider.servicer import ProviderServicer
from provider.signing import load_provider_key
from provider.store import ProviderStore

SERVICE_NAME = provider_pb2.DESCRIPTOR.services_by_name["ProviderService"].full_name


@dataclass
class Provider:
    server: Server
    store: ProviderStore
    operator_channel: Channel
    # The chain connection the Provider made itself (not one it was given), closed with it.
    own_chain: ChainAccess | None = None

    async def close(self) -> None:
        await self.operator_channel.close()
        await self.store.close()
        if self.own_chain is not None:
            from mesh.chain import disconnect

            await disconnect(self.own_chain.w3)


async def build(config: ProviderConfig, chain: ChainAccess | None = None) -> Provider:
    """The Provider on `config`; its chain is `chain` when given (the tests' in-process one),
    else the one `config.chain` names, else none (a node that sells nothing)."""
    # First: it may refuse (a missing or foreign key file) before anything is opened.
    key = load_provider_key(config)
    store = await ProviderStore.open(config.database)
    channel = open_channel(
        config.operator_address, config.tls, server_name=config.operator_tls_name
    )
    own_chain = None
    if chain is None and config.chain is not None:
        chain = own_chain = ChainAccess.from_config(config.chain)
    servicer = ProviderServicer(
        config,
        store,
        operator_pb2_grpc.OperatorServiceStub(channel),
        audit=AuditLog(store.db),
        provenance=ProvenanceBook(store.db, key),
        approvals=ApprovalBook(store.db),
        payments=Payments(store.db, chain, key),
    )
    server = Server(
        "provider",
        lambda s: provider_pb2_grpc.add_ProviderServiceServicer_to_server(servicer, s),
        [SERVICE_NAME],
        downstream="operator service",
    )
    server.bind(config.listen)
    return Provider(server, store, channel, own_chain)
