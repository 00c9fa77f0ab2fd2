"""Paid compute: what a job costs (InitializeCompute) and the orders that pay for it, verified
on the chain before any job starts.

An order is a datatoken's `startOrder` transaction (Ocean's ERC20Template): its `OrderStarted`
event names the consumer, the payer, the amount and the service, and its `ProviderFee` event
the fee this provider signed for the environment. The Provider reads both from the receipt,
waits for the configured number of confirmations, and checks that the order's block is still
the chain's: a reorganisation that drops the order leaves nothing to run on."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import math
import re
import sqlite3
import time
from importlib import resources
from typing import TYPE_CHECKING, Any

import structlog
from c2d.common.v1 import job_pb2
from c2d.provider.v1 import provider_pb2 as pb
from eth_utils.address import to_checksum_address

from mesh.chain_config import ONE_TOKEN, ZERO_ADDRESS
from mesh.errors import AlreadyExists, FailedPrecondition, InvalidArgument, PermissionDenied
from sdk.keys import Key

if TYPE_CHECKING:
    from web3 import AsyncWeb3

    from mesh import ocean
    from mesh.chain_config import ChainConfig

# web3 (under mesh.ocean and mesh.chain) takes most of a second to import: a node without a
# chain never loads it, and one with a chain loads it as it connects.

log = structlog.get_logger()

# Ocean's orders always pay one datatoken.
ORDER_AMOUNT = ONE_TOKEN
MAX_ORDERS = 20
MAX_FEE_VALIDITY_S = 30 * 86400
_HEX32 = re.compile(r"0x[0-9a-fA-F]{64}")
# How often the confirmations of an order are looked at while the Provider waits for them.
_CONFIRMATION_POLL_S = 0.25

_SCHEMA = """
-- Which asset sells through which datatoken and service: one asset each.
CREATE TABLE IF NOT EXISTS sold_services (
    datatoken TEXT NOT NULL, service_index INTEGER NOT NULL, asset TEXT NOT NULL,
    PRIMARY KEY (datatoken, service_index)
);
-- Orders read from the chain once they had their confirmations: the receipt's events, kept
-- so that later jobs on the same order need no chain round trip.
CREATE TABLE IF NOT EXISTS confirmed_orders (tx_hash TEXT PRIMARY KEY, events TEXT NOT NULL);
-- The asset each order event paid for: an order pays for one asset's service, whatever job.
CREATE TABLE IF NOT EXISTS order_uses (
    tx_hash TEXT NOT NULL, log_index INTEGER NOT NULL, asset TEXT NOT NULL,
    consumer TEXT NOT NULL, first_use REAL NOT NULL,
    PRIMARY KEY (tx_hash, log_index)
);
CREATE INDEX IF NOT EXISTS order_uses_by_asset ON order_uses (asset, consumer);
"""


def _refused(message: str, reason: str, field: str | None = None) -> FailedPrecondition:
    return FailedPrecondition(message, reason=reason, field=field)


@dataclasses.dataclass(frozen=True)
class PaidAsset:
    """An asset of a job that an order must pay for."""

    # `datasets/{id}` or `algorithms/{id}`.
    name: str
    pricing: pb.Pricing
    # How long an order grants access (the dataset policy's `timeout`); 0 for no expiry.
    timeout_s: int


def paid_assets(datasets: list[pb.Dataset], algorithm: pb.Algorithm | None) -> list[PaidAsset]:
    """The job's assets that are sold, datasets first, each with its order's validity."""
    assets = [
        PaidAsset(d.name, d.pricing, d.policy.timeout.seconds)
        for d in datasets
        if d.HasField("pricing")
    ]
    if algorithm is not None and algorithm.HasField("pricing"):
        assets.append(PaidAsset(algorithm.name, algorithm.pricing, 0))
    return assets


@dataclasses.dataclass(frozen=True)
class ChainAccess:
    """The Provider's chain: a web3 connection and how far it trusts what it reads."""

    w3: AsyncWeb3[Any]
    chain_id: int
    confirmations: int = 1
    timeout_s: float = 10.0
    confirmation_wait_s: float = 30.0
    # Ocean's contracts on this chain: the datatokens its factory made are the ones the
    # Provider sells through. None when neither a contracts file nor Ocean's published
    # addresses know them.
    contracts: ocean.Contracts | None = None

    @classmethod
    def from_config(cls, config: ChainConfig) -> ChainAccess:
        from mesh.chain import connect

        return cls(
            w3=connect(config.url, config.timeout_s),
            chain_id=config.chain_id,
            confirmations=config.confirmations,
            timeout_s=config.timeout_s,
            confirmation_wait_s=config.confirmation_wait_s,
            contracts=known_contracts(config),
        )


def known_contracts(config: ChainConfig) -> ocean.Contracts | None:
    """Ocean's contracts on the chain: from the contracts file `c2d chain up` wrote, or from
    the addresses Ocean publishes for its networks."""
    from mesh import ocean

    if config.contracts_file is not None:
        return ocean.Contracts.load(config.contracts_file)
    published = json.loads(resources.files("addresses").joinpath("address.json").read_text())
    for network in published.values():
        if network.get("chainId") == config.chain_id and network.get("ERC721Factory"):
            return ocean.Contracts(
                chain_id=config.chain_id,
                ocean=network.get("Ocean", ZERO_ADDRESS),
                router=network.get("Router", ZERO_ADDRESS),
                factory=network["ERC721Factory"],
                fixed_rate=network.get("FixedPrice", ZERO_ADDRESS),
                dispenser=network.get("Dispenser", ZERO_ADDRESS),
            )
    return None


@dataclasses.dataclass(frozen=True)
class _Order:
    """One order event of a confirmed transaction, with the provider fees paid beside it."""

    tx_hash: str
    event: ocean.OrderStarted
    fees: list[ocean.ProviderFee]


def _event_json(order: ocean.OrderStarted, fees: list[ocean.ProviderFee]) -> dict[str, Any]:
    # Amounts as decimal strings: wei overflows a JSON number in other readers.
    return {
        **dataclasses.asdict(order),
        "amount": str(order.amount),
        "fees": [f.to_dict() for f in fees],
    }


def _event_of(raw: dict[str, Any]) -> tuple[ocean.OrderStarted, list[ocean.ProviderFee]]:
    from mesh import ocean

    fields = {**raw, "amount": int(raw["amount"])}
    fees = [ocean.ProviderFee.from_dict(f) for f in fields.pop("fees")]
    return ocean.OrderStarted(**fields), fees


@functools.lru_cache(maxsize=4096)
def _fee_signer(fee: ocean.ProviderFee) -> str:
    """Who signed a fee; kept, since every further job on an order checks the same fee."""
    from mesh import ocean

    return ocean.provider_fee_signer(fee)


def fee_message(fee: ocean.ProviderFee) -> pb.ProviderFee:
    return pb.ProviderFee(
        provider_fee_address=fee.address,
        provider_fee_token=fee.token,
        provider_fee_amount=str(fee.amount),
        provider_data="0x" + fee.data.hex(),
        v=fee.v,
        r="0x" + fee.r.hex(),
        s="0x" + fee.s.hex(),
        valid_until=fee.valid_until,
    )


def fee_of(message: pb.ProviderFee) -> ocean.ProviderFee:
    """The fee of an InitializeCompute answer, as startOrder takes it."""
    from mesh import ocean

    return ocean.ProviderFee(
        address=message.provider_fee_address,
        token=message.provider_fee_token,
        amount=int(message.provider_fee_amount or 0),
        data=bytes.fromhex(message.provider_data.removeprefix("0x")),
        v=message.v,
        r=bytes.fromhex(message.r.removeprefix("0x")),
        s=bytes.fromhex(message.s.removeprefix("0x")),
        valid_until=message.valid_until,
    )


def _fee_environment(fee: ocean.ProviderFee) -> str | None:
    try:
        data = json.loads(fee.data)
    except ValueError:
        return None
    environment = data.get("environment") if isinstance(data, dict) else None
    return environment if isinstance(environment, str) else None


class Payments:
    """Prices of assets, quotes of what a job costs, and the verification of its orders."""

    def __init__(self, db: sqlite3.Connection, chain: ChainAccess | None, key: Key) -> None:
        self.db = db
        self.chain = chain
        self.key = key
        self._chain_id_checked = False
        db.executescript(_SCHEMA)

    def _chain(self) -> ChainAccess:
        if self.chain is None:
            raise _refused(
                "this node has no chain configured (C2D_CHAIN_URL), so it sells nothing",
                "CHAIN_NOT_CONFIGURED",
            )
        return self.chain

    async def _ready_chain(self) -> ChainAccess:
        """The chain, once it has said it is the configured one: orders read from another
        chain would prove nothing."""
        chain = self._chain()
        if not self._chain_id_checked:
            actual = await self._call(chain.w3.eth.chain_id, "eth_chainId")
            if actual != chain.chain_id:
                raise _refused(
                    f"the node's chain answers as chain {actual}, not the configured "
                    f"{chain.chain_id}",
                    "CHAIN_MISMATCH",
                )
            self._chain_id_checked = True
        return chain

    async def _call(self, awaitable: Any, what: str) -> Any:
        from mesh.chain import rpc

        return await rpc(awaitable, timeout_s=self._chain().timeout_s, what=what)

    # -- publishing ----------------------------------------------------------------------

    async def pricing(self, requested: pb.Pricing, publisher: str) -> pb.Pricing | None:
        """The pricing of a new asset from what its publisher asked for, read from the chain;
        None for a free asset. The datatoken must be one Ocean's factory made on this chain,
        and its data NFT the publisher's."""
        from mesh import ocean

        if not requested.datatoken:
            if requested.exchange_id or requested.service_index:
                raise InvalidArgument(
                    "pricing.datatoken is required to sell an asset", field="pricing.datatoken"
                )
            return None
        chain = await self._ready_chain()
        try:
            datatoken = to_checksum_address(requested.datatoken)
        except ValueError:
            raise InvalidArgument(
                "pricing.datatoken must be a 0x-prefixed 20-byte hex address",
                field="pricing.datatoken",
            ) from None
        if not 0 <= requested.service_index < 1000:
            raise InvalidArgument(
                "pricing.service_index must be between 0 and 999", field="pricing.service_index"
            )
        contracts = chain.contracts
        if contracts is None:
            raise _refused(
                f"no Ocean contracts are known on chain {chain.chain_id}; configure "
                "C2D_CHAIN_CONTRACTS",
                "CHAIN_NOT_CONFIGURED",
            )
        timeout_s = chain.timeout_s
        known = await ocean.is_datatoken(chain.w3, contracts, datatoken, timeout_s=timeout_s)
        if not known:
            raise _refused(
                f"{datatoken} is not a datatoken of Ocean's factory on chain {chain.chain_id}",
                "DATATOKEN_UNKNOWN",
                "pricing.datatoken",
            )
        nft = await ocean.nft_of(chain.w3, datatoken, timeout_s=timeout_s)
        # Ocean's data NFTs are token 1 of their own ERC721Template contract.
        nft_owner = await self._call(
            ocean.contract(chain.w3, "ERC721Template", nft).functions.ownerOf(1).call(), "ownerOf"
        )
        if nft_owner != publisher:
            raise PermissionDenied(
                f"the data NFT of {datatoken} belongs to {nft_owner}, not to you",
                reason="DATATOKEN_NOT_YOURS",
                field="pricing.datatoken",
            )
        pricing = pb.Pricing(
            chain_id=chain.chain_id,
            datatoken=datatoken,
            nft=nft,
            service_index=requested.service_index,
            amount=str(ORDER_AMOUNT),
        )
        if requested.exchange_id:
            if not _HEX32.fullmatch(requested.exchange_id):
                raise InvalidArgument(
                    "pricing.exchange_id must be 0x and 64 hex digits",
                    field="pricing.exchange_id",
                )
            sold, base_token, rate, active = await ocean.exchange_of(
                chain.w3, contracts, requested.exchange_id, timeout_s=timeout_s
            )
            if sold != datatoken or not active:
                raise InvalidArgument(
                    f"exchange {requested.exchange_id} does not sell {datatoken}",
                    field="pricing.exchange_id",
                )
            pricing.exchange_id = requested.exchange_id.lower()
            pricing.base_token = base_token
            pricing.price = str(rate)
        return pricing

    def claim_service(self, asset: str, pricing: pb.Pricing) -> None:
        """Binds the datatoken's service to `asset`: ALREADY_EXISTS when another asset sells
        through it, since one order must never pay for two assets."""
        row = self.db.execute(
            "INSERT INTO sold_services (datatoken, service_index, asset) VALUES (?, ?, ?) "
            "ON CONFLICT DO NOTHING RETURNING asset",
            (pricing.datatoken, pricing.service_index, asset),
        ).fetchone()
        if row is None:
            raise AlreadyExists(
                f"service {pricing.service_index} of {pricing.datatoken} sells another asset "
                "already; use another datatoken or service_index",
                reason="DATATOKEN_IN_USE",
                field="pricing.datatoken",
            )

    def release_service(self, pricing: pb.Pricing) -> None:
        self.db.execute(
            "DELETE FROM sold_services WHERE datatoken = ? AND service_index = ?",
            (pricing.datatoken, pricing.service_index),
        )

    # -- quotes --------------------------------------------------------------------------

    def provider_fee(
        self,
        caller: str,
        assets: list[PaidAsset],
        environment: job_pb2.Environment,
        valid_for_s: int,
    ) -> ocean.ProviderFee:
        """The fee every order of the job carries, signed by this provider: the environment's
        price for each started minute of `valid_for_s` (0 in a free environment)."""
        from mesh import ocean

        now = int(time.time())
        price = environment.price if environment.HasField("price") else None
        per_minute = int(price.amount_per_minute) if price else 0
        data = json.dumps(
            {
                "environment": environment.name,
                "consumer": caller,
                "assets": [a.name for a in assets],
                "timestamp": now,
            },
            separators=(",", ":"),
        ).encode()
        return ocean.sign_provider_fee(
            self.key.private_key,
            token=price.token if price else ZERO_ADDRESS,
            amount=per_minute * math.ceil(valid_for_s / 60),
            data=data,
            valid_until=now + valid_for_s,
        )

    async def quote(
        self,
        caller: str,
        assets: list[PaidAsset],
        environment: job_pb2.Environment,
        valid_for_s: int,
    ) -> pb.InitializeComputeResponse:
        if not assets:
            _check_free_job(environment)
            return pb.InitializeComputeResponse()
        chain = self._chain()
        response = pb.InitializeComputeResponse(chain_id=chain.chain_id)
        for asset in assets:
            response.orders.append(
                pb.OrderQuote(
                    asset=asset.name,
                    pricing=asset.pricing,
                    valid_order=self._valid_order(caller, asset, environment),
                )
            )
        response.provider_fee.CopyFrom(
            fee_message(self.provider_fee(caller, assets, environment, valid_for_s))
        )
        return response

    def _valid_order(self, caller: str, asset: PaidAsset, environment: job_pb2.Environment) -> str:
        """An order of the caller's that paid for `asset` before and would start this job."""
        rows = self.db.execute(
            "SELECT u.tx_hash, u.log_index, o.events FROM order_uses u "
            "JOIN confirmed_orders o ON o.tx_hash = u.tx_hash "
            "WHERE u.asset = ? AND u.consumer = ? ORDER BY u.first_use DESC LIMIT 20",
            (asset.name, caller),
        ).fetchall()
        now = time.time()
        for tx_hash, log_index, events in rows:
            for raw in json.loads(events):
                event, fees = _event_of(raw)
                if event.log_index != log_index or _expired(event, asset, now):
                    continue
                if self._fee_refusal(fees, environment, now) is None:
                    return str(tx_hash)
        return ""

    # -- verification --------------------------------------------------------------------

    async def verify(
        self,
        caller: str,
        assets: list[PaidAsset],
        environment: job_pb2.Environment,
        orders: list[str],
    ) -> dict[str, str]:
        """Checks that `orders` pay for every paid asset of the job, for the caller, in
        `environment`; FAILED_PRECONDITION with the reason otherwise, UNAVAILABLE when the
        chain does not answer. Returns the order transaction of each paid asset."""
        hashes = _check_hashes(orders)
        if not assets:
            _check_free_job(environment)
            if hashes:
                raise _refused(
                    "the job is free: orders[0] pays for none of its assets",
                    "ORDER_WRONG_DATATOKEN",
                    "orders[0]",
                )
            return {}
        chain = await self._ready_chain()
        if not hashes:
            raise _refused(
                f"{assets[0].name} is paid: order it first (InitializeCompute says what to "
                "pay) and give the order transaction in `orders`",
                "ORDER_REQUIRED",
                "orders",
            )
        found = [await self._confirmed(chain, tx, i) for i, tx in enumerate(hashes)]
        now = time.time()
        by_token = {a.pricing.datatoken: a for a in assets}
        for i, tx_orders in enumerate(found):
            for order in tx_orders:
                if order.event.datatoken not in by_token:
                    raise _refused(
                        f"orders[{i}] is an order on {order.event.datatoken}, which sells no "
                        "asset of this job",
                        "ORDER_WRONG_DATATOKEN",
                        f"orders[{i}]",
                    )
        chosen: dict[str, _Order] = {}
        for asset in assets:
            candidates = [
                (i, o)
                for i, tx_orders in enumerate(found)
                for o in tx_orders
                if o.event.datatoken == asset.pricing.datatoken
            ]
            if not candidates:
                raise _refused(
                    f"no order given pays for {asset.name} (datatoken {asset.pricing.datatoken})",
                    "ORDER_REQUIRED",
                    "orders",
                )
            refusal: FailedPrecondition | None = None
            for i, order in candidates:
                refusal = self._order_refusal(caller, asset, order, i, now)
                if refusal is None:
                    chosen[asset.name] = order
                    break
            if refusal is not None:
                raise refusal
        fees = [f for o in chosen.values() for f in o.fees]
        fee_refusal = self._fee_refusal(fees, environment, now)
        if fee_refusal is not None:
            raise fee_refusal
        self._bind(chosen, caller, now)
        return {name: order.tx_hash for name, order in chosen.items()}

    def _order_refusal(
        self, caller: str, asset: PaidAsset, order: _Order, index: int, now: float
    ) -> FailedPrecondition | None:
        event, field = order.event, f"orders[{index}]"
        if event.service_index != asset.pricing.service_index:
            return _refused(
                f"{field} orders service {event.service_index} of {event.datatoken}; "
                f"{asset.name} is service {asset.pricing.service_index}",
                "ORDER_WRONG_SERVICE",
                field,
            )
        if caller not in (event.consumer, event.payer):
            return _refused(
                f"{field} was paid by {event.payer} for {event.consumer}, not for you",
                "ORDER_WRONG_CONSUMER",
                field,
            )
        if event.amount < int(asset.pricing.amount or ORDER_AMOUNT):
            return _refused(
                f"{field} paid {event.amount} datatoken units; {asset.name} costs "
                f"{asset.pricing.amount}",
                "ORDER_AMOUNT_TOO_SMALL",
                field,
            )
        if _expired(event, asset, now):
            return _refused(
                f"{field} expired: {asset.name} grants {asset.timeout_s} s of access per "
                "order; order again",
                "ORDER_EXPIRED",
                field,
            )
        used_for = self.db.execute(
            "SELECT asset FROM order_uses WHERE tx_hash = ? AND log_index = ?",
            (order.tx_hash, event.log_index),
        ).fetchone()
        if used_for is not None and used_for[0] != asset.name:
            return _refused(
                f"{field} paid for {used_for[0]} already; an order pays for one service",
                "ORDER_REUSED",
                field,
            )
        return None

    def _fee_refusal(
        self, fees: list[ocean.ProviderFee], environment: job_pb2.Environment, now: float
    ) -> FailedPrecondition | None:
        """None when one of `fees` pays for `environment` (or it is free); else why not."""

        if environment.free:
            return None
        if not fees:
            return _refused(
                f"environment {environment.name} is priced: the orders must pay the provider "
                "fee that InitializeCompute gives",
                "PROVIDER_FEE_MISSING",
                "orders",
            )
        refusal: FailedPrecondition | None = None
        for fee in fees:
            if fee.address != self.key.address or _fee_signer(fee) != fee.address:
                refusal = _refused(
                    f"the provider fee was signed by {fee.address}, not by this provider "
                    f"({self.key.address})",
                    "PROVIDER_FEE_WRONG_SIGNER",
                    "orders",
                )
            elif (paid_for := _fee_environment(fee)) != environment.name:
                refusal = _refused(
                    f"the provider fee is for environment {paid_for!r}, not {environment.name!r}",
                    "PROVIDER_FEE_WRONG_ENVIRONMENT",
                    "orders",
                )
            elif fee.valid_until < now:
                refusal = _refused(
                    "the provider fee's validity has ended; initialize and order again",
                    "PROVIDER_FEE_EXPIRED",
                    "orders",
                )
            elif fee.amount <= 0 or fee.token != environment.price.token:
                refusal = _refused(
                    f"the provider fee pays nothing in {environment.price.token}",
                    "PROVIDER_FEE_MISSING",
                    "orders",
                )
            else:
                return None
        return refusal

    def _bind(self, chosen: dict[str, _Order], caller: str, now: float) -> None:
        """Records which asset each order paid for (no await since the reuse check, so two
        jobs at once cannot bind one order to two assets)."""
        for asset, order in chosen.items():
            self.db.execute(
                "INSERT INTO order_uses (tx_hash, log_index, asset, consumer, first_use) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (order.tx_hash, order.event.log_index, asset, caller, now),
            )

    async def _confirmed(self, chain: ChainAccess, tx_hash: str, index: int) -> list[_Order]:
        """The order events of a transaction with the confirmations the node asks for, read
        from the chain the first time and kept afterwards."""
        from web3.exceptions import BlockNotFound

        from mesh import ocean

        row = self.db.execute(
            "SELECT events FROM confirmed_orders WHERE tx_hash = ?", (tx_hash,)
        ).fetchone()
        if row is not None:
            return [_Order(tx_hash, *_event_of(raw)) for raw in json.loads(row[0])]
        field = f"orders[{index}]"
        deadline = time.monotonic() + chain.confirmation_wait_s
        receipt = await self._receipt(chain, tx_hash, field)
        if receipt["status"] != 1:
            raise _refused(f"{field} failed on the chain (reverted)", "ORDER_FAILED", field)
        events, fees = ocean.decode_order(receipt)
        if not events:
            raise _refused(
                f"{field} is not an order (no OrderStarted)", "ORDER_NOT_AN_ORDER", field
            )
        while True:
            block_number = int(receipt["blockNumber"])
            # Both at once: one round trip less per order. The block must still be the chain's
            # at that height: a reorganisation may have replaced it, or shortened the chain.
            try:
                head, block = await asyncio.gather(
                    self._call(chain.w3.eth.block_number, "eth_blockNumber"),
                    self._call(chain.w3.eth.get_block(block_number), "eth_getBlockByNumber"),
                )
            except BlockNotFound:
                block = None
            if block is None or bytes(block["hash"]) != bytes(receipt["blockHash"]):
                raise _refused(
                    f"{field} is no longer on the chain (its block was replaced)",
                    "ORDER_NOT_FOUND",
                    field,
                )
            confirmations = head - block_number + 1
            if confirmations >= chain.confirmations:
                break
            if time.monotonic() >= deadline:
                raise _refused(
                    f"{field} has {confirmations} of the {chain.confirmations} confirmations "
                    "this node asks for; start again once more blocks are on top of it",
                    "ORDER_NOT_CONFIRMED",
                    field,
                )
            await asyncio.sleep(_CONFIRMATION_POLL_S)
            # Read again: the transaction may have left the chain, or moved to another block.
            receipt = await self._receipt(chain, tx_hash, field)
        orders = [
            _Order(tx_hash, e, [f.fee for f in fees if f.datatoken == e.datatoken]) for e in events
        ]
        self.db.execute(
            "INSERT OR IGNORE INTO confirmed_orders (tx_hash, events) VALUES (?, ?)",
            (tx_hash, json.dumps([_event_json(o.event, o.fees) for o in orders])),
        )
        log.info(
            "order confirmed",
            tx=tx_hash,
            block=int(receipt["blockNumber"]),
            confirmations=confirmations,
        )
        return orders

    async def _receipt(self, chain: ChainAccess, tx_hash: str, field: str) -> Any:
        from web3.exceptions import TransactionNotFound

        try:
            return await self._call(
                chain.w3.eth.get_transaction_receipt(tx_hash),  # type: ignore[arg-type]
                "eth_getTransactionReceipt",
            )
        except TransactionNotFound:
            raise _refused(
                f"{field} is not on the chain (unknown, still pending, or dropped by a "
                "reorganisation)",
                "ORDER_NOT_FOUND",
                field,
            ) from None


def _check_free_job(environment: job_pb2.Environment) -> None:
    """A job with nothing to order has no order to carry a priced environment's fee."""
    if not environment.free:
        raise _refused(
            f"environment {environment.name} is priced, and its provider fee is paid with the "
            "orders of a job's paid assets; this job has none: choose a free environment",
            "PROVIDER_FEE_MISSING",
            "environment",
        )


def _expired(event: ocean.OrderStarted, asset: PaidAsset, now: float) -> bool:
    return asset.timeout_s > 0 and event.timestamp + asset.timeout_s < now


def _check_hashes(orders: list[str]) -> list[str]:
    if len(orders) > MAX_ORDERS:
        raise InvalidArgument(f"orders lists at most {MAX_ORDERS} transactions", field="orders")
    hashes: list[str] = []
    for i, tx in enumerate(orders):
        if not _HEX32.fullmatch(tx):
            raise InvalidArgument(
                f"orders[{i}] must be a transaction hash: 0x and 64 hex digits",
                field=f"orders[{i}]",
            )
        if tx.lower() in hashes:
            raise InvalidArgument(f"orders[{i}] is listed twice", field=f"orders[{i}]")
        hashes.append(tx.lower())
    return hashes


def check_valid_for(seconds: int, environment: job_pb2.Environment) -> int:
    """The provider fee's validity: `seconds`, or the environment's max_duration when 0."""
    if seconds == 0:
        return max(60, environment.max_duration.seconds)
    if not 0 < seconds <= MAX_FEE_VALIDITY_S:
        raise InvalidArgument("valid_for must be between 1 s and 30 days", field="valid_for")
    return seconds
