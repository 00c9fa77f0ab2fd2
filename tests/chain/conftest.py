"""Chains with Ocean's contracts deployed (tests/chain/deployment.py): the in-process py-evm
chain (`tester_chain`) and a real ganache node on a loopback port (`ganache_chain`), each
deployed once per session and rewound after every test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import AsyncWeb3

from mesh import ocean
from tests.chain.deployment import (
    ETHER,
    Deployment,
    deploy_ganache,
    deploy_tester,
    ganache_rewound,
    rewound,
)


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

    @classmethod
    def of(cls, deployed: Deployment, w3: AsyncWeb3[Any], url: str = "") -> OceanChain:
        return cls(w3, deployed.deployer, deployed.contracts, deployed.owner, deployed.priced, url)

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


@pytest.fixture(scope="session")
def _tester_deployed() -> Deployment:
    return deploy_tester()


@pytest.fixture
def tester_chain(_tester_deployed: Deployment) -> Iterator[OceanChain]:
    """The in-process chain, rewound to just after the deployment when the test ends."""
    assert _tester_deployed.w3 is not None
    with rewound(_tester_deployed):
        yield OceanChain.of(_tester_deployed, _tester_deployed.w3)


@pytest.fixture(scope="session")
def _ganache_deployed() -> Iterator[Deployment]:
    with deploy_ganache() as deployed:
        yield deployed


@pytest.fixture
async def ganache_chain(_ganache_deployed: Deployment) -> AsyncIterator[OceanChain]:
    """A real ganache node (127.0.0.1, an ephemeral port), rewound to just after the deployment
    when the test ends."""
    assert _ganache_deployed.node is not None
    async with ganache_rewound(_ganache_deployed) as w3:
        yield OceanChain.of(_ganache_deployed, w3, url=_ganache_deployed.node.url)
