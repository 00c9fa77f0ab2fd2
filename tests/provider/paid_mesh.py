"""A whole node that sells compute, on a real chain with Ocean's contracts: an engine with a free
("default") and a priced ("paid") environment, its Operator Service, and a Provider that
verifies orders on the chain, restartable on the same database with another view of the chain
(none, a dead one, one asking for more confirmations).

The contracts are deployed once per module (tests/chain/deployment.py), on the in-process
py-evm chain or on a ganache node on 127.0.0.1; each test starts from that state and the chain
is rewound after it."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from c2d.provider.v1 import provider_pb2 as pb
from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import AsyncWeb3

from mesh import chain, ganache, ocean
from operator_engine.config import EnvironmentSpec
from provider.config import ProviderConfig
from provider.orders import ChainAccess, Payments
from provider.server import Provider
from provider.server import build as build_provider
from sdk.client import Client
from sdk.keys import Key
from tests.chain.deployment import ETHER, OCEAN, PRICE, Deployment
from tests.conftest import SandboxIdentity, engine_and_operator, engine_config, new_key, write_key

# The "paid" environment's provider fee, per started minute of the fee's validity.
FEE_PER_MINUTE = OCEAN // 100
# The "paid" environment's longest job: also the fee's validity when none is asked for.
PAID_MAX_DURATION_S = 60


def as_key(account: LocalAccount) -> Key:
    return Key(address=account.address, private_key=bytes(account.key))


@dataclass
class PaidMesh:
    """A node selling compute on `deployment`'s chain. `w3` is the test's connection to that
    chain (and, unless a test says otherwise, the Provider's)."""

    deployment: Deployment
    w3: AsyncWeb3[Any]
    home: Path
    data_root: Path
    operator_address: str
    # The Provider's own key: it signs provider fees (tests sign with it to forge fees that
    # only the Provider could have made).
    provider_key: Key
    provider: Provider | None = None
    _clients: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)
    _connections: list[AsyncWeb3[Any]] = field(default_factory=list)

    @property
    def contracts(self) -> ocean.Contracts:
        return self.deployment.contracts

    @property
    def chain_id(self) -> int:
        return self.deployment.contracts.chain_id

    @property
    def owner(self) -> Key:
        return as_key(self.deployment.owner)

    @property
    def provider_address(self) -> str:
        assert self.provider is not None, "the Provider is stopped"
        return self.provider.server.address

    def config(self) -> ProviderConfig:
        return ProviderConfig(
            listen="127.0.0.1:0",
            operator_address=self.operator_address,
            database=self.home / "provider" / "provider.db",
            data_root=self.data_root,
            owners=frozenset({self.owner.address}),
            provider_key_file=self.home / "provider-key.json",
        )

    def chain_access(self, w3: AsyncWeb3[Any] | None = None, **changes: Any) -> ChainAccess:
        """The Provider's view of the chain: `w3` (the test's own connection by default),
        one confirmation, short waits; `changes` override any of it."""
        access = ChainAccess(
            w3=w3 or self.w3,
            chain_id=self.chain_id,
            confirmations=1,
            timeout_s=5.0,
            confirmation_wait_s=5.0,
            contracts=self.contracts,
        )
        return dataclasses.replace(access, **changes)

    def connect(self, url: str, timeout_s: float) -> AsyncWeb3[Any]:
        """A web3 connection over HTTP, closed when the mesh stops."""
        w3 = chain.connect(url, timeout_s)
        self._connections.append(w3)
        return w3

    async def start(self, chain_access: ChainAccess | None) -> None:
        """(Re)starts the Provider on its database with `chain_access` (None: no chain). Its
        address changes: open clients after this."""
        await self.stop_provider()
        self.provider = await build_provider(self.config(), chain=chain_access)
        await self.provider.server.start()

    async def stop_provider(self) -> None:
        if self.provider is not None:
            await self.provider.server.stop(0.5)
            await self.provider.close()
            self.provider = None

    async def close(self) -> None:
        await self._clients.aclose()
        await self.stop_provider()
        for w3 in self._connections:
            await chain.disconnect(w3)

    def release_service(self, pricing: pb.Pricing) -> None:
        """Unbinds a datatoken's service from the asset selling it, through the Provider's own
        Payments on its database, as retiring that asset would (the API cannot retire one
        yet)."""
        assert self.provider is not None
        Payments(self.provider.store.db, None, self.provider_key).release_service(pricing)

    # -- parties -------------------------------------------------------------------------

    async def client(self, key: Key) -> Client:
        """A client of the running Provider, closed when the mesh stops."""
        return await self._clients.enter_async_context(Client(self.provider_address, key))

    async def account(self, *, ocean_wei: int = 20 * OCEAN) -> LocalAccount:
        """A new key holding ETH and `ocean_wei` OCEAN."""
        account: LocalAccount = Account.create()
        await ocean.fund(
            self.w3,
            self.contracts,
            self.deployment.deployer,
            account.address,
            ether=ETHER,
            ocean=ocean_wei,
        )
        return account

    async def consumer(self) -> tuple[LocalAccount, Client]:
        """A funded consumer and its client."""
        account = await self.account()
        return account, await self.client(as_key(account))

    async def datatoken(self, symbol: str) -> ocean.Datatoken:
        """Another datatoken of the owner's, sold for PRICE OCEAN."""
        return await ocean.create_datatoken(
            self.w3, self.contracts, self.deployment.owner, name=symbol, symbol=symbol, price=PRICE
        )

    # -- assets --------------------------------------------------------------------------

    def data_file(self, content: bytes = b"1\n2\n3\n") -> Path:
        path = self.data_root / f"data-{time.monotonic_ns()}.txt"
        path.write_bytes(content)
        path.chmod(0o644)
        return path

    async def publish(
        self,
        owner: Client,
        trusted: list[pb.Algorithm],
        *,
        datatoken: ocean.Datatoken | None = None,
        service_index: int = 0,
        timeout_s: int = 0,
    ) -> pb.Dataset:
        """A dataset trusting `trusted`; sold through `datatoken`'s service `service_index`
        when given, each order granting `timeout_s` of access (0: forever)."""
        policy = pb.ComputePolicy(
            publisher_trusted_algorithms=[await owner.trust(a.did) for a in trusted]
        )
        policy.timeout.seconds = timeout_s
        pricing = None
        if datatoken is not None:
            pricing = pb.Pricing(
                datatoken=datatoken.datatoken,
                exchange_id=datatoken.exchange_id,
                service_index=service_index,
            )
        return await owner.publish_dataset([self.data_file()], policy=policy, pricing=pricing)

    # -- orders --------------------------------------------------------------------------

    def provider_fee(
        self,
        *,
        environment: str,
        amount: int = FEE_PER_MINUTE,
        valid_for_s: int = 600,
        signer: bytes | None = None,
    ) -> ocean.ProviderFee:
        """A fee in OCEAN for `environment`, signed by the Provider's key (or `signer`), as
        InitializeCompute would sign it; a negative `valid_for_s` has ended already."""
        data = json.dumps({"environment": environment, "timestamp": int(time.time())}).encode()
        return ocean.sign_provider_fee(
            signer or self.provider_key.private_key,
            token=self.contracts.ocean if amount else ocean.ZERO_ADDRESS,
            amount=amount,
            data=data,
            valid_until=int(time.time()) + valid_for_s,
        )

    async def order(
        self,
        payer: LocalAccount,
        datatoken: ocean.Datatoken,
        fee: ocean.ProviderFee,
        *,
        consumer: str = "",
        service_index: int = 0,
    ) -> str:
        """Buys one datatoken from the exchange and orders its service `service_index` for
        `consumer` (the payer by default); the order's transaction hash."""
        await ocean.buy(self.w3, self.contracts, payer, datatoken.exchange_id)
        return await ocean.start_order(
            self.w3,
            payer,
            datatoken.datatoken,
            consumer=consumer or payer.address,
            service_index=service_index,
            fee=fee,
        )

    async def mine(self, blocks: int) -> None:
        if self.deployment.tester is not None:
            self.deployment.tester.mine_blocks(blocks)
        else:
            await ganache.mine(self.w3, blocks)

    async def block_time(self, tx: str) -> int:
        receipt = await self.w3.eth.get_transaction_receipt(tx)
        block = await self.w3.eth.get_block(receipt["blockNumber"])
        return int(block["timestamp"])


def environments(contracts: ocean.Contracts) -> tuple[EnvironmentSpec, ...]:
    return (
        EnvironmentSpec(),
        EnvironmentSpec(
            name="paid",
            fee_token=contracts.ocean,
            fee_per_minute=FEE_PER_MINUTE,
            max_duration_s=PAID_MAX_DURATION_S,
        ),
    )


@contextlib.asynccontextmanager
async def open_mesh(
    tmp_path: Path, deployment: Deployment, w3: AsyncWeb3[Any]
) -> AsyncIterator[PaidMesh]:
    """Engine, Operator Service and a Provider on `w3`'s chain (one confirmation), started in
    order on fresh state."""
    home = tmp_path / "home"
    data_root = tmp_path / "data"
    data_root.mkdir(parents=True)
    sandbox = SandboxIdentity.new()
    config = engine_config(home, sandbox, environments(deployment.contracts), data_root=data_root)
    async with engine_and_operator(home, config, sandbox, lease_s=5) as (_, _, operator):
        provider_key = new_key()
        write_key(home / "provider-key.json", provider_key)
        mesh = PaidMesh(
            deployment=deployment,
            w3=w3,
            home=home,
            data_root=data_root,
            operator_address=operator.server.address,
            provider_key=provider_key,
        )
        try:
            await mesh.start(mesh.chain_access())
            yield mesh
        finally:
            await mesh.close()
