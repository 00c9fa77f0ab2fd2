"""Access to an EVM chain through web3's async API: how to reach it (connect, in_process),
and the one rule for every call to it (rpc): a bounded wait, and a chain that does not answer
becomes ChainUnavailable instead of a hang or a raw transport error. Where the chain is lives
in mesh.chain_config."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
import structlog
from eth_typing import HexStr
from hexbytes import HexBytes
from web3 import AsyncHTTPProvider, AsyncWeb3
from web3.exceptions import BadResponseFormat, ProviderConnectionError, TransactionNotFound
from web3.providers.eth_tester import AsyncEthereumTesterProvider
from web3.types import TxReceipt

from mesh.errors import Unavailable

if TYPE_CHECKING:
    import eth_tester  # type: ignore[import-untyped]

log = structlog.get_logger(__name__)

T = TypeVar("T")

# How often wait_receipt asks again: short, since a loopback node mines at once, and a real
# chain's blocks are seconds apart anyway.
_RECEIPT_POLL_S = 0.05
_RECEIPT_POLL_MAX_S = 1.0


class ChainUnavailable(Unavailable):
    """The chain did not answer (refused, timed out, or answered with something that is not
    JSON-RPC). Worth retrying later; says nothing about the order itself."""

    default_reason = "CHAIN_UNAVAILABLE"


def connect(url: str, timeout_s: float) -> AsyncWeb3[Any]:
    """An AsyncWeb3 over HTTP whose every request gives up after `timeout_s`."""
    provider = AsyncHTTPProvider(
        url,
        request_kwargs={"timeout": aiohttp.ClientTimeout(total=timeout_s)},
        # web3 retries failed calls with back-off by default, which turns a refused connection
        # into seconds of waiting; callers here decide themselves when to try again.
        exception_retry_configuration=None,
    )
    return AsyncWeb3(provider)


async def disconnect(w3: AsyncWeb3[Any]) -> None:
    """Closes the HTTP sessions of a connection made by `connect` (the in-process chain has
    none)."""
    if isinstance(w3.provider, AsyncHTTPProvider):
        await w3.provider.disconnect()


def in_process() -> tuple[AsyncWeb3[Any], eth_tester.EthereumTester]:
    """A fresh py-evm chain in this process (for tests), and its tester for snapshots and
    time travel. Its accounts are unlocked and funded; fund LocalAccounts from them."""
    provider = AsyncEthereumTesterProvider()
    tester = provider.ethereum_tester
    evm_chain = tester.backend.chain
    # On the class too: reverting to the genesis snapshot builds a new chain object.
    type(evm_chain).gas_estimator = staticmethod(_quick_gas_estimate)
    evm_chain.gas_estimator = _quick_gas_estimate
    return AsyncWeb3(provider), tester


def _quick_gas_estimate(state: Any, transaction: Any) -> int:
    """Gas for `transaction` on the in-process chain in two runs instead of py-evm's binary
    search (about fifteen, most of an Ocean test's time): one run with the block's whole gas
    to see what it uses, one to check that this amount, plus the 1/64 that each call keeps
    back, is enough. Falls back to the search when it is not."""
    from eth.estimators.gas import binary_gas_search_intrinsic_tolerance
    from eth.vm.spoof import SpoofTransaction

    def run(gas: int) -> Any:
        snapshot = state.snapshot()
        try:
            return state.apply_transaction(SpoofTransaction(transaction, gas=gas, gas_price=0))
        finally:
            state.revert(snapshot)

    full = run(state.gas_limit)
    if full.is_error:
        raise full.error
    guess = min(
        state.gas_limit, (transaction.intrinsic_gas + full.get_gas_used()) * 64 // 63 + 2_300
    )
    if not run(guess).is_error:
        return int(guess)
    return int(binary_gas_search_intrinsic_tolerance(state, transaction))


_UNAVAILABLE = (
    TimeoutError,
    aiohttp.ClientError,
    OSError,
    ProviderConnectionError,
    BadResponseFormat,
)


async def rpc(awaitable: Awaitable[T], *, timeout_s: float, what: str) -> T:
    """Awaits one chain call for at most `timeout_s`. A timeout or a transport failure becomes
    ChainUnavailable naming `what`; errors the chain answered with (a revert,
    TransactionNotFound, ...) are none of those and pass through, since callers act on them."""
    try:
        async with asyncio.timeout(timeout_s):
            return await awaitable
    except _UNAVAILABLE as error:
        detail = str(error) or type(error).__name__
        if isinstance(error, TimeoutError):
            detail = f"no answer within {timeout_s:g} s"
        raise ChainUnavailable(f"the chain did not answer {what}: {detail}") from error


async def wait_receipt(
    w3: AsyncWeb3[Any], tx_hash: str | bytes, *, timeout_s: float, call_timeout_s: float = 10.0
) -> TxReceipt:
    """The receipt of `tx_hash` once it is mined; ChainUnavailable when it is not within
    `timeout_s` (the transaction may still be mined later)."""
    hex_hash = HexStr(HexBytes(tx_hash).to_0x_hex())
    deadline = time.monotonic() + timeout_s
    pause = _RECEIPT_POLL_S
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ChainUnavailable(
                f"the transaction {hex_hash} was not mined within {timeout_s:g} s"
            )
        try:
            return await rpc(
                w3.eth.get_transaction_receipt(hex_hash),
                timeout_s=min(call_timeout_s, left),
                what=f"for the receipt of {hex_hash}",
            )
        except TransactionNotFound:
            pass
        await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        pause = min(pause * 2, _RECEIPT_POLL_MAX_S)
