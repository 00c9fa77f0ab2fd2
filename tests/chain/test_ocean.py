"""Ocean's contracts on real chains: the in-process py-evm chain and a ganache node. A consumer
buys a datatoken, orders with a provider fee signed by the Provider, and the order reads back
from its receipt; refusals, rewound chains and chains that do not answer."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3.exceptions import TransactionNotFound

from mesh import chain, chain_config, ganache, ocean
from tests.chain.conftest import OceanChain
from tests.chain.deployment import ETHER, OCEAN, PRICE, closed_port

FEE = OCEAN // 10


@pytest.fixture(params=["tester", "ganache"])
def any_chain(request: pytest.FixtureRequest) -> OceanChain:
    """Each test that takes it runs on both chains."""
    chain_: OceanChain = request.getfixturevalue(f"{request.param}_chain")
    return chain_


async def _bought(c: OceanChain) -> tuple[ocean.Datatoken, LocalAccount, LocalAccount]:
    """The chain's priced datatoken, a consumer holding one bought datatoken and OCEAN for the
    fee, and the datatoken's owner."""
    consumer = await c.account(ocean_wei=10 * OCEAN)
    await ocean.buy(c.w3, c.contracts, consumer, c.priced.exchange_id)
    return c.priced, consumer, c.publisher


async def _fee(c: OceanChain, provider: LocalAccount, amount: int = FEE) -> ocean.ProviderFee:
    return ocean.sign_provider_fee(
        bytes(provider.key),
        token=c.contracts.ocean,
        amount=amount,
        data=b'{"environment":"cpu-1"}',
        valid_until=await c.timestamp() + 3600,
    )


async def test_deploy(tester_chain: OceanChain, tmp_path: Path) -> None:
    c = tester_chain
    for address in (c.contracts.ocean, c.contracts.router, c.contracts.factory,
                    c.contracts.fixed_rate, c.contracts.dispenser):  # fmt: skip
        assert len(await c.w3.eth.get_code(address)) > 0
    assert c.contracts.chain_id == await c.w3.eth.chain_id
    router = ocean.contract(c.w3, "FactoryRouter", c.contracts.router).functions
    assert await router.factory().call() == c.contracts.factory
    assert await router.isFixedRateContract(c.contracts.fixed_rate).call()
    assert await router.isDispenserContract(c.contracts.dispenser).call()
    assert await router.isApprovedToken(c.contracts.ocean).call()
    assert await ocean.balance(c.w3, c.contracts.ocean, c.deployer.address) > 10**6 * OCEAN

    path = tmp_path / "contracts.json"
    c.contracts.save(path)
    assert ocean.Contracts.load(path) == c.contracts


async def test_paid_order(any_chain: OceanChain) -> None:
    c = any_chain
    datatoken, consumer, owner = await _bought(c)
    assert await ocean.is_datatoken(c.w3, c.contracts, datatoken.datatoken)
    assert not await ocean.is_datatoken(c.w3, c.contracts, c.contracts.ocean)
    assert await ocean.nft_of(c.w3, datatoken.datatoken) == datatoken.nft
    assert await ocean.exchange_of(c.w3, c.contracts, datatoken.exchange_id) == (
        datatoken.datatoken,
        c.contracts.ocean,
        PRICE,
        True,
    )
    assert await ocean.balance(c.w3, datatoken.datatoken, consumer.address) == 10**18
    provider: LocalAccount = Account.create()
    fee = await _fee(c, provider)
    assert ocean.provider_fee_signer(fee) == provider.address == fee.address

    tx = await ocean.start_order(
        c.w3, consumer, datatoken.datatoken, consumer=consumer.address, service_index=0, fee=fee
    )

    assert tx.startswith("0x") and len(tx) == 66 and tx == tx.lower()
    receipt = await c.w3.eth.get_transaction_receipt(tx)
    orders, fees = ocean.decode_order(receipt)
    assert len(orders) == 1 and len(fees) == 1
    order = orders[0]
    assert order.datatoken == datatoken.datatoken
    assert (order.consumer, order.payer) == (consumer.address, consumer.address)
    assert (order.amount, order.service_index) == (10**18, 0)
    assert order.block_number == receipt["blockNumber"]
    block = await c.w3.eth.get_block(receipt["blockNumber"])
    assert order.timestamp == block["timestamp"]
    assert fees[0].datatoken == datatoken.datatoken
    assert fees[0].fee == fee
    assert ocean.provider_fee_signer(fees[0].fee) == provider.address
    # The provider was paid its fee; the datatoken went to the owner (less Ocean's cut).
    assert await ocean.balance(c.w3, c.contracts.ocean, provider.address) == FEE
    assert await ocean.balance(c.w3, datatoken.datatoken, consumer.address) == 0
    assert 0 < await ocean.balance(c.w3, datatoken.datatoken, owner.address) <= 10**18


async def test_fee_signed_by_another_key_is_refused(any_chain: OceanChain) -> None:
    c = any_chain
    datatoken, consumer, _ = await _bought(c)
    provider: LocalAccount = Account.create()
    forged = await _fee(c, Account.create())
    # Claims to be the provider's fee, signed by someone else.
    forged = ocean.ProviderFee.from_dict({**forged.to_dict(), "address": provider.address})
    assert ocean.provider_fee_signer(forged) != provider.address

    with pytest.raises(ocean.OceanError) as refused:
        await ocean.start_order(
            c.w3, consumer, datatoken.datatoken, consumer=consumer.address, service_index=0,
            fee=forged,
        )  # fmt: skip
    assert refused.value.reason == "Invalid provider fee"
    assert "Invalid provider fee" in str(refused.value)
    # Nothing was spent.
    assert await ocean.balance(c.w3, datatoken.datatoken, consumer.address) == 10**18


async def test_contract_does_not_check_fee_expiry(tester_chain: OceanChain) -> None:
    """startOrder takes a fee whose validUntil has passed: the Provider must compare the
    ProviderFee event's valid_until with the order's block time itself."""
    c = tester_chain
    datatoken, consumer, _ = await _bought(c)
    provider: LocalAccount = Account.create()
    expired = ocean.sign_provider_fee(
        bytes(provider.key), token=c.contracts.ocean, amount=FEE, data=b"", valid_until=1
    )
    tx = await ocean.start_order(
        c.w3, consumer, datatoken.datatoken, consumer=consumer.address, service_index=0,
        fee=expired,
    )  # fmt: skip
    orders, fees = ocean.decode_order(await c.w3.eth.get_transaction_receipt(tx))
    assert fees[0].fee.valid_until == 1 < orders[0].timestamp


async def test_free_datatoken_minted_and_ordered_without_fee(tester_chain: OceanChain) -> None:
    c = tester_chain
    owner = await c.account()
    datatoken = await ocean.create_datatoken(
        c.w3, c.contracts, owner, name="Free", symbol="FREE", price=None
    )
    assert datatoken.exchange_id == ""
    payer = await c.account()
    consumer: LocalAccount = Account.create()
    await ocean.mint(c.w3, datatoken.datatoken, owner, payer.address, 10**18)
    provider: LocalAccount = Account.create()
    fee = ocean.sign_provider_fee(
        bytes(provider.key), token=c.contracts.ocean, amount=0, data=b"",
        valid_until=await c.timestamp() + 60,
    )  # fmt: skip

    tx = await ocean.start_order(
        c.w3, payer, datatoken.datatoken, consumer=consumer.address, service_index=3, fee=fee
    )

    orders, fees = ocean.decode_order(await c.w3.eth.get_transaction_receipt(tx))
    assert [(o.consumer, o.payer, o.service_index) for o in orders] == [
        (consumer.address, payer.address, 3)
    ]
    assert [f.fee.amount for f in fees] == [0]


async def test_decode_order_ignores_other_logs(tester_chain: OceanChain) -> None:
    c = tester_chain
    owner = await c.account()
    datatoken = await ocean.create_datatoken(
        c.w3, c.contracts, owner, name="Data", symbol="D", price=PRICE
    )
    buyer = await c.account(ocean_wei=10 * OCEAN)
    exchange = ocean.contract(c.w3, "FixedRateExchange", c.contracts.fixed_rate)
    await ocean.buy(c.w3, c.contracts, buyer, datatoken.exchange_id)
    # A receipt full of Transfer, Swapped and fee events, but no order.
    swaps = await exchange.events.Swapped().get_logs(from_block=0)
    receipt = await c.w3.eth.get_transaction_receipt(swaps[-1]["transactionHash"])
    assert len(receipt["logs"]) > 2
    assert ocean.decode_order(receipt) == ([], [])
    assert ocean.decode_order({"logs": []}) == ([], [])


def test_provider_fee_round_trip() -> None:
    key = Account.create()
    fee = ocean.sign_provider_fee(
        bytes(key.key), token="0x" + "11" * 20, amount=2**200, data=b"\x00\xff", valid_until=7
    )
    assert ocean.ProviderFee.from_dict(fee.to_dict()) == fee
    assert fee.as_tuple() == (fee.address, fee.token, 2**200, fee.v, fee.r, fee.s, 7, b"\x00\xff")
    assert ocean.provider_fee_signer(fee) == key.address
    # Any field changed after signing changes the signer.
    tampered = ocean.ProviderFee.from_dict({**fee.to_dict(), "amount": "1"})
    assert ocean.provider_fee_signer(tampered) != key.address
    with pytest.raises(ValueError):
        ocean.ProviderFee.from_dict({**fee.to_dict(), "r": "0x12"})


async def test_reverted_order_disappears(ganache_chain: OceanChain) -> None:
    c = ganache_chain
    datatoken, consumer, _ = await _bought(c)
    fee = await _fee(c, Account.create())
    before = await ganache.snapshot(c.w3)
    tx = await ocean.start_order(
        c.w3, consumer, datatoken.datatoken, consumer=consumer.address, service_index=0, fee=fee
    )
    receipt = await chain.wait_receipt(c.w3, tx, timeout_s=5)
    assert receipt["status"] == 1

    # As in a reorganisation that drops the order's block.
    assert await ganache.revert(c.w3, before)

    with pytest.raises(TransactionNotFound):
        await chain.rpc(c.w3.eth.get_transaction_receipt(tx), timeout_s=5, what="a receipt")
    assert await ocean.balance(c.w3, datatoken.datatoken, consumer.address) == 10**18
    block = await c.w3.eth.block_number
    await ganache.mine(c.w3, 3)
    assert await c.w3.eth.block_number == block + 3


async def test_wait_receipt_gives_up(tester_chain: OceanChain) -> None:
    started = time.monotonic()
    with pytest.raises(chain.ChainUnavailable, match="not mined within"):
        await chain.wait_receipt(tester_chain.w3, "0x" + "ab" * 32, timeout_s=0.3)
    assert time.monotonic() - started < 2


async def test_chain_down_is_unavailable() -> None:
    w3 = chain.connect(f"http://127.0.0.1:{closed_port()}", timeout_s=5.0)
    started = time.monotonic()
    with pytest.raises(chain.ChainUnavailable) as down:
        await chain.rpc(w3.eth.chain_id, timeout_s=5.0, what="its chain id")
    assert time.monotonic() - started < 1.0
    assert down.value.reason == "CHAIN_UNAVAILABLE"
    assert "did not answer its chain id" in down.value.message
    contracts = ocean.Contracts(1, *(["0x" + "22" * 20] * 5))
    with pytest.raises(chain.ChainUnavailable):
        await ocean.balance(w3, contracts.ocean, contracts.router)
    await w3.provider.disconnect()


async def test_slow_chain_is_unavailable(silent_server: str) -> None:
    # The provider's own timeout is longer: rpc's bound is the one that must hold.
    w3 = chain.connect(silent_server, timeout_s=30.0)
    started = time.monotonic()
    with pytest.raises(chain.ChainUnavailable, match=r"no answer within 0\.3 s"):
        await chain.rpc(w3.eth.block_number, timeout_s=0.3, what="the block number")
    assert 0.3 <= time.monotonic() - started < 1.0
    await w3.provider.disconnect()

    # And the provider's request timeout alone is enough too.
    w3 = chain.connect(silent_server, timeout_s=0.3)
    started = time.monotonic()
    with pytest.raises(chain.ChainUnavailable):
        await chain.rpc(w3.eth.block_number, timeout_s=30.0, what="the block number")
    assert time.monotonic() - started < 1.5
    await w3.provider.disconnect()


def test_config_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("C2D_CHAIN_URL", "C2D_CHAIN_ID", "C2D_CHAIN_CONFIRMATIONS", "C2D_CHAIN_TIMEOUT",
                 "C2D_CHAIN_CONFIRMATION_WAIT", "C2D_CHAIN_CONTRACTS"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    assert chain_config.ChainConfig.from_env() is None

    monkeypatch.setenv("C2D_CHAIN_URL", "http://127.0.0.1:8545")
    with pytest.raises(ValueError, match="C2D_CHAIN_ID is required"):
        chain_config.ChainConfig.from_env()

    monkeypatch.setenv("C2D_CHAIN_ID", "1337")
    assert chain_config.ChainConfig.from_env() == chain_config.ChainConfig(
        "http://127.0.0.1:8545", 1337
    )

    monkeypatch.setenv("C2D_CHAIN_CONFIRMATIONS", "3")
    monkeypatch.setenv("C2D_CHAIN_TIMEOUT", "2.5")
    monkeypatch.setenv("C2D_CHAIN_CONFIRMATION_WAIT", "60")
    monkeypatch.setenv("C2D_CHAIN_CONTRACTS", str(tmp_path / "contracts.json"))
    assert chain_config.ChainConfig.from_env() == chain_config.ChainConfig(
        "http://127.0.0.1:8545", 1337, 3, 2.5, 60.0, tmp_path / "contracts.json"
    )
    monkeypatch.setenv("C2D_CHAIN_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="C2D_CHAIN_TIMEOUT"):
        chain_config.ChainConfig.from_env()


async def test_ganache_start_and_stop(tmp_path: Path) -> None:
    if ganache.find_ganache() is None:
        pytest.skip("ganache is not installed (run `npm install` for node_modules/.bin/ganache)")
    holder: LocalAccount = Account.create()
    node = await ganache.start(
        accounts=[(bytes(holder.key), 5 * ETHER)], chain_id=4242, db=tmp_path / "db"
    )
    ended = asyncio.ensure_future(node.wait())
    try:
        w3 = chain.connect(node.url, 5.0)
        assert await w3.eth.chain_id == 4242
        assert await w3.eth.get_balance(holder.address) == 5 * ETHER
        assert list(await w3.eth.accounts) == [holder.address]
        await w3.provider.disconnect()
        assert not ended.done()
    finally:
        await node.stop()
    assert node.process.returncode is not None
    assert await asyncio.wait_for(ended, 1) == node.process.returncode
    with pytest.raises(ProcessLookupError):
        os.kill(node.pid, 0)
    assert any((tmp_path / "db").iterdir())
