"""`c2d demo --paid`: the paid flow on a local chain. The data owner sells a dataset through
an Ocean datatoken; the consumer is refused without an order, asks what to pay, buys a
datatoken, orders it with the provider fee of a priced environment, and runs two jobs on the
one order."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from c2d.provider.v1 import provider_pb2 as pb
from eth_account import Account
from google.protobuf import duration_pb2

from cli.chain import DEFAULT_CHAIN_ID, LocalChain, launch, order, tokens
from cli.demo import algorithm_code, finish, make_dataset, step
from cli.supervisor import Mesh
from mesh.errors import from_rpc_error
from sdk.client import Client
from sdk.keys import Key

if TYPE_CHECKING:
    from web3 import AsyncWeb3

    from mesh.ganache import Ganache

PRICE = 2 * 10**18
# The priced environment's provider fee: 0.01 OCEAN a minute.
FEE_PER_MINUTE = 10**16


async def start_chain(home: Path, funded: list[str]) -> tuple[Ganache, LocalChain]:
    """A ganache node on a free loopback port with Ocean's contracts, `funded` given ETH and
    OCEAN, and the environments file of the demo's node (a free and a priced environment)."""
    # Port 0: ganache picks a free one, trying again should another process take it first.
    node, local = await launch(
        home / "chain", port=0, chain_id=DEFAULT_CHAIN_ID, funded=funded, keep_state=False
    )
    (home / "environments.json").write_text(
        json.dumps(
            [
                {"name": "default"},
                {
                    "name": "paid",
                    "fee_token": local.contracts.ocean,
                    "fee_per_minute": FEE_PER_MINUTE,
                },
            ]
        )
    )
    print(f"chain {local.url} (id {local.chain_id}); OCEAN at {local.contracts.ocean}")
    return node, local


async def paid_scenario(
    mesh: Mesh, home: Path, owner: Key, consumer: Key, local: LocalChain
) -> int:
    async with local.connect() as w3:
        return await _sell_and_buy(mesh, home, owner, consumer, local, w3)


async def _sell_and_buy(
    mesh: Mesh, home: Path, owner: Key, consumer: Key, local: LocalChain, w3: AsyncWeb3[Any]
) -> int:
    from mesh import ocean

    data_file = home / "data" / "patients.csv"
    make_dataset(data_file)
    code = algorithm_code()
    owner_account = Account.from_key(owner.private_key)
    consumer_account = Account.from_key(consumer.private_key)

    async with Client(mesh.provider, owner) as as_owner:
        step(f"data owner {owner.address} sells a dataset for {tokens(PRICE)} OCEAN")
        algorithm = await as_owner.publish_algorithm(
            code, "python3 $ALGO", metadata=pb.AssetMetadata(title="column statistics")
        )
        made = await ocean.create_datatoken(
            w3, local.contracts, owner_account, name="patients", symbol="PAT", price=PRICE
        )
        print(f"data NFT {made.nft}, datatoken {made.datatoken}, exchange {made.exchange_id}")
        dataset = await as_owner.publish_dataset(
            [data_file],
            metadata=pb.AssetMetadata(title="patients (random, generated now)"),
            policy=pb.ComputePolicy(
                publisher_trusted_algorithms=[await as_owner.trust(algorithm.did)],
                # One order grants an hour of compute access.
                timeout=duration_pb2.Duration(seconds=3600),
            ),
            pricing=pb.Pricing(datatoken=made.datatoken, exchange_id=made.exchange_id),
        )
        print(f"dataset {dataset.did}, sold through {dataset.pricing.datatoken}")

    async with Client(mesh.provider, consumer) as as_consumer:
        step(f"consumer {consumer.address} tries to start a job without paying")
        try:
            await as_consumer.start_compute(
                [dataset.did], algorithm=algorithm.did, environment="paid"
            )
            print("c2d demo: a paid dataset ran without an order", file=sys.stderr)
            return 1
        except grpc.aio.AioRpcError as error:
            reason = from_rpc_error(error, service="provider").reason
            print(f"refused as it should be: {error.code().name} {reason}")

        step("consumer asks what the job costs (InitializeCompute), then orders on the chain")
        quote = await as_consumer.initialize_compute(
            [dataset.did], algorithm=algorithm.did, environment="paid", valid_for_s=600
        )
        fee = quote.provider_fee
        print(
            f"to pay: 1 datatoken of {quote.orders[0].pricing.datatoken} "
            f"({tokens(quote.orders[0].pricing.price)} OCEAN) and a provider fee of "
            f"{tokens(fee.provider_fee_amount)} OCEAN for 10 minutes of environment 'paid'"
        )
        before = await ocean.balance(w3, local.contracts.ocean, consumer.address)
        provider_before = await ocean.balance(w3, local.contracts.ocean, fee.provider_fee_address)
        transactions = await order(local, consumer_account, quote)
        spent = before - await ocean.balance(w3, local.contracts.ocean, consumer.address)
        earned = (
            await ocean.balance(w3, local.contracts.ocean, fee.provider_fee_address)
            - provider_before
        )
        print(
            f"order {transactions[0]}: the consumer spent {tokens(spent)} OCEAN; the provider "
            f"earned {tokens(earned)} OCEAN; the owner holds "
            f"{tokens(await ocean.balance(w3, made.datatoken, owner.address))} datatoken"
        )

        step("consumer starts the job with the order; the provider verifies it on the chain")
        job = await as_consumer.start_compute(
            [dataset.did], algorithm=algorithm.did, environment="paid", orders=transactions
        )
        if await finish(as_consumer, job.name, home, data_file):
            return 1

        step("a second job on the same order, while it is valid: no new payment")
        again = await as_consumer.start_compute(
            [dataset.did], algorithm=algorithm.did, environment="paid", orders=transactions
        )
        return await finish(as_consumer, again.name, home, data_file)
