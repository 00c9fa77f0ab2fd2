"""`python -m bench.paid`: what verifying a paid job's orders costs the Provider, measured
against a free job's verification and a bare chain round trip in the same run.

A real chain with Ocean's own contracts (a ganache node on 127.0.0.1, or the in-process py-evm
chain), one datatoken sold at a fixed rate, and the Provider's order verification
(provider.orders.Payments) on its own sqlite database, in a priced environment so that the
provider fee's signature is checked too. Each round orders a datatoken (startOrder with a fee
the Provider signed; outside the timed part), then times:
- Payments.verify on the fresh order (its first use: receipt, head and block from the chain);
- Payments.verify for a further job on the same order (read from the Provider's database);
- the baselines: Payments.verify for a free job, and one eth_blockNumber round trip, raw
  JSON-RPC through the node's HTTP connection and through web3's method layer;
- for where the time goes: each chain call of a first use, decoding the receipt's events, and
  recovering the provider fee's signer.

With --start-compute (root, bubblewrap and cgroups, as the engine needs; ganache only), a
whole node on the same chain too: the StartCompute call on a paid dataset with a fresh order,
again on the same order, and on a free dataset, each job followed to its end before the next."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from c2d.common.v1 import job_pb2
from c2d.provider.v1 import provider_pb2 as pb
from eth_account import Account
from eth_account.signers.local import LocalAccount
from google.protobuf import duration_pb2
from web3 import AsyncWeb3
from web3.types import RPCEndpoint, Wei

from bench.baseline import percentile
from mesh import chain, ganache, ocean, sqlite
from provider.orders import ChainAccess, PaidAsset, Payments, fee_of
from sdk.keys import Key

ETHER = 10**18
OCEAN = 10**18
PRICE = 2 * OCEAN
# The priced environment's fee: 0.001 OCEAN per started minute of the fee's validity.
FEE_PER_MINUTE = OCEAN // 1000
FEE_VALID_FOR_S = 600
ASSET = "datasets/bench-paid"
TRIVIAL = "open('/data/outputs/out.txt', 'w').write('ok')\n"
# Beside the default engine's (1_600_000_000), the overhead bench's (1_600_300_000) and the
# job bench's (1_600_500_000).
BENCH_UID_BASE = 1_600_700_000
MS = 1000.0


@dataclass
class Samples:
    """Seconds per call, one list per figure."""

    first: list[float] = field(default_factory=list)
    cached: list[float] = field(default_factory=list)
    free: list[float] = field(default_factory=list)
    raw_rtt: list[float] = field(default_factory=list)
    web3_rtt: list[float] = field(default_factory=list)
    receipt: list[float] = field(default_factory=list)
    block: list[float] = field(default_factory=list)
    decode: list[float] = field(default_factory=list)
    signer: list[float] = field(default_factory=list)
    # Outside the timed part: what one order costs the consumer (startOrder, mined).
    order: list[float] = field(default_factory=list)


@dataclass
class StartSamples:
    """Seconds per StartCompute call."""

    paid_first: list[float] = field(default_factory=list)
    paid_cached: list[float] = field(default_factory=list)
    free: list[float] = field(default_factory=list)


async def timed(awaitable: Awaitable[Any], into: list[float]) -> Any:
    started = time.perf_counter()
    result = await awaitable
    into.append(time.perf_counter() - started)
    return result


def timed_sync(into: list[float], call: Callable[..., Any], *args: Any) -> Any:
    started = time.perf_counter()
    result = call(*args)
    into.append(time.perf_counter() - started)
    return result


@dataclass
class OceanChain:
    """The chain under test, with Ocean's contracts and a deployer rich in ETH and OCEAN."""

    w3: AsyncWeb3[Any]
    deployer: LocalAccount
    contracts: ocean.Contracts
    mine: Callable[[int], Awaitable[None]]
    url: str = ""  # "" for the in-process chain

    async def fund(self, address: str, *, ocean_wei: int) -> None:
        """Gives `address` ETH for gas and `ocean_wei` OCEAN, from the deployer."""
        await ocean.fund(
            self.w3, self.contracts, self.deployer, address, ether=10 * ETHER, ocean=ocean_wei
        )

    async def account(self, *, ocean_wei: int) -> LocalAccount:
        account: LocalAccount = Account.create()
        await self.fund(account.address, ocean_wei=ocean_wei)
        return account

    async def sell(self, owner: LocalAccount, symbol: str) -> ocean.Datatoken:
        return await ocean.create_datatoken(
            self.w3, self.contracts, owner, name=f"bench {symbol}", symbol=symbol, price=PRICE
        )

    async def buy(self, buyer: LocalAccount, datatoken: ocean.Datatoken, count: int) -> None:
        """`count` datatokens for `buyer` in one purchase, with unlimited allowances of OCEAN
        to the exchange and to the datatoken (for provider fees), so that each order after
        is a single transaction."""
        for spender in (self.contracts.fixed_rate, datatoken.datatoken):
            await ocean.send(
                self.w3,
                buyer,
                ocean.contract(self.w3, "ERC20Template", self.contracts.ocean).functions.approve(
                    spender, ocean.MAX_UINT256
                ),
                what="approving OCEAN",
            )
        await ocean.buy(
            self.w3, self.contracts, buyer, datatoken.exchange_id, count * ocean.ONE_TOKEN
        )


async def run(args: argparse.Namespace) -> int:
    home = Path(tempfile.mkdtemp(prefix="c2d-bench-paid-"))
    deployer: LocalAccount = Account.create()
    node: ganache.Ganache | None = None
    try:
        mine: Callable[[int], Awaitable[None]]
        if args.chain == "ganache":
            node = await ganache.start(accounts=[(bytes(deployer.key), 10**6 * ETHER)])
            w3 = chain.connect(node.url, 10.0)

            async def mine(blocks: int) -> None:
                await ganache.mine(w3, blocks)

        else:
            w3, tester = chain.in_process()
            # eth-tester's own accounts are unlocked and rich: one of them funds the deployer.
            rich = (await w3.eth.accounts)[0]
            await w3.eth.send_transaction(
                {"from": rich, "to": deployer.address, "value": Wei(10**5 * ETHER)}
            )

            async def mine(blocks: int) -> None:
                tester.mine_blocks(blocks)

        try:
            setup_started = time.perf_counter()
            contracts = await ocean.deploy(w3, deployer)
            ocean_chain = OceanChain(
                w3, deployer, contracts, mine, url=node.url if node is not None else ""
            )
            setup_s = time.perf_counter() - setup_started
            samples = await measure_payments(args, ocean_chain, home)
            if samples is None:
                return 1
            report(args, samples, setup_s)
            starts: StartSamples | None = None
            if args.start_compute:
                starts = await measure_start_compute(args, ocean_chain, home)
                if starts is None:
                    return 1
                report_start_compute(args, starts)
            figures = summary(args, samples, starts)
            print(json.dumps(figures, separators=(",", ":")))
            if args.json:
                Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
            return 0
        finally:
            await chain.disconnect(w3)
    finally:
        if node is not None:
            await node.stop()
        shutil.rmtree(home, ignore_errors=True)


async def measure_payments(args: argparse.Namespace, c: OceanChain, home: Path) -> Samples | None:
    rounds = args.jobs + 1  # one warm-up round
    publisher = await c.account(ocean_wei=0)
    consumer = await c.account(ocean_wei=rounds * (PRICE + OCEAN))
    priced = await c.sell(publisher, "BNCH")
    await c.buy(consumer, priced, rounds)

    provider_key = Key.load_or_create(home / "provider" / "key.json")
    db = sqlite.connect(home / "provider" / "provider.db", "")
    try:
        access = ChainAccess(
            w3=c.w3,
            chain_id=c.contracts.chain_id,
            confirmations=args.confirmations,
            contracts=c.contracts,
        )
        payments = Payments(db, access, provider_key)
        # As publication does: the pricing read from the chain, the service bound to the asset.
        pricing = await payments.pricing(
            pb.Pricing(datatoken=priced.datatoken, exchange_id=priced.exchange_id),
            publisher.address,
        )
        assert pricing is not None
        payments.claim_service(ASSET, pricing)
        assets = [PaidAsset(ASSET, pricing, timeout_s=3600)]
        environment = job_pb2.Environment(
            name="priced",
            free=False,
            price=job_pb2.EnvironmentPrice(
                token=c.contracts.ocean, amount_per_minute=str(FEE_PER_MINUTE)
            ),
            max_duration=duration_pb2.Duration(seconds=FEE_VALID_FOR_S),
        )
        free_environment = job_pb2.Environment(name="default", free=True)

        samples = Samples()
        for round_ in range(rounds):
            # The warm-up round's figures go to a scratch set: first calls pay for imports and
            # caches (ABIs, event topics, the chain id check), which is not what is measured.
            into = samples if round_ > 0 else Samples()
            ordered = time.perf_counter()
            fee = payments.provider_fee(consumer.address, assets, environment, FEE_VALID_FOR_S)
            tx = await ocean.start_order(
                c.w3,
                consumer,
                priced.datatoken,
                consumer=consumer.address,
                service_index=pricing.service_index,
                fee=fee,
            )
            if args.confirmations > 1:
                await c.mine(args.confirmations - 1)
            into.order.append(time.perf_counter() - ordered)

            verify = payments.verify
            paid = await timed(verify(consumer.address, assets, environment, [tx]), into.first)
            again = await timed(verify(consumer.address, assets, environment, [tx]), into.cached)
            free = await timed(verify(consumer.address, [], free_environment, []), into.free)
            if paid != {ASSET: tx} or again != paid or free != {}:
                print(f"verification answered {paid}, {again}, {free}", file=sys.stderr)
                return None
            await timed(
                c.w3.provider.make_request(RPCEndpoint("eth_blockNumber"), []), into.raw_rtt
            )
            await timed(c.w3.eth.block_number, into.web3_rtt)

            # What a first use does beside its eth_blockNumber, one step at a time.
            receipt = await timed(
                c.w3.eth.get_transaction_receipt(tx),  # type: ignore[arg-type]
                into.receipt,
            )
            await timed(c.w3.eth.get_block(receipt["blockNumber"]), into.block)
            _, fees = timed_sync(into.decode, ocean.decode_order, receipt)
            timed_sync(into.signer, ocean.provider_fee_signer, fees[0].fee)
    finally:
        db.close()
    return samples


async def measure_start_compute(
    args: argparse.Namespace, c: OceanChain, home: Path
) -> StartSamples | None:
    """StartCompute through a whole node on the chain: engine, operator service, Provider."""
    from cli.chain import LocalChain
    from cli.supervisor import Mesh, Supervisor, free_address
    from sdk.client import Client

    rounds = args.jobs + 1
    root = home / "node"
    owner = Key.load_or_create(root / "owner.json")
    owner_account: LocalAccount = Account.from_key(owner.private_key)
    await c.fund(owner.address, ocean_wei=rounds * (PRICE + OCEAN))
    contracts_file = root / "contracts.json"
    c.contracts.save(contracts_file)
    # What `c2d up` gives a Provider on the chain `c2d chain up` runs.
    chain_env = LocalChain(c.url, c.contracts.chain_id, c.contracts, contracts_file).env()
    environments = root / "environments.json"
    environments.write_text(json.dumps([{"name": "default", "max_concurrent_jobs": 1}]))
    tag = uuid.uuid4().hex[:8]
    mesh = Mesh.defaults(root, owner.address, provider=free_address(), gateway=free_address())
    mesh.env.update(
        {
            "C2D_ENVIRONMENTS_FILE": str(environments),
            **chain_env,
            "C2D_CHAIN_CONFIRMATIONS": str(args.confirmations),
            # A uid range, cgroup and stage of its own, as `python -m bench` has.
            "C2D_SANDBOX_UID_BASE": str(BENCH_UID_BASE),
            "C2D_SANDBOX_CGROUP": f"c2d-bench-paid-{tag}",
            "C2D_SANDBOX_STAGE_ROOT": f"/run/c2d-bench-paid-{tag}",
            "C2D_LOG_LEVEL": "warning",
        }
    )
    data = root / "data" / "input.txt"
    data.parent.mkdir(parents=True)
    data.write_text("1\n")
    data.chmod(0o644)
    priced = await c.sell(owner_account, "BNCHJ")
    await c.buy(owner_account, priced, rounds)

    supervisor = Supervisor(mesh, log_dir=root / "logs")
    await supervisor.start()
    try:
        async with Client(mesh.provider, owner) as client:
            algorithm = await client.publish_algorithm(TRIVIAL.encode(), "python3 $ALGO")
            policy = pb.ComputePolicy(
                publisher_trusted_algorithms=[await client.trust(algorithm.did)],
                timeout=duration_pb2.Duration(seconds=3600),
            )
            paid = await client.publish_dataset(
                [data],
                policy=policy,
                pricing=pb.Pricing(datatoken=priced.datatoken, exchange_id=priced.exchange_id),
            )
            free = await client.publish_dataset([data], policy=policy)

            async def start(dataset: str, orders: list[str], into: list[float]) -> bool:
                started = time.perf_counter()
                job = await client.start_compute([dataset], algorithm=algorithm.did, orders=orders)
                into.append(time.perf_counter() - started)
                last = job
                async for last in client.watch_job(job.name):
                    if last.state == job_pb2.Job.STATE_SUCCEEDED:
                        return True
                print(
                    f"a benchmark job did not succeed: {job.name} "
                    f"{job_pb2.Job.State.Name(last.state)} {last.message}",
                    file=sys.stderr,
                )
                return False

            samples = StartSamples()
            for round_ in range(rounds):
                into = samples if round_ > 0 else StartSamples()
                quote = await client.initialize_compute([paid.did], algorithm=algorithm.did)
                tx = await ocean.start_order(
                    c.w3,
                    owner_account,
                    priced.datatoken,
                    consumer=owner.address,
                    service_index=quote.orders[0].pricing.service_index,
                    fee=fee_of(quote.provider_fee),
                )
                if args.confirmations > 1:
                    await c.mine(args.confirmations - 1)
                if not (
                    await start(paid.did, [tx], into.paid_first)
                    and await start(paid.did, [tx], into.paid_cached)
                    and await start(free.did, [], into.free)
                ):
                    return None
            return samples
    finally:
        await supervisor.stop()


def _row(label: str, values: list[float]) -> None:
    print(
        f"  {label:<36} p50 {statistics.median(values) * MS:8.3f} ms   "
        f"p90 {percentile(values, 90) * MS:8.3f} ms"
    )


def report(args: argparse.Namespace, s: Samples, setup_s: float) -> None:
    first, cached = statistics.median(s.first), statistics.median(s.cached)
    free, raw = statistics.median(s.free), statistics.median(s.raw_rtt)
    web3_rtt = statistics.median(s.web3_rtt)
    parts = [s.web3_rtt, s.receipt, s.block, s.decode, s.signer]
    print(
        f"\npaid-order verification, Payments.verify ({args.jobs} jobs, chain {args.chain}, "
        f"{args.confirmations} confirmation{'s' if args.confirmations > 1 else ''}; "
        f"deploy {setup_s:.1f} s, an order {statistics.median(s.order) * MS:.0f} ms)"
    )
    _row("first use of a fresh order", s.first)
    _row("further job, same order (cached)", s.cached)
    print(" baselines")
    _row("free job (no paid assets)", s.free)
    _row("eth_blockNumber, raw JSON-RPC", s.raw_rtt)
    _row("eth_blockNumber, through web3", s.web3_rtt)
    print(" a first use, step by step")
    _row("eth_getTransactionReceipt (web3)", s.receipt)
    _row("eth_getBlockByNumber (web3)", s.block)
    _row("decode the order's events", s.decode)
    _row("recover the provider fee's signer", s.signer)
    print(
        f"  these and eth_blockNumber add up to {sum(map(statistics.median, parts)) * MS:.3f} "
        f"ms of the first use's {first * MS:.3f} ms"
    )
    print(" ratios (p50)")
    print(f"  first use / raw eth_blockNumber      {first / raw:8.1f} x")
    print(f"  first use / web3 eth_blockNumber     {first / web3_rtt:8.1f} x")
    print(f"  cached / free verify                 {cached / free:8.1f} x")
    print(f"  cached / raw eth_blockNumber         {cached / raw:8.2f} x")


def report_start_compute(args: argparse.Namespace, s: StartSamples) -> None:
    free = statistics.median(s.free)
    print(f"\nStartCompute call on a whole node ({args.jobs} jobs each, free environment)")
    _row("free dataset", s.free)
    _row("paid dataset, fresh order", s.paid_first)
    _row("paid dataset, same order again", s.paid_cached)
    print(" ratios (p50)")
    print(f"  paid, fresh order / free dataset     {statistics.median(s.paid_first) / free:8.2f} x")
    print(
        f"  paid, same order / free dataset      {statistics.median(s.paid_cached) / free:8.2f} x"
    )


def summary(args: argparse.Namespace, s: Samples, starts: StartSamples | None) -> dict[str, Any]:
    def ms(values: list[float], p: float = 50) -> float:
        return round((statistics.median(values) if p == 50 else percentile(values, p)) * MS, 4)

    figures: dict[str, Any] = {
        "bench": "paid",
        "chain": args.chain,
        "jobs": args.jobs,
        "confirmations": args.confirmations,
        "verify_first_p50_ms": ms(s.first),
        "verify_first_p90_ms": ms(s.first, 90),
        "verify_cached_p50_ms": ms(s.cached),
        "verify_cached_p90_ms": ms(s.cached, 90),
        "verify_free_p50_ms": ms(s.free),
        "rpc_raw_p50_ms": ms(s.raw_rtt),
        "rpc_web3_p50_ms": ms(s.web3_rtt),
        "first_over_raw_rpc": round(statistics.median(s.first) / statistics.median(s.raw_rtt), 2),
        "cached_over_free": round(statistics.median(s.cached) / statistics.median(s.free), 1),
    }
    if starts is not None:
        figures |= {
            "start_free_p50_ms": ms(starts.free),
            "start_paid_first_p50_ms": ms(starts.paid_first),
            "start_paid_cached_p50_ms": ms(starts.paid_cached),
        }
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.paid",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--jobs", type=int, default=30, help="orders verified (default 30)")
    parser.add_argument(
        "--chain",
        choices=("ganache", "tester"),
        default="ganache",
        help="a ganache node on 127.0.0.1 (default) or the in-process py-evm chain",
    )
    parser.add_argument(
        "--confirmations",
        type=int,
        default=1,
        help="the confirmations the Provider asks for (default 1, the node's default); the "
        "blocks on top are mined before the timed part",
    )
    parser.add_argument(
        "--start-compute",
        action="store_true",
        help="also time StartCompute on a whole node (root; ganache only)",
    )
    parser.add_argument("--json", help="also write the summary to this file")
    args = parser.parse_args()
    if args.jobs < 1 or args.confirmations < 1:
        parser.error("--jobs and --confirmations must be at least 1")
    if args.start_compute and args.chain != "ganache":
        parser.error("--start-compute needs --chain ganache: the node's services reach it by URL")
    if args.start_compute and os.geteuid() != 0:
        sys.exit("--start-compute runs the local sandbox, which needs root")
    if args.chain == "ganache" and ganache.find_ganache() is None:
        sys.exit("ganache is not installed: run `npm install` (or use --chain tester)")
    # This process's own logs (deploys, orders, confirmations) are not wanted here.
    structlog.configure(
        processors=[structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(40),
    )
    sys.exit(asyncio.run(_main(args)))


async def _main(args: argparse.Namespace) -> int:
    # SIGTERM unwinds as ^C does, so the ganache node and the services are stopped on the way.
    task = asyncio.current_task()
    assert task is not None
    terminated = asyncio.Event()

    def terminate() -> None:
        terminated.set()
        task.cancel()

    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, terminate)
    try:
        return await run(args)
    except asyncio.CancelledError:
        if terminated.is_set():
            return 128 + signal.SIGTERM
        raise


if __name__ == "__main__":
    main()
