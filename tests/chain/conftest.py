"""Chains with Ocean's contracts deployed: the in-process py-evm chain (`tester_chain`) and a real
ganache node on a loopback port (`ganache_chain`).

Deploying takes most of a second, so each kind of chain is deployed once per session; every
test then starts from that state and the chain is rewound after it (a snapshot and a revert),
so tests neither see each other's blocks nor depend on their order."""

from __future__ import annotations

import asyncio
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


PRICE = 2 * OCEAN


@dataclass
class OceanChain:
    """A chain with Ocean's contracts, a deployer holding plenty of ETH and OCEAN, and one
    datatoken sold for PRICE OCEAN by the fixed-rate exchange, published by `publisher`."""

    w3: AsyncWeb3[Any]
    deployer: LocalAccount
    contracts: ocean.Contracts
    publisher: LocalAccount
    priced: ocean.Datatoken
    url: str = ""  # "" for the in-process chain

    async def account(self, *, ether: int = ETHER, ocean_wei: int = 0) -> LocalAccount:
        """A new key, funded from the deployer."""
        account: LocalAccount = Account.create()
        await ocean.fund(
            self.w3, self.contracts, self.deployer, account.address, ether=ether, ocean=ocean_wei
        )
        return account

    async def timestamp(self) -> int:
        block = await self.w3.eth.get_block("latest")
        return int(block["timestamp"])


@dataclass
class _Deployed:
    deployer: LocalAccount
    contracts: ocean.Contracts
    publisher: LocalAccount
    priced: ocean.Datatoken


async def _deploy(w3: AsyncWeb3[Any], deployer: LocalAccount) -> _Deployed:
    contracts = await ocean.deploy(w3, deployer)
    publisher: LocalAccount = Account.create()
    await ocean.fund(w3, contracts, deployer, publisher.address, ether=ETHER)
    priced = await ocean.create_datatoken(
        w3, contracts, publisher, name="Weather 2024", symbol="WX24", price=PRICE
    )
    return _Deployed(deployer=deployer, contracts=contracts, publisher=publisher, priced=priced)


@pytest.fixture(scope="session")
def _tester_deployed() -> tuple[AsyncWeb3[Any], Any, _Deployed]:
    w3, tester = chain.in_process()
    deployer: LocalAccount = Account.create()

    async def deploy() -> _Deployed:
        # eth-tester's own accounts are unlocked and rich: one of them funds the deployer.
        rich = (await w3.eth.accounts)[0]
        await w3.eth.send_transaction(
            {"from": rich, "to": deployer.address, "value": 10**5 * ETHER}
        )
        return await _deploy(w3, deployer)

    # The in-process chain holds no event-loop state, so one deployment serves every test's loop.
    return w3, tester, asyncio.run(deploy())


@pytest.fixture
def tester_chain(_tester_deployed: tuple[AsyncWeb3[Any], Any, _Deployed]) -> Iterator[OceanChain]:
    """The in-process chain, rewound to just after the deployment when the test ends."""
    w3, tester, deployed = _tester_deployed
    snapshot = tester.take_snapshot()
    try:
        yield OceanChain(
            w3, deployed.deployer, deployed.contracts, deployed.publisher, deployed.priced
        )
    finally:
        tester.revert_to_snapshot(snapshot)


@pytest.fixture(scope="session")
def _ganache_deployed() -> Iterator[tuple[ganache.Ganache, _Deployed]]:
    if ganache.find_ganache() is None:
        pytest.skip("ganache is not installed (run `npm install` for node_modules/.bin/ganache)")
    deployer: LocalAccount = Account.create()
    # A plain process, not tied to an event loop: it outlives this asyncio.run and serves
    # every test's loop.
    node = asyncio.run(ganache.start(accounts=[(bytes(deployer.key), 10**6 * ETHER)]))

    async def deploy() -> _Deployed:
        w3 = chain.connect(node.url, 10.0)
        try:
            return await _deploy(w3, deployer)
        finally:
            await w3.provider.disconnect()

    try:
        yield node, asyncio.run(deploy())
    finally:
        asyncio.run(node.stop())


@pytest.fixture
async def ganache_chain(
    _ganache_deployed: tuple[ganache.Ganache, _Deployed],
) -> AsyncIterator[OceanChain]:
    """A real ganache node (127.0.0.1, an ephemeral port), rewound to just after the deployment
    when the test ends."""
    node, deployed = _ganache_deployed
    w3 = chain.connect(node.url, 10.0)
    snapshot = await ganache.snapshot(w3)
    try:
        yield OceanChain(
            w3, deployed.deployer, deployed.contracts, deployed.publisher, deployed.priced,
            url=node.url,
        )  # fmt: skip
    finally:
        await ganache.revert(w3, snapshot)
        await w3.provider.disconnect()
