"""Ocean Protocol's own contracts (the `ocean-contracts` build artifacts): deploying the factory
set, datatokens sold at a fixed rate, orders with a provider fee, and reading orders back from
a receipt.

Transactions are signed here with the sender's key and sent raw, so the same code runs on any
node (ganache, the in-process py-evm chain, a public chain). All amounts are integers in wei,
addresses EIP-55 strings, transaction hashes "0x" and 64 lowercase hex digits."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.resources
import json
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import structlog
from eth_abi.abi import decode as abi_decode
from eth_abi.exceptions import DecodingError
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_hash.auto import keccak
from eth_utils.abi import event_abi_to_log_topic
from eth_utils.address import to_checksum_address
from hexbytes import HexBytes
from web3 import AsyncWeb3
from web3.contract import AsyncContract
from web3.contract.async_contract import AsyncContractConstructor, AsyncContractFunction
from web3.exceptions import ContractLogicError, Web3RPCError
from web3.types import TxParams, TxReceipt, Wei

from mesh.auth import checksum, recover_signer, sign_hash
from mesh.chain import rpc, wait_receipt
from mesh.chain_config import ONE_TOKEN as ONE_TOKEN
from mesh.chain_config import ZERO_ADDRESS as ZERO_ADDRESS

log = structlog.get_logger(__name__)

MAX_UINT256 = 2**256 - 1
# The OCEAN minted to the deployer of a test chain (the token's cap is 1.41e9 OCEAN).
_OCEAN_SUPPLY = 10**9 * ONE_TOKEN

# Per JSON-RPC call and per transaction. A loopback node answers in milliseconds; these bound
# a chain that has gone away, they do not pace a working one.
CALL_TIMEOUT_S = 10.0
RECEIPT_TIMEOUT_S = 60.0
# estimate_gas is exact for the state it ran on; a little headroom covers a state that moved
# between the estimate and the block (another order in between, a changed allowance).
_GAS_HEADROOM = 1.25

# The ERC20Template in the factory's list of datatoken templates (index 1 is the template
# Ocean's own tools create datatokens with), and the ERC721Template likewise.
_TEMPLATE_INDEX = 1


class OceanError(Exception):
    """A transaction the chain refused (a revert, with its reason when the contract gave one)
    or a receipt that does not hold what the call should have produced."""

    def __init__(self, message: str, *, reason: str | None = None):
        super().__init__(message)
        self.message = message
        self.reason = reason


@functools.cache
def artifact(name: str) -> dict[str, Any]:
    """The build artifact of one contract: `abi` and `bytecode`."""
    text = importlib.resources.files("artifacts").joinpath(f"{name}.json").read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def contract(w3: AsyncWeb3[Any], name: str, address: str) -> AsyncContract:
    return w3.eth.contract(address=to_checksum_address(address), abi=artifact(name)["abi"])


# ---------------------------------------------------------------------------------------------
# Sending transactions


# One lock per sender, chain and event loop: the nonce read and the send must not interleave
# with another send from the same account, or two transactions would claim the same nonce.
# (asyncio locks belong to one loop; tests share a chain between loops.)
_send_locks: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, weakref.WeakKeyDictionary[AsyncWeb3[Any], dict[str, asyncio.Lock]]
] = weakref.WeakKeyDictionary()


def _send_lock(w3: AsyncWeb3[Any], address: str) -> asyncio.Lock:
    by_chain = _send_locks.setdefault(asyncio.get_running_loop(), weakref.WeakKeyDictionary())
    return by_chain.setdefault(w3, {}).setdefault(address, asyncio.Lock())


def _revert_errors() -> tuple[type[Exception], ...]:
    try:
        from eth_tester.exceptions import TransactionFailed  # type: ignore[import-untyped]
    except ImportError:  # installs without the in-process test chain
        return (ContractLogicError,)
    # The in-process chain reports a revert as its own exception, not web3's.
    return (ContractLogicError, TransactionFailed)


_REVERTS = _revert_errors()


_ERROR_STRING = bytes.fromhex("08c379a0")  # the selector of Solidity's Error(string)


def _revert_message(error: Exception) -> str:
    """The contract's own reason: ganache hands it over in the error's data, geth-like nodes
    as ABI-encoded Error(string), the in-process chain in the message."""
    data = getattr(error, "data", None)
    if isinstance(data, Mapping) and isinstance(data.get("reason"), str):
        return str(data["reason"])
    if isinstance(data, str) and data.startswith("0x"):
        raw = bytes(HexBytes(data))
        if raw.startswith(_ERROR_STRING):
            with contextlib.suppress(DecodingError):
                (reason,) = abi_decode(["string"], raw[4:])
                return str(reason)
    message = str(getattr(error, "message", None) or error)
    for prefix in ("execution reverted: ", "VM Exception while processing transaction: revert "):
        message = message.removeprefix(prefix)
    return message


async def _call(fn: AsyncContractFunction, *, what: str, timeout_s: float = CALL_TIMEOUT_S) -> Any:
    """A view call, bounded like every other chain call."""
    return await rpc(fn.call(), timeout_s=timeout_s, what=what)


async def send(
    w3: AsyncWeb3[Any],
    sender: LocalAccount,
    call: AsyncContractFunction | AsyncContractConstructor | TxParams,
    *,
    what: str,
    value: int = 0,
) -> TxReceipt:
    """Signs `call` (a contract function, a constructor, or plain transaction fields) with
    `sender`'s key, sends it and waits for its receipt. OceanError when the chain would revert
    it (found by estimating gas first, with the contract's reason) or when it reverted after
    all; ChainUnavailable when the chain does not answer."""
    fields: TxParams = {"from": sender.address, "value": Wei(value)}
    if isinstance(call, dict):
        fields = {**fields, **call}
    async with _send_lock(w3, sender.address):
        chain_id, gas_price, nonce = await asyncio.gather(
            rpc(w3.eth.chain_id, timeout_s=CALL_TIMEOUT_S, what="its chain id"),
            rpc(w3.eth.gas_price, timeout_s=CALL_TIMEOUT_S, what="its gas price"),
            rpc(
                w3.eth.get_transaction_count(sender.address, "pending"),
                timeout_s=CALL_TIMEOUT_S,
                what=f"the nonce of {sender.address}",
            ),
        )
        # Legacy (type 0) transactions: every node takes them, and a test chain has no fee
        # market worth following.
        fields = {**fields, "chainId": chain_id, "gasPrice": gas_price, "nonce": nonce}
        estimating = (
            w3.eth.estimate_gas(fields) if isinstance(call, dict) else call.estimate_gas(fields)
        )
        try:
            estimate = await rpc(estimating, timeout_s=CALL_TIMEOUT_S, what="a gas estimate")
        except _REVERTS as error:
            reason = _revert_message(error)
            raise OceanError(f"{what} would revert: {reason}", reason=reason) from error
        except Web3RPCError as error:
            raise OceanError(f"the chain refused {what}: {error.message or error}") from error
        fields["gas"] = int(estimate * _GAS_HEADROOM)
        if not isinstance(call, dict):
            # Every field is given, so this only adds `to` and `data`; bounded all the same.
            fields = await rpc(
                call.build_transaction(fields), timeout_s=CALL_TIMEOUT_S, what="a transaction"
            )
        signed = sender.sign_transaction(cast(dict[str, Any], fields))
        try:
            tx_hash = await rpc(
                w3.eth.send_raw_transaction(signed.raw_transaction),
                timeout_s=CALL_TIMEOUT_S,
                what=f"to {what}",
            )
        except Web3RPCError as error:
            raise OceanError(f"the chain refused {what}: {error.message or error}") from error
    receipt = await wait_receipt(
        w3, tx_hash, timeout_s=RECEIPT_TIMEOUT_S, call_timeout_s=CALL_TIMEOUT_S
    )
    if receipt["status"] != 1:
        raise OceanError(
            f"{what} reverted in block {receipt['blockNumber']} "
            f"(transaction {HexBytes(tx_hash).to_0x_hex()})"
        )
    log.debug(
        "chain.sent",
        what=what,
        tx=HexBytes(tx_hash).to_0x_hex(),
        block=receipt["blockNumber"],
        gas=receipt["gasUsed"],
    )
    return receipt


async def _deploy(w3: AsyncWeb3[Any], deployer: LocalAccount, name: str, *args: Any) -> str:
    spec = artifact(name)
    factory = w3.eth.contract(abi=spec["abi"], bytecode=spec["bytecode"])
    receipt = await send(w3, deployer, factory.constructor(*args), what=f"deploying {name}")
    address = receipt["contractAddress"]
    if address is None:
        raise OceanError(f"deploying {name} gave no contract address")
    return str(address)


# ---------------------------------------------------------------------------------------------
# The factory set


@dataclass(frozen=True)
class Contracts:
    """Where Ocean's contracts are on one chain."""

    chain_id: int
    # The base token prices are in (OCEAN).
    ocean: str
    router: str
    # The ERC721Factory: creates data NFTs with their datatokens, and knows which it created.
    factory: str
    fixed_rate: str
    dispenser: str

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> Contracts:
        try:
            raw = json.loads(path.read_text())
            return cls(
                chain_id=int(raw["chain_id"]),
                ocean=checksum(raw["ocean"]),
                router=checksum(raw["router"]),
                factory=checksum(raw["factory"]),
                fixed_rate=checksum(raw["fixed_rate"]),
                dispenser=checksum(raw["dispenser"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path} does not describe Ocean's contracts: {error}") from error


async def deploy(w3: AsyncWeb3[Any], deployer: LocalAccount) -> Contracts:
    """Deploys the factory set the way Ocean's own deployment does: the OCEAN token (with a
    supply minted to the deployer), the OPC fee collector, the FactoryRouter, the fixed-rate
    exchange and the dispenser, both templates and the ERC721Factory, then registers the
    factory, exchange and dispenser with the router. The deployer owns everything."""
    me = deployer.address
    ocean = await _deploy(w3, deployer, "OceanToken", me)
    await send(
        w3,
        deployer,
        contract(w3, "OceanToken", ocean).functions.mint(me, _OCEAN_SUPPLY),
        what="minting OCEAN",
    )
    collector = await _deploy(w3, deployer, "OPFCommunityFeeCollector", me, me)
    # The router refuses to exist without a pool template, though nothing here makes pools.
    pool_template = await _deploy(w3, deployer, "BPool")
    router = await _deploy(w3, deployer, "FactoryRouter", me, ocean, pool_template, collector, [])
    fixed_rate = await _deploy(w3, deployer, "FixedRateExchange", router)
    dispenser = await _deploy(w3, deployer, "Dispenser", router)
    template721 = await _deploy(w3, deployer, "ERC721Template")
    template20 = await _deploy(w3, deployer, "ERC20Template")
    factory = await _deploy(w3, deployer, "ERC721Factory", template721, template20, router)

    functions = contract(w3, "FactoryRouter", router).functions
    await send(w3, deployer, functions.addFactory(factory), what="registering the factory")
    await send(
        w3, deployer, functions.addFixedRateContract(fixed_rate), what="registering the exchange"
    )
    await send(
        w3, deployer, functions.addDispenserContract(dispenser), what="registering the dispenser"
    )
    # The router approves OCEAN itself when it is built; asking first keeps deploy idempotent
    # with routers that do not.
    if not await _call(functions.isApprovedToken(ocean), what="whether OCEAN is approved"):
        await send(w3, deployer, functions.addApprovedToken(ocean), what="approving OCEAN")

    chain_id = await rpc(w3.eth.chain_id, timeout_s=CALL_TIMEOUT_S, what="its chain id")
    contracts = Contracts(
        chain_id=chain_id,
        ocean=ocean,
        router=router,
        factory=factory,
        fixed_rate=fixed_rate,
        dispenser=dispenser,
    )
    log.info("ocean.deployed", **asdict(contracts))
    return contracts


async def fund(
    w3: AsyncWeb3[Any],
    contracts: Contracts,
    sender: LocalAccount,
    to: str,
    *,
    ether: int = 0,
    ocean: int = 0,
) -> None:
    """Sends `ether` wei of ETH and `ocean` wei of OCEAN from `sender` to `to`."""
    to = to_checksum_address(to)
    if ether:
        await send(w3, sender, {"to": to}, value=ether, what=f"sending ETH to {to}")
    if ocean:
        await send(
            w3,
            sender,
            contract(w3, "OceanToken", contracts.ocean).functions.transfer(to, ocean),
            what=f"sending OCEAN to {to}",
        )


# ---------------------------------------------------------------------------------------------
# Datatokens


@dataclass(frozen=True)
class Datatoken:
    """A data NFT, its datatoken, and the fixed-rate exchange that sells it ("" when none)."""

    nft: str
    datatoken: str
    exchange_id: str


async def create_datatoken(
    w3: AsyncWeb3[Any],
    contracts: Contracts,
    owner: LocalAccount,
    *,
    name: str,
    symbol: str,
    price: int | None,
) -> Datatoken:
    """Creates a data NFT with one datatoken, both owned by `owner` (who is also its minter
    and payment collector). With a `price` (OCEAN wei per whole datatoken) the datatoken is
    sold by the fixed-rate exchange, which mints each one it sells; with None it is only
    minted by `owner`."""
    me = owner.address
    nft_data = (name, symbol, _TEMPLATE_INDEX, "", True, me)
    # strings: name, symbol; addresses: minter, payment collector, publishing market fee
    # address and token; uints: cap, publishing market fee.
    token_data: tuple[Any, ...] = (
        _TEMPLATE_INDEX,
        [name, symbol],
        [me, me, ZERO_ADDRESS, ZERO_ADDRESS],
        [MAX_UINT256, 0],
        [],
    )
    factory = contract(w3, "ERC721Factory", contracts.factory)
    if price is None:
        receipt = await send(
            w3,
            owner,
            factory.functions.createNftWithErc20(nft_data, token_data),
            what=f"creating the datatoken {symbol}",
        )
    else:
        if price <= 0:
            raise ValueError("a datatoken's price must be positive")
        decimals = await _call(
            contract(w3, "OceanToken", contracts.ocean).functions.decimals(),
            what="the decimals of OCEAN",
        )
        # addresses: base token, exchange owner, publishing market fee collector, the one
        # allowed buyer (zero: anyone); uints: base token and datatoken decimals, rate,
        # publishing market fee, with mint (1: the exchange mints what it sells).
        fixed_data = (
            contracts.fixed_rate,
            [contracts.ocean, me, me, ZERO_ADDRESS],
            [decimals, 18, price, 0, 1],
        )
        receipt = await send(
            w3,
            owner,
            factory.functions.createNftWithErc20WithFixedRate(nft_data, token_data, fixed_data),
            what=f"creating the datatoken {symbol}",
        )
    nfts = _events(receipt, "ERC721Factory", "NFTCreated", contracts.factory)
    tokens = _events(receipt, "ERC721Factory", "TokenCreated", contracts.factory)
    if len(nfts) != 1 or len(tokens) != 1:
        raise OceanError("creating a datatoken did not report one NFT and one datatoken")
    exchange_id = ""
    if price is not None:
        exchanges = _events(receipt, "FixedRateExchange", "ExchangeCreated", contracts.fixed_rate)
        if len(exchanges) != 1:
            raise OceanError("creating a priced datatoken did not report its exchange")
        exchange_id = _hex32(exchanges[0].args["exchangeId"])
    created = Datatoken(
        nft=str(nfts[0].args["newTokenAddress"]),
        datatoken=str(tokens[0].args["newTokenAddress"]),
        exchange_id=exchange_id,
    )
    log.info("ocean.datatoken_created", symbol=symbol, price=price, **asdict(created))
    return created


async def mint(
    w3: AsyncWeb3[Any], datatoken: str, minter: LocalAccount, to: str, amount: int
) -> None:
    await send(
        w3,
        minter,
        contract(w3, "ERC20Template", datatoken).functions.mint(to_checksum_address(to), amount),
        what=f"minting {datatoken}",
    )


async def _approve(
    w3: AsyncWeb3[Any], token: str, owner: LocalAccount, spender: str, amount: int
) -> None:
    """Raises `owner`'s allowance for `spender` to at least `amount`."""
    erc20 = contract(w3, "ERC20Template", token)
    allowed = await _call(
        erc20.functions.allowance(owner.address, spender), what=f"an allowance of {token}"
    )
    if allowed < amount:
        await send(w3, owner, erc20.functions.approve(spender, amount), what=f"approving {token}")


async def buy(
    w3: AsyncWeb3[Any],
    contracts: Contracts,
    buyer: LocalAccount,
    exchange_id: str,
    amount: int = ONE_TOKEN,
) -> None:
    """Buys `amount` datatoken wei from a fixed-rate exchange, paying in its base token (the
    price plus the exchange's fees, allowed to the exchange first as needed)."""
    exchange = contract(w3, "FixedRateExchange", contracts.fixed_rate)
    exchange_bytes = _bytes32(exchange_id)
    _, base_token, _, active = await exchange_of(w3, contracts, exchange_id)
    if not active:
        raise OceanError(f"the exchange {exchange_id} is not active")
    cost, *_fees = await _call(
        exchange.functions.calcBaseInGivenOutDT(exchange_bytes, amount, 0),
        what="the price of a datatoken",
    )
    await _approve(w3, base_token, buyer, contracts.fixed_rate, cost)
    await send(
        w3,
        buyer,
        exchange.functions.buyDT(exchange_bytes, amount, cost, ZERO_ADDRESS, 0),
        what="buying a datatoken",
    )


async def balance(w3: AsyncWeb3[Any], token: str, address: str) -> int:
    result = await _call(
        contract(w3, "ERC20Template", token).functions.balanceOf(to_checksum_address(address)),
        what=f"a balance of {token}",
    )
    return int(result)


async def is_datatoken(
    w3: AsyncWeb3[Any], contracts: Contracts, address: str, *, timeout_s: float = CALL_TIMEOUT_S
) -> bool:
    """Whether `address` is a datatoken this deployment's factory created (so its code is
    Ocean's template, not a look-alike)."""
    result = await _call(
        contract(w3, "ERC721Factory", contracts.factory).functions.erc20List(
            to_checksum_address(address)
        ),
        what="whether a token is a datatoken",
        timeout_s=timeout_s,
    )
    return bool(result)


async def nft_of(w3: AsyncWeb3[Any], datatoken: str, *, timeout_s: float = CALL_TIMEOUT_S) -> str:
    result = await _call(
        contract(w3, "ERC20Template", datatoken).functions.getERC721Address(),
        what=f"the NFT of {datatoken}",
        timeout_s=timeout_s,
    )
    return str(result)


async def exchange_of(
    w3: AsyncWeb3[Any],
    contracts: Contracts,
    exchange_id: str,
    *,
    timeout_s: float = CALL_TIMEOUT_S,
) -> tuple[str, str, int, bool]:
    """(datatoken, base token, rate in base-token wei per whole datatoken, active)."""
    result = await _call(
        contract(w3, "FixedRateExchange", contracts.fixed_rate).functions.getExchange(
            _bytes32(exchange_id)
        ),
        what=f"the exchange {exchange_id}",
        timeout_s=timeout_s,
    )
    # (owner, datatoken, dt decimals, base token, bt decimals, rate, active, dt supply,
    # bt supply, dt balance, bt balance, with mint)
    return str(result[1]), str(result[3]), int(result[5]), bool(result[6])


def _bytes32(value: str) -> bytes:
    raw = bytes(HexBytes(value))
    if len(raw) != 32:
        raise ValueError(f"expected 32 bytes as 0x-prefixed hex, not {value!r}")
    return raw


def _hex32(value: bytes) -> str:
    return "0x" + bytes(value).hex()


# ---------------------------------------------------------------------------------------------
# Provider fees and orders


@dataclass(frozen=True)
class ProviderFee:
    """What the Provider charges for running a job, signed by the Provider: the datatoken's
    startOrder checks the signature and pays `amount` of `token` to `address`."""

    address: str
    token: str
    amount: int
    data: bytes
    v: int
    r: bytes
    s: bytes
    valid_until: int

    def as_tuple(self) -> tuple[str, str, int, int, bytes, bytes, int, bytes]:
        """The `providerFee` struct of ERC20Template.startOrder, in its field order."""
        return (self.address, self.token, self.amount, self.v, self.r, self.s,
                self.valid_until, self.data)  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: bytes as 0x hex, the amount as a decimal string (wei overflow doubles)."""
        return {
            "address": self.address,
            "token": self.token,
            "amount": str(self.amount),
            "data": "0x" + self.data.hex(),
            "v": self.v,
            "r": "0x" + self.r.hex(),
            "s": "0x" + self.s.hex(),
            "valid_until": self.valid_until,
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ProviderFee:
        try:
            return cls(
                address=checksum(str(raw["address"])),
                token=checksum(str(raw["token"])),
                amount=int(raw["amount"]),
                data=bytes(HexBytes(str(raw["data"]))),
                v=int(raw["v"]),
                r=_bytes32(str(raw["r"])),
                s=_bytes32(str(raw["s"])),
                valid_until=int(raw["valid_until"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"not a provider fee: {error}") from error


def provider_fee_hash(
    *, address: str, token: str, amount: int, data: bytes, valid_until: int
) -> bytes:
    """The 32 bytes a Provider signs (as an EIP-191 personal message) for a fee, exactly as
    ERC20Template.startOrder rebuilds them: keccak256(abi.encodePacked(providerData,
    providerFeeAddress, providerFeeToken, providerFeeAmount, validUntil)), with providerData
    as raw bytes (not its hash) and both numbers as 32-byte words."""
    packed = (
        data
        + bytes(HexBytes(to_checksum_address(address)))
        + bytes(HexBytes(to_checksum_address(token)))
        + amount.to_bytes(32, "big")
        + valid_until.to_bytes(32, "big")
    )
    return bytes(keccak(packed))


def sign_provider_fee(
    private_key: bytes, *, token: str, amount: int, data: bytes, valid_until: int
) -> ProviderFee:
    """A fee of `amount` wei of `token` payable to the key's address until `valid_until` (a
    Unix time compared with the order's block), signed with that key."""
    address = str(Account.from_key(private_key).address)
    token = to_checksum_address(token)
    digest = provider_fee_hash(
        address=address, token=token, amount=amount, data=data, valid_until=valid_until
    )
    signature = bytes(HexBytes(sign_hash(digest, private_key)))
    return ProviderFee(
        address=address,
        token=token,
        amount=amount,
        data=data,
        v=signature[64],
        r=signature[:32],
        s=signature[32:64],
        valid_until=valid_until,
    )


def provider_fee_signer(fee: ProviderFee) -> str:
    """The address that signed `fee` (offline; compare it with fee.address and the Provider's
    own address)."""
    digest = provider_fee_hash(
        address=fee.address,
        token=fee.token,
        amount=fee.amount,
        data=fee.data,
        valid_until=fee.valid_until,
    )
    return checksum(recover_signer(digest, fee.r + fee.s + bytes((fee.v,))))


async def start_order(
    w3: AsyncWeb3[Any],
    payer: LocalAccount,
    datatoken: str,
    *,
    consumer: str,
    service_index: int,
    fee: ProviderFee,
) -> str:
    """Orders one datatoken's service for `consumer`, paid by `payer` (who must hold one
    datatoken, and the fee, which is allowed to the datatoken first). Returns the order's
    transaction hash once mined; OceanError with the contract's reason when it reverts."""
    datatoken = to_checksum_address(datatoken)
    if fee.amount > 0 and int(fee.token, 16) != 0:
        await _approve(w3, fee.token, payer, datatoken, fee.amount)
    no_consume_market_fee = (ZERO_ADDRESS, ZERO_ADDRESS, 0)
    receipt = await send(
        w3,
        payer,
        contract(w3, "ERC20Template", datatoken).functions.startOrder(
            to_checksum_address(consumer), service_index, fee.as_tuple(), no_consume_market_fee
        ),
        what=f"ordering {datatoken}",
    )
    tx_hash = _hex32(receipt["transactionHash"])
    log.info(
        "ocean.order_started",
        datatoken=datatoken,
        consumer=consumer,
        service_index=service_index,
        tx=tx_hash,
        block=receipt["blockNumber"],
    )
    return tx_hash


@dataclass(frozen=True)
class OrderStarted:
    """An ERC20Template's OrderStarted event: `payer` spent `amount` datatoken wei so that
    `consumer` may use service `service_index`."""

    datatoken: str
    consumer: str
    payer: str
    amount: int
    service_index: int
    timestamp: int
    block_number: int
    log_index: int


@dataclass(frozen=True)
class ProviderFeePaid:
    """An ERC20Template's ProviderFee event: the fee an order paid, with its signature."""

    datatoken: str
    fee: ProviderFee


@dataclass(frozen=True)
class _Event:
    address: str
    args: dict[str, Any]


@functools.cache
def _event_abi(contract_name: str, event: str) -> tuple[bytes, dict[str, Any]]:
    for entry in artifact(contract_name)["abi"]:
        if entry["type"] == "event" and entry["name"] == event:
            return bytes(event_abi_to_log_topic(entry)), entry
    raise KeyError(f"{contract_name} has no event {event}")


def _decode_log(log_entry: Mapping[str, Any], contract_name: str, event: str) -> _Event | None:
    """The event's arguments when `log_entry` is that event; None otherwise."""
    topic, abi = _event_abi(contract_name, event)
    topics = [bytes(HexBytes(t)) for t in log_entry.get("topics", ())]
    if not topics or topics[0] != topic:
        return None
    indexed = [i for i in abi["inputs"] if i["indexed"]]
    plain = [i for i in abi["inputs"] if not i["indexed"]]
    if len(topics) != len(indexed) + 1:
        return None  # the same signature with other fields indexed: not Ocean's event
    args: dict[str, Any] = {}
    try:
        for spec, raw in zip(indexed, topics[1:], strict=True):
            (args[spec["name"]],) = abi_decode([spec["type"]], raw)
        values = abi_decode([i["type"] for i in plain], bytes(HexBytes(log_entry["data"])))
    except DecodingError:
        return None
    args.update({spec["name"]: value for spec, value in zip(plain, values, strict=True)})
    for spec in abi["inputs"]:
        if spec["type"] == "address":
            args[spec["name"]] = to_checksum_address(args[spec["name"]])
    return _Event(address=to_checksum_address(log_entry["address"]), args=args)


def _events(receipt: TxReceipt, contract_name: str, event: str, address: str) -> list[_Event]:
    found = (_decode_log(entry, contract_name, event) for entry in receipt["logs"])
    return [e for e in found if e is not None and e.address == to_checksum_address(address)]


def _quantity(value: int | str) -> int:
    """A JSON-RPC quantity: an int from web3, a hex string in a raw JSON receipt."""
    return value if isinstance(value, int) else int(value, 16)


def decode_order(
    receipt: TxReceipt | Mapping[str, Any],
) -> tuple[list[OrderStarted], list[ProviderFeePaid]]:
    """The orders and provider fees in a receipt, from any contract emitting ERC20Template's
    OrderStarted and ProviderFee events (which contract that is, the caller checks). Other
    logs are ignored. Pure: no chain calls."""
    orders: list[OrderStarted] = []
    fees: list[ProviderFeePaid] = []
    logs: Sequence[Mapping[str, Any]] = receipt["logs"]
    for entry in logs:
        started = _decode_log(entry, "ERC20Template", "OrderStarted")
        if started is not None:
            a = started.args
            orders.append(
                OrderStarted(
                    datatoken=started.address,
                    consumer=a["consumer"],
                    payer=a["payer"],
                    amount=a["amount"],
                    service_index=a["serviceIndex"],
                    timestamp=a["timestamp"],
                    block_number=_quantity(entry["blockNumber"]),
                    log_index=_quantity(entry["logIndex"]),
                )
            )
            continue
        paid = _decode_log(entry, "ERC20Template", "ProviderFee")
        if paid is not None:
            a = paid.args
            fee = ProviderFee(
                address=a["providerFeeAddress"],
                token=a["providerFeeToken"],
                amount=a["providerFeeAmount"],
                data=bytes(a["providerData"]),
                v=a["v"],
                r=bytes(a["r"]),
                s=bytes(a["s"]),
                valid_until=a["validUntil"],
            )
            fees.append(ProviderFeePaid(datatoken=paid.address, fee=fee))
    return orders, fees
