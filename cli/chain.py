"""`c2d chain ...` and the paid parts of the other commands: a local chain with Ocean's
contracts, datatokens for paid assets, and the consumer's orders.

The chain a command uses is `$C2D_CHAIN_URL` with `$C2D_CHAIN_ID` and `$C2D_CHAIN_CONTRACTS`,
or else the one `c2d chain up` runs (described in `$C2D_HOME/chain/chain.json` while it is up).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any

from c2d.provider.v1 import provider_pb2 as pb
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils.address import to_checksum_address

from cli.common import emit, key
from mesh import config as mesh_config
from mesh.chain_config import ChainConfig
from mesh.errors import MeshError
from sdk.keys import Key

if TYPE_CHECKING:
    from web3 import AsyncWeb3

    from mesh import ocean
    from mesh.ganache import Ganache

# web3 takes most of a second to import: only the commands that use the chain load it, so
# that every other command starts at once.

# What `c2d chain up` gives each funded address.
FUND_ETHER = 100 * 10**18
FUND_OCEAN = 10_000 * 10**18
DEFAULT_CHAIN_ID = 1337
DEFAULT_PORT = 8545
_UNIT = Decimal(10**18)


@contextlib.contextmanager
def chain_errors() -> Iterator[None]:
    """A refused transaction, a chain that does not answer, or a ganache that will not start
    ends the command with its message, not a traceback."""
    from mesh.ganache import GanacheError
    from mesh.ocean import OceanError

    try:
        yield
    except (OceanError, GanacheError, MeshError, ValueError) as error:
        raise SystemExit(f"c2d: {error}") from None


def chain_dir() -> Path:
    return mesh_config.home() / "chain"


@dataclass(frozen=True)
class LocalChain:
    """A chain the CLI sends transactions to."""

    url: str
    chain_id: int
    contracts: ocean.Contracts
    contracts_file: Path

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncIterator[AsyncWeb3[Any]]:
        from mesh import chain

        w3 = chain.connect(self.url, 30.0)
        try:
            yield w3
        finally:
            await chain.disconnect(w3)

    def save(self, path: Path) -> None:
        """Describes the chain for the other commands (`current_chain`) while it runs."""
        described = {"url": self.url, "chain_id": self.chain_id}
        path.write_text(json.dumps({**described, "contracts": str(self.contracts_file)}))

    @classmethod
    def load(cls, path: Path) -> LocalChain:
        from mesh import ocean

        raw = json.loads(path.read_text())
        contracts_file = Path(raw["contracts"])
        contracts = ocean.Contracts.load(contracts_file)
        return cls(raw["url"], int(raw["chain_id"]), contracts, contracts_file)

    def env(self) -> dict[str, str]:
        """What a Provider needs to verify orders on this chain."""
        return {
            "C2D_CHAIN_URL": self.url,
            "C2D_CHAIN_ID": str(self.chain_id),
            "C2D_CHAIN_CONTRACTS": str(self.contracts_file),
        }


def current_chain() -> LocalChain | None:
    """The chain the environment names (read as the Provider reads it), else the one `c2d
    chain up` runs; None for neither."""
    try:
        configured = ChainConfig.from_env()
    except ValueError as error:
        raise SystemExit(f"c2d: {error}") from None
    if configured is None:
        described = chain_dir() / "chain.json"
        return LocalChain.load(described) if described.exists() else None
    if configured.contracts_file is None:
        raise SystemExit("c2d: C2D_CHAIN_URL needs C2D_CHAIN_CONTRACTS (Ocean's addresses)")
    # Only now: a node with no chain never loads web3.
    from mesh import ocean

    contracts = ocean.Contracts.load(configured.contracts_file)
    return LocalChain(configured.url, configured.chain_id, contracts, configured.contracts_file)


def require_chain() -> LocalChain:
    found = current_chain()
    if found is None:
        raise SystemExit(
            "c2d: no chain: run `c2d chain up` in another terminal, or set C2D_CHAIN_URL and "
            "C2D_CHAIN_CONTRACTS"
        )
    return found


def account(args: argparse.Namespace) -> LocalAccount:
    signer: LocalAccount = Account.from_key(key(args).private_key)
    return signer


def parse_tokens(text: str) -> int:
    """A token amount such as `5` or `0.25` in the token's smallest unit (18 decimals)."""
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"not an amount: {text!r}") from None
    wei = value * _UNIT
    if value <= 0 or wei != wei.to_integral_value():
        raise argparse.ArgumentTypeError(
            f"the amount must be positive, at most 18 decimals: {text}"
        )
    return int(wei)


def tokens(wei: int | str) -> str:
    """Wei as a token amount for people: 5000000000000000000 -> 5."""
    return f"{(Decimal(int(wei)) / _UNIT).normalize():f}"


# -- c2d chain up / fund -------------------------------------------------------------------


async def cmd_chain_up(args: argparse.Namespace) -> int:
    with chain_errors():
        return await _chain_up(args)


async def _chain_up(args: argparse.Namespace) -> int:
    """Runs ganache on 127.0.0.1 with Ocean's contracts until Ctrl-C. Its state is kept in
    $C2D_HOME/chain, so the next `c2d chain up` has the same contracts, datatokens and
    orders."""
    # Before anything starts: a ^C at any moment stops the node in order.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    folder = mesh_config.ensure_private_dir(chain_dir())
    funded = sorted({key(args).address, *args.fund})
    node, local = await launch(
        folder, port=args.port, chain_id=args.chain_id, funded=funded, keep_state=True
    )
    try:
        local.save(folder / "chain.json")
        addresses = _addresses(local.contracts)
        emit(
            args,
            {"url": local.url, "chain_id": local.chain_id, "contracts": addresses},
            f"local chain up: {local.url} (chain id {local.chain_id})\n"
            + "\n".join(f"  {name:11} {value}" for name, value in addresses.items())
            + f"\n  funded      {', '.join(funded)} "
            f"({tokens(FUND_ETHER)} ETH, {tokens(FUND_OCEAN)} OCEAN)\n"
            f"`c2d up` and the other commands use it while it runs. Ctrl-C stops it.",
        )
        sys.stdout.flush()
        waiting = asyncio.ensure_future(node.wait())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({waiting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if waiting.done():
            print("c2d chain up: ganache stopped by itself; see " + str(folder / "ganache.log"))
            return 1
        waiting.cancel()
        return 0
    finally:
        (folder / "chain.json").unlink(missing_ok=True)
        await node.stop()


async def launch(
    folder: Path, *, port: int, chain_id: int, funded: Iterable[str], keep_state: bool
) -> tuple[Ganache, LocalChain]:
    """ganache on 127.0.0.1:`port` with Ocean's contracts (deployed, unless an earlier run's
    are still in its state), each of `funded` topped up to FUND_ETHER and FUND_OCEAN. Its
    deployer key, log and (with `keep_state`) chain state live in `folder`."""
    from mesh import chain, ganache, ocean

    deployer = _deployer(folder)
    node = await ganache.start(
        port=port,
        accounts=[(bytes(deployer.key), 10**9 * 10**18)],
        chain_id=chain_id,
        db=folder / "ganache-db" if keep_state else None,
        log_file=folder / "ganache.log",
    )
    contracts_file = folder / "contracts.json"
    w3 = chain.connect(node.url, 30.0)
    try:
        contracts = await _deployed(w3, contracts_file)
        if contracts is None:
            print("deploying Ocean's contracts ...", file=sys.stderr, flush=True)
            contracts = await ocean.deploy(w3, deployer)
            contracts.save(contracts_file)
        for address in funded:
            await _top_up(w3, contracts, deployer, address)
    except BaseException:
        await node.stop()
        raise
    finally:
        await chain.disconnect(w3)
    return node, LocalChain(node.url, node.chain_id, contracts, contracts_file)


def _deployer(folder: Path) -> LocalAccount:
    """The account that deployed the local chain's contracts and funds the others."""
    signer: LocalAccount = Account.from_key(
        Key.load_or_create(folder / "deployer-key.json").private_key
    )
    return signer


def _addresses(contracts: ocean.Contracts) -> dict[str, str]:
    return {
        "OCEAN": contracts.ocean,
        "router": contracts.router,
        "factory": contracts.factory,
        "fixed rate": contracts.fixed_rate,
        "dispenser": contracts.dispenser,
    }


async def _deployed(w3: AsyncWeb3[Any], contracts_file: Path) -> ocean.Contracts | None:
    """The contracts deployed by an earlier `chain up` on this chain state, if they are
    still there."""
    from mesh import chain, ocean

    if not contracts_file.exists():
        return None
    contracts = ocean.Contracts.load(contracts_file)
    code = await chain.rpc(
        w3.eth.get_code(to_checksum_address(contracts.factory)), timeout_s=10, what="eth_getCode"
    )
    return contracts if len(code) > 0 else None


async def _top_up(
    w3: AsyncWeb3[Any], contracts: ocean.Contracts, deployer: LocalAccount, address: str
) -> None:
    from mesh import chain, ocean

    ether = await chain.rpc(w3.eth.get_balance(address), timeout_s=10, what="a balance")  # type: ignore[arg-type]
    oceans = await ocean.balance(w3, contracts.ocean, address)
    await ocean.fund(
        w3,
        contracts,
        deployer,
        address,
        ether=max(0, FUND_ETHER - ether),
        ocean=max(0, FUND_OCEAN - oceans),
    )


async def cmd_chain_fund(args: argparse.Namespace) -> int:
    """Gives an address ETH and OCEAN on the local chain (from its deployer)."""
    with chain_errors():
        return await _chain_fund(args)


async def _chain_fund(args: argparse.Namespace) -> int:
    from mesh import ocean

    local = require_chain()
    deployer = _deployer(chain_dir())
    async with local.connect() as w3:
        await ocean.fund(
            w3, local.contracts, deployer, args.address, ether=args.ether, ocean=args.ocean
        )
    emit(
        args,
        {"address": args.address, "ether": str(args.ether), "ocean": str(args.ocean)},
        f"sent {tokens(args.ether)} ETH and {tokens(args.ocean)} OCEAN to {args.address}",
    )
    return 0


# -- paid assets ---------------------------------------------------------------------------


async def pricing_for(args: argparse.Namespace, title: str) -> pb.Pricing | None:
    """The pricing a `publish` command asks for: an existing datatoken (`--datatoken`), or a
    new data NFT with a datatoken sold at `--price` OCEAN on the fixed-rate exchange."""
    from mesh import ocean

    if args.datatoken:
        return pb.Pricing(
            datatoken=args.datatoken,
            service_index=args.service_index,
            exchange_id=args.exchange_id or "",
        )
    if args.price is None:
        return None
    local = require_chain()
    print(
        f"creating a data NFT and a datatoken sold at {tokens(args.price)} OCEAN ...",
        file=sys.stderr,
        flush=True,
    )
    async with local.connect() as w3:
        made = await ocean.create_datatoken(
            w3,
            local.contracts,
            account(args),
            name=(title or "c2d asset")[:60],
            symbol="C2D",
            price=args.price,
        )
    return pb.Pricing(
        datatoken=made.datatoken, service_index=args.service_index, exchange_id=made.exchange_id
    )


def add_pricing_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--price",
        type=parse_tokens,
        metavar="OCEAN",
        help="sell it: create a data NFT and a datatoken on the chain, sold at this many OCEAN",
    )
    parser.add_argument(
        "--datatoken", metavar="ADDRESS", help="sell it through this existing datatoken"
    )
    parser.add_argument(
        "--exchange-id", metavar="ID", help="with --datatoken: the fixed-rate exchange selling it"
    )
    parser.add_argument(
        "--service-index",
        type=int,
        default=0,
        help="the service orders name (default 0)",
    )


def describe_pricing(pricing: pb.Pricing) -> str:
    price = f" at {tokens(pricing.price)} OCEAN" if pricing.price else ""
    return f"sold through datatoken {pricing.datatoken} (service {pricing.service_index}){price}"


# -- c2d compute order ---------------------------------------------------------------------


async def order(
    local: LocalChain, payer: LocalAccount, quote: pb.InitializeComputeResponse
) -> list[str]:
    """Orders every asset of `quote` that has no valid order yet, buying a datatoken first
    when the payer has none; returns the order transactions for `compute start --order`
    (the valid orders reused included)."""
    if quote.chain_id != local.chain_id:
        raise SystemExit(
            f"c2d: the provider sells on chain {quote.chain_id}, this chain is {local.chain_id}"
        )
    async with local.connect() as w3:
        return await _order(local, w3, payer, quote)


async def _order(
    local: LocalChain,
    w3: AsyncWeb3[Any],
    payer: LocalAccount,
    quote: pb.InitializeComputeResponse,
) -> list[str]:
    from mesh import ocean
    from provider.orders import fee_of

    fee = fee_of(quote.provider_fee)
    transactions: list[str] = []
    for item in quote.orders:
        if item.valid_order:
            print(f"{item.asset}: reusing order {item.valid_order}", file=sys.stderr)
            transactions.append(item.valid_order)
            continue
        pricing = item.pricing
        held = await ocean.balance(w3, pricing.datatoken, payer.address)
        if held < int(pricing.amount):
            if not pricing.exchange_id:
                raise SystemExit(
                    f"c2d: {item.asset} is not sold on an exchange and you hold no datatoken "
                    f"{pricing.datatoken}; ask its publisher for one"
                )
            print(
                f"{item.asset}: buying a datatoken for {tokens(pricing.price)} OCEAN ...",
                file=sys.stderr,
                flush=True,
            )
            await ocean.buy(w3, local.contracts, payer, pricing.exchange_id, int(pricing.amount))
        tx = await ocean.start_order(
            w3,
            payer,
            pricing.datatoken,
            consumer=payer.address,
            service_index=pricing.service_index,
            fee=fee,
        )
        print(f"{item.asset}: ordered in {tx}", file=sys.stderr)
        transactions.append(tx)
    return transactions
