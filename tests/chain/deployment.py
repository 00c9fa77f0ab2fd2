"""Ocean's contracts deployed once on a chain for many tests: on the in-process py-evm chain
(`deploy_tester`) or on a ganache node on an ephemeral loopback port (`deploy_ganache`), with a
data owner who holds ETH and sells a datatoken for PRICE OCEAN on the fixed-rate exchange.

Deploying takes most of a second, so a deployment serves a module or a session; each test
starts from its state and the chain is rewound after it (`rewound`, `ganache_rewound`: a
snapshot and a revert), so tests neither see each other's blocks nor depend on their order."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import AsyncWeb3

from mesh import chain, ganache, ocean

ETHER = 10**18
OCEAN = 10**18
# What the fixed-rate exchange sells one datatoken for.
PRICE = 2 * OCEAN

needs_ganache = pytest.mark.skipif(
    ganache.find_ganache() is None,
    reason="ganache is not installed (run `npm install` for node_modules/.bin/ganache)",
)


@dataclass
class Deployment:
    """Ocean's contracts on one chain, and the data owner, who holds ETH and owns `priced`
    (a datatoken sold for PRICE OCEAN by the fixed-rate exchange)."""

    deployer: LocalAccount
    contracts: ocean.Contracts
    owner: LocalAccount
    priced: ocean.Datatoken
    # The in-process chain (shared by every event loop) and its tester; None on ganache.
    w3: AsyncWeb3[Any] | None = None
    tester: Any = None
    # ganache's node; None for the in-process chain.
    node: ganache.Ganache | None = None


async def _deploy(w3: AsyncWeb3[Any], deployer: LocalAccount) -> Deployment:
    contracts = await ocean.deploy(w3, deployer)
    owner: LocalAccount = Account.create()
    await ocean.fund(w3, contracts, deployer, owner.address, ether=100 * ETHER)
    priced = await ocean.create_datatoken(
        w3, contracts, owner, name="Weather 2024", symbol="WX24", price=PRICE
    )
    return Deployment(deployer=deployer, contracts=contracts, owner=owner, priced=priced)


def deploy_tester() -> Deployment:
    """The in-process chain with Ocean's contracts (its web3 holds no event-loop state, so one
    deployment serves every test's loop)."""
    w3, tester = chain.in_process()
    deployer: LocalAccount = Account.create()

    async def deploy() -> Deployment:
        # eth-tester's own accounts are unlocked and rich: one of them funds the deployer.
        rich = (await w3.eth.accounts)[0]
        await w3.eth.send_transaction(
            {"from": rich, "to": deployer.address, "value": 10**5 * ETHER}
        )
        return await _deploy(w3, deployer)

    deployed = asyncio.run(deploy())
    deployed.w3, deployed.tester = w3, tester
    return deployed


@contextlib.contextmanager
def deploy_ganache() -> Iterator[Deployment]:
    """A ganache node on an ephemeral loopback port with Ocean's contracts, stopped at the end.
    A plain process, not tied to an event loop: it serves every test's loop."""
    if ganache.find_ganache() is None:
        pytest.skip("ganache is not installed (run `npm install` for node_modules/.bin/ganache)")
    deployer: LocalAccount = Account.create()
    node = asyncio.run(ganache.start(accounts=[(bytes(deployer.key), 10**6 * ETHER)]))

    async def deploy() -> Deployment:
        w3 = chain.connect(node.url, 10.0)
        try:
            return await _deploy(w3, deployer)
        finally:
            await chain.disconnect(w3)

    try:
        deployed = asyncio.run(deploy())
        deployed.node = node
        yield deployed
    finally:
        asyncio.run(node.stop())


@contextlib.contextmanager
def rewound(deployment: Deployment) -> Iterator[None]:
    """The in-process chain as it is now, again when the block ends."""
    snapshot = deployment.tester.take_snapshot()
    try:
        yield
    finally:
        deployment.tester.revert_to_snapshot(snapshot)


@contextlib.asynccontextmanager
async def ganache_rewound(deployment: Deployment) -> AsyncIterator[AsyncWeb3[Any]]:
    """A connection to the deployment's ganache node, whose chain is as it is now again
    (evm_revert) when the block ends."""
    assert deployment.node is not None
    w3 = chain.connect(deployment.node.url, 10.0)
    snapshot = await ganache.snapshot(w3)
    try:
        yield w3
    finally:
        await ganache.revert(w3, snapshot)
        await chain.disconnect(w3)


def closed_port() -> int:
    """A loopback port nothing listens on: where a chain that is down would be."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port
