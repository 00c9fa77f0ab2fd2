"""Paid compute through the Provider's API, with real jobs, on real chains running Ocean's own
contracts: the consumer asks what to pay (InitializeCompute), buys a datatoken, orders it with
the provider fee, and starts jobs on the order. Every order that does not pay for the job is
refused with its own reason before any job starts, and a chain that is down, slow or
reorganised never starts one either.

Most cases run on the in-process py-evm chain; the happy path, expiry and reorganisations also
on a ganache node on 127.0.0.1 (expiry there only: py-evm gives each block its own second, so
its blocks run ahead of the clock that expiry is measured with)."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from c2d.common.v1 import job_pb2
from c2d.provider.v1 import provider_pb2 as pb
from google.protobuf import json_format

from mesh import chain, ganache, ocean
from provider.orders import fee_of
from sdk.client import Client
from tests.chain.deployment import (
    PRICE,
    Deployment,
    closed_port,
    deploy_ganache,
    deploy_tester,
    ganache_rewound,
    needs_ganache,
    rewound,
)
from tests.conftest import needs_root, rest_edge
from tests.e2e.test_job import error_info, run_to_end
from tests.provider.paid_mesh import FEE_PER_MINUTE, PAID_MAX_DURATION_S, PaidMesh, open_mesh

pytestmark = needs_root

# The "small" job: prints a line and writes one output.
SMALL = b"print('small job', flush=True)\nopen('/data/outputs/out.txt', 'w').write('ok')\n"
F = grpc.StatusCode.FAILED_PRECONDITION


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tester_deployment() -> Deployment:
    return deploy_tester()


@pytest.fixture(scope="module")
def ganache_deployment() -> Iterator[Deployment]:
    with deploy_ganache() as deployment:
        yield deployment


@pytest.fixture
async def tester_mesh(tester_deployment: Deployment, tmp_path: Path) -> AsyncIterator[PaidMesh]:
    """The node on the in-process chain, rewound to just after the deployment at the end."""
    assert tester_deployment.w3 is not None
    with rewound(tester_deployment):
        async with open_mesh(tmp_path, tester_deployment, tester_deployment.w3) as mesh:
            yield mesh


@pytest.fixture
async def ganache_mesh(ganache_deployment: Deployment, tmp_path: Path) -> AsyncIterator[PaidMesh]:
    """The node on ganache, rewound (evm_revert) to just after the deployment at the end."""
    async with (
        ganache_rewound(ganache_deployment) as w3,
        open_mesh(tmp_path, ganache_deployment, w3) as mesh,
    ):
        yield mesh


@pytest.fixture(params=["tester", pytest.param("ganache", marks=needs_ganache)])
def any_mesh(request: pytest.FixtureRequest) -> PaidMesh:
    """Each test that takes it runs on both chains."""
    mesh: PaidMesh = request.getfixturevalue(f"{request.param}_mesh")
    return mesh


# -- helpers ---------------------------------------------------------------------------------


async def publish_algorithms(owner: Client, count: int = 1) -> list[pb.Algorithm]:
    return [
        await owner.publish_algorithm(SMALL + f"# {i}\n".encode(), "python3 $ALGO")
        for i in range(count)
    ]


async def succeeds(client: Client, job: job_pb2.Job) -> None:
    _, final = await run_to_end(client, job)
    assert final.state == job_pb2.Job.STATE_SUCCEEDED, final.message
    assert any(r.name == "out.txt" for r in final.results)


async def refused(
    client: Client,
    call: Awaitable[Any],
    code: grpc.StatusCode,
    reason: str,
    field: str | None = None,
) -> grpc.aio.AioRpcError:
    """The error `call` fails with, after checking its status, reason and field, and that
    the caller's jobs are the same after it as before."""
    before = [j.name for j in await client.list_jobs()]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    error = caught.value
    info = error_info(error)
    assert (error.code(), info.reason) == (code, reason), error.details()
    if field is not None:
        assert info.metadata.get("field") == field, error.details()
    assert [j.name for j in await client.list_jobs()] == before, "a refused call started a job"
    return error


async def paid_setup(
    mesh: PaidMesh, *, algorithms: int = 1, timeout_s: int = 0
) -> tuple[Client, list[pb.Algorithm], pb.Dataset]:
    """The owner's client, its algorithms, and a dataset trusting them sold through the
    deployment's priced datatoken (service 0)."""
    owner = await mesh.client(mesh.owner)
    trusted = await publish_algorithms(owner, algorithms)
    dataset = await mesh.publish(
        owner, trusted, datatoken=mesh.deployment.priced, timeout_s=timeout_s
    )
    return owner, trusted, dataset


async def quoted_fee(
    client: Client, dataset: pb.Dataset, algorithm: pb.Algorithm
) -> ocean.ProviderFee:
    """The provider fee InitializeCompute quotes for `algorithm` on `dataset` in the default
    environment (free: a signed fee of nothing)."""
    quote = await client.initialize_compute([dataset.did], algorithm=algorithm.did)
    return fee_of(quote.provider_fee)


# -- the paid flow ---------------------------------------------------------------------------


async def test_an_order_pays_for_jobs_while_it_is_valid(any_mesh: PaidMesh) -> None:
    mesh = any_mesh
    _, (first, second), dataset = await paid_setup(mesh, algorithms=2)
    assert dataset.pricing.datatoken == mesh.deployment.priced.datatoken
    assert dataset.pricing.chain_id == mesh.chain_id
    consumer, client = await mesh.consumer()

    quote = await client.initialize_compute([dataset.did], algorithm=first.did, environment="paid")
    assert [(q.asset, q.valid_order) for q in quote.orders] == [(dataset.name, "")]
    fee = fee_of(quote.provider_fee)
    assert fee.amount == FEE_PER_MINUTE * math.ceil(PAID_MAX_DURATION_S / 60)
    tx = await mesh.order(consumer, mesh.deployment.priced, fee)
    provider = (await client.get_provider_info()).address
    assert await ocean.balance(mesh.w3, mesh.contracts.ocean, provider) == fee.amount

    job = await client.start_compute(
        [dataset.did], algorithm=first.did, environment="paid", orders=[tx]
    )
    await succeeds(client, job)

    # Within its validity the order starts more jobs: the same algorithm, another trusted one.
    for algorithm in (first, second):
        again = await client.start_compute(
            [dataset.did], algorithm=algorithm.did, environment="paid", orders=[tx]
        )
        await succeeds(client, again)
    assert len(await client.list_jobs()) == 3

    # What to pay now: nothing new, the order is still valid.
    quote = await client.initialize_compute([dataset.did], algorithm=second.did, environment="paid")
    assert [q.valid_order for q in quote.orders] == [tx]
    # Nobody else may use it.
    _, stranger = await mesh.consumer()
    quote = await stranger.initialize_compute([dataset.did], algorithm=first.did)
    assert [q.valid_order for q in quote.orders] == [""]


async def test_free_jobs_need_no_chain(tester_mesh: PaidMesh) -> None:
    mesh = tester_mesh
    await mesh.start(None)
    owner = await mesh.client(mesh.owner)
    (algorithm,) = await publish_algorithms(owner)
    dataset = await mesh.publish(owner, [algorithm])
    _, client = await mesh.consumer()

    quote = await client.initialize_compute([dataset.did], algorithm=algorithm.did)
    assert quote == pb.InitializeComputeResponse()
    await succeeds(client, await client.start_compute([dataset.did], algorithm=algorithm.did))
    # A priced environment's fee rides on the orders: a job with none cannot pay it.
    for call in (
        client.initialize_compute([dataset.did], algorithm=algorithm.did, environment="paid"),
        client.start_compute([dataset.did], algorithm=algorithm.did, environment="paid"),
    ):
        await refused(client, call, F, "PROVIDER_FEE_MISSING", "environment")

    await refused(
        client,
        client.start_compute([dataset.did], algorithm=algorithm.did, orders=["0x" + "ab" * 32]),
        F,
        "ORDER_WRONG_DATATOKEN",
        "orders[0]",
    )
    # Nothing is sold on a node without a chain.
    listed = await owner.stub.ListDatasets(pb.ListDatasetsRequest())
    error = await refused(
        client,
        mesh.publish(owner, [algorithm], datatoken=mesh.deployment.priced),
        F,
        "CHAIN_NOT_CONFIGURED",
    )
    assert "C2D_CHAIN_URL" in (error.details() or "")
    assert await owner.stub.ListDatasets(pb.ListDatasetsRequest()) == listed


async def test_a_paid_dataset_needs_an_order(tester_mesh: PaidMesh) -> None:
    mesh = tester_mesh
    owner, (algorithm,), dataset = await paid_setup(mesh)
    _, client = await mesh.consumer()
    error = await refused(
        client,
        client.start_compute([dataset.did], algorithm=algorithm.did),
        F,
        "ORDER_REQUIRED",
        "orders",
    )
    assert dataset.name in (error.details() or "")
    # The refusal is in the audit log, with its reason.
    events = await owner.list_audit_events(action="compute.start")
    assert [(e.outcome, e.reason, e.resource) for e in events] == [
        (pb.AUDIT_OUTCOME_REFUSED, "ORDER_REQUIRED", dataset.name)
    ]

    # A node that no longer has its chain refuses paid jobs as such; one whose chain answers
    # as another chain trusts none of its orders.
    unknown = "0x" + "ab" * 32
    await mesh.start(None)
    client = await mesh.client(client.key)
    await refused(
        client,
        client.start_compute([dataset.did], algorithm=algorithm.did, orders=[unknown]),
        F,
        "CHAIN_NOT_CONFIGURED",
    )
    await mesh.start(mesh.chain_access(chain_id=mesh.chain_id + 1))
    client = await mesh.client(client.key)
    await refused(
        client,
        client.start_compute([dataset.did], algorithm=algorithm.did, orders=[unknown]),
        F,
        "CHAIN_MISMATCH",
    )


async def test_transactions_that_are_not_orders_are_refused(tester_mesh: PaidMesh) -> None:
    mesh = tester_mesh
    _, (algorithm,), dataset = await paid_setup(mesh)
    consumer, client = await mesh.consumer()

    def start(*orders: str) -> Awaitable[job_pb2.Job]:
        return client.start_compute([dataset.did], algorithm=algorithm.did, orders=orders)

    invalid = grpc.StatusCode.INVALID_ARGUMENT
    await refused(client, start("0x1234"), invalid, "INVALID_ARGUMENT", "orders[0]")
    await refused(client, start("ab" * 32), invalid, "INVALID_ARGUMENT", "orders[0]")
    tx = "0x" + "ab" * 32
    # The same transaction twice, whatever the case of its digits.
    await refused(client, start(tx, "0x" + tx[2:].upper()), invalid, "INVALID_ARGUMENT",
                  "orders[1]")  # fmt: skip
    await refused(client, start(tx), F, "ORDER_NOT_FOUND", "orders[0]")

    # A transaction mined as failed: an OCEAN transfer beyond the sender's balance, sent with
    # a fixed gas so that no estimate refuses it first.
    token = ocean.contract(mesh.w3, "OceanToken", mesh.contracts.ocean)
    fields = await token.functions.transfer(mesh.owner.address, 10**30).build_transaction(
        {
            "from": consumer.address,
            "chainId": mesh.chain_id,
            "gas": 100_000,
            "gasPrice": await mesh.w3.eth.gas_price,
            "nonce": await mesh.w3.eth.get_transaction_count(consumer.address),
        }
    )
    sent = await mesh.w3.eth.send_raw_transaction(consumer.sign_transaction(fields).raw_transaction)
    failed = await chain.wait_receipt(mesh.w3, sent, timeout_s=10)
    assert failed["status"] == 0
    await refused(client, start(failed["transactionHash"].to_0x_hex()), F, "ORDER_FAILED",
                  "orders[0]")  # fmt: skip

    # A plain ETH transfer: it succeeded, but orders nothing.
    paid = await ocean.send(
        mesh.w3, consumer, {"to": mesh.owner.address}, value=1, what="sending ETH"
    )
    await refused(client, start(paid["transactionHash"].to_0x_hex()), F, "ORDER_NOT_AN_ORDER",
                  "orders[0]")  # fmt: skip


async def test_orders_for_another_datatoken_or_service_are_refused(
    tester_mesh: PaidMesh,
) -> None:
    mesh = tester_mesh
    owner, (algorithm,), dataset = await paid_setup(mesh)
    consumer, client = await mesh.consumer()
    free_fee = await quoted_fee(client, dataset, algorithm)

    other = await mesh.datatoken("OTHER")
    on_other = await mesh.order(consumer, other, free_fee)
    await refused(
        client,
        client.start_compute([dataset.did], algorithm=algorithm.did, orders=[on_other]),
        F,
        "ORDER_WRONG_DATATOKEN",
        "orders[0]",
    )

    # One datatoken selling two datasets, as services 0 and 1: an order for one service does
    # not pay for the other.
    second = await mesh.publish(
        owner, [algorithm], datatoken=mesh.deployment.priced, service_index=1
    )
    assert second.pricing.service_index == 1
    for_first = await mesh.order(consumer, mesh.deployment.priced, free_fee)
    await succeeds(
        client,
        await client.start_compute([dataset.did], algorithm=algorithm.did, orders=[for_first]),
    )
    await refused(
        client,
        client.start_compute([second.did], algorithm=algorithm.did, orders=[for_first]),
        F,
        "ORDER_WRONG_SERVICE",
        "orders[0]",
    )
    # A third dataset cannot sell through a service that sells one already.
    taken = await refused(
        client,
        mesh.publish(owner, [algorithm], datatoken=mesh.deployment.priced, service_index=1),
        grpc.StatusCode.ALREADY_EXISTS,
        "DATATOKEN_IN_USE",
    )
    assert error_info(taken).metadata["field"] == "pricing.datatoken"


async def test_an_order_pays_for_one_asset_only(tester_mesh: PaidMesh) -> None:
    mesh = tester_mesh
    owner, (algorithm,), dataset = await paid_setup(mesh)
    consumer, client = await mesh.consumer()
    fee = await quoted_fee(client, dataset, algorithm)
    tx = await mesh.order(consumer, mesh.deployment.priced, fee)
    await succeeds(
        client, await client.start_compute([dataset.did], algorithm=algorithm.did, orders=[tx])
    )

    # The datatoken's service is freed from the first dataset (as retiring it would) and then
    # sells a second one: the order that paid for the first does not pay for it.
    mesh.release_service(dataset.pricing)
    successor = await mesh.publish(owner, [algorithm], datatoken=mesh.deployment.priced)
    assert (successor.pricing.datatoken, successor.pricing.service_index) == (
        dataset.pricing.datatoken,
        dataset.pricing.service_index,
    )
    error = await refused(
        client,
        client.start_compute([successor.did], algorithm=algorithm.did, orders=[tx]),
        F,
        "ORDER_REUSED",
        "orders[0]",
    )
    assert dataset.name in (error.details() or "")
    # A new order pays for it.
    fresh = await mesh.order(consumer, mesh.deployment.priced, fee)
    await succeeds(
        client,
        await client.start_compute([successor.did], algorithm=algorithm.did, orders=[fresh]),
    )


async def test_an_order_serves_its_payer_and_its_named_consumer_only(
    tester_mesh: PaidMesh,
) -> None:
    mesh = tester_mesh
    _, (algorithm,), dataset = await paid_setup(mesh)
    _, client = await mesh.consumer()
    fee = await quoted_fee(client, dataset, algorithm)
    third_party = await mesh.account()
    somebody = await mesh.account(ocean_wei=0)

    for_somebody = await mesh.order(third_party, mesh.deployment.priced, fee,
                                    consumer=somebody.address)  # fmt: skip
    error = await refused(
        client,
        client.start_compute([dataset.did], algorithm=algorithm.did, orders=[for_somebody]),
        F,
        "ORDER_WRONG_CONSUMER",
        "orders[0]",
    )
    assert third_party.address in (error.details() or "")

    # Paid by a third party for this consumer: accepted.
    for_client = await mesh.order(third_party, mesh.deployment.priced, fee,
                                  consumer=client.key.address)  # fmt: skip
    await succeeds(
        client,
        await client.start_compute([dataset.did], algorithm=algorithm.did, orders=[for_client]),
    )


@needs_ganache
async def test_an_expired_order_is_refused(ganache_mesh: PaidMesh) -> None:
    mesh = ganache_mesh
    timeout_s = 2
    _, (algorithm,), dataset = await paid_setup(mesh, timeout_s=timeout_s)
    assert dataset.policy.timeout.seconds == timeout_s
    consumer, client = await mesh.consumer()
    fee = await quoted_fee(client, dataset, algorithm)
    tx = await mesh.order(consumer, mesh.deployment.priced, fee)
    job = await client.start_compute([dataset.did], algorithm=algorithm.did, orders=[tx])

    # The order's block time is when its access began.
    expires = await mesh.block_time(tx) + timeout_s
    await succeeds(client, job)
    await asyncio.sleep(max(0.0, expires - time.time()) + 0.1)
    await refused(
        client,
        client.start_compute([dataset.did], algorithm=algorithm.did, orders=[tx]),
        F,
        "ORDER_EXPIRED",
        "orders[0]",
    )
    quote = await client.initialize_compute([dataset.did], algorithm=algorithm.did)
    assert [q.valid_order for q in quote.orders] == [""]


# -- priced environments: the provider fee ----------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("signed by the consumer", "PROVIDER_FEE_WRONG_SIGNER"),
        ("for the free environment", "PROVIDER_FEE_WRONG_ENVIRONMENT"),
        ("expired", "PROVIDER_FEE_EXPIRED"),
        ("zero", "PROVIDER_FEE_MISSING"),
    ],
)
async def test_a_priced_environment_needs_its_provider_fee(
    tester_mesh: PaidMesh, kind: str, reason: str
) -> None:
    mesh = tester_mesh
    _, (algorithm,), dataset = await paid_setup(mesh)
    consumer, client = await mesh.consumer()
    if kind == "signed by the consumer":
        # startOrder takes any fee its signer pays itself: the chain cannot tell.
        fee = mesh.provider_fee(environment="paid", signer=bytes(consumer.key))
        assert fee.address == consumer.address
    elif kind == "for the free environment":
        fee = await quoted_fee(client, dataset, algorithm)
        assert fee.amount == 0 and fee.address == mesh.provider_key.address
    elif kind == "expired":
        fee = mesh.provider_fee(environment="paid", valid_for_s=-60)
    else:
        fee = mesh.provider_fee(environment="paid", amount=0)
    tx = await mesh.order(consumer, mesh.deployment.priced, fee)

    await refused(
        client,
        client.start_compute(
            [dataset.did], algorithm=algorithm.did, environment="paid", orders=[tx]
        ),
        F,
        reason,
        "orders",
    )
    # The order itself is good: the free environment runs on it.
    await succeeds(
        client, await client.start_compute([dataset.did], algorithm=algorithm.did, orders=[tx])
    )


# -- chains that do not answer, confirmations and reorganisations ----------------------------


async def test_a_chain_that_is_down_starts_nothing(tester_mesh: PaidMesh) -> None:
    mesh = tester_mesh
    owner, (algorithm,), dataset = await paid_setup(mesh)
    free = await mesh.publish(owner, [algorithm])
    consumer, client = await mesh.consumer()
    fee = await quoted_fee(client, dataset, algorithm)
    tx = await mesh.order(consumer, mesh.deployment.priced, fee)

    down = mesh.connect(f"http://127.0.0.1:{closed_port()}", 5.0)
    await mesh.start(mesh.chain_access(down, timeout_s=5.0))
    client = await mesh.client(client.key)
    owner = await mesh.client(owner.key)
    started = time.monotonic()
    error = await refused(
        client,
        client.start_compute([dataset.did], algorithm=algorithm.did, orders=[tx]),
        grpc.StatusCode.UNAVAILABLE,
        "CHAIN_UNAVAILABLE",
    )
    assert time.monotonic() - started < 2.0
    assert "did not answer" in (error.details() or "")
    await refused(
        client,
        mesh.publish(owner, [algorithm], datatoken=mesh.deployment.priced, service_index=2),
        grpc.StatusCode.UNAVAILABLE,
        "CHAIN_UNAVAILABLE",
    )
    # Free jobs do not ask the chain.
    await succeeds(client, await client.start_compute([free.did], algorithm=algorithm.did))


async def test_a_slow_chain_is_unavailable_within_the_timeout(
    tester_mesh: PaidMesh, silent_server: str
) -> None:
    mesh = tester_mesh
    _, (algorithm,), dataset = await paid_setup(mesh)
    consumer, client = await mesh.consumer()
    fee = await quoted_fee(client, dataset, algorithm)
    tx = await mesh.order(consumer, mesh.deployment.priced, fee)

    timeout_s = 0.5
    slow = mesh.connect(silent_server, 30.0)
    await mesh.start(mesh.chain_access(slow, timeout_s=timeout_s))
    client = await mesh.client(client.key)
    started = time.monotonic()
    error = await refused(
        client,
        client.start_compute([dataset.did], algorithm=algorithm.did, orders=[tx]),
        grpc.StatusCode.UNAVAILABLE,
        "CHAIN_UNAVAILABLE",
    )
    assert timeout_s <= time.monotonic() - started < timeout_s + 1.5
    assert "no answer within 0.5 s" in (error.details() or "")


async def test_an_order_waits_for_its_confirmations(tester_mesh: PaidMesh) -> None:
    mesh = tester_mesh
    _, (algorithm,), dataset = await paid_setup(mesh)
    consumer, client = await mesh.consumer()
    fee = await quoted_fee(client, dataset, algorithm)
    tx = await mesh.order(consumer, mesh.deployment.priced, fee)

    await mesh.start(mesh.chain_access(confirmations=3, confirmation_wait_s=0.3))
    client = await mesh.client(client.key)
    started = time.monotonic()
    error = await refused(
        client,
        client.start_compute([dataset.did], algorithm=algorithm.did, orders=[tx]),
        F,
        "ORDER_NOT_CONFIRMED",
        "orders[0]",
    )
    assert 0.3 <= time.monotonic() - started < 2.0
    assert "1 of the 3 confirmations" in (error.details() or "")

    # Waiting longer, while two more blocks come.
    await mesh.start(mesh.chain_access(confirmations=3, confirmation_wait_s=10.0))
    client = await mesh.client(client.key)
    # The client's read token first: signed calls wait for one another.
    assert await client.list_jobs() == []
    starting = asyncio.ensure_future(
        client.start_compute([dataset.did], algorithm=algorithm.did, orders=[tx])
    )
    await asyncio.sleep(0.5)
    assert not starting.done()
    assert await client.list_jobs() == []
    await mesh.mine(2)
    await succeeds(client, await asyncio.wait_for(starting, 5.0))


@needs_ganache
async def test_a_reorganisation_while_the_provider_waits_starts_nothing(
    ganache_mesh: PaidMesh,
) -> None:
    mesh = ganache_mesh
    _, (algorithm,), dataset = await paid_setup(mesh)
    consumer, client = await mesh.consumer()
    fee = await quoted_fee(client, dataset, algorithm)
    await ocean.buy(mesh.w3, mesh.contracts, consumer, mesh.deployment.priced.exchange_id)
    before_order = await ganache.snapshot(mesh.w3)
    tx = await ocean.start_order(mesh.w3, consumer, mesh.deployment.priced.datatoken,
                                 consumer=consumer.address, service_index=0, fee=fee)  # fmt: skip

    await mesh.start(mesh.chain_access(confirmations=3, confirmation_wait_s=10.0))
    client = await mesh.client(client.key)
    # The client's read token first: signed calls wait for one another.
    assert await client.list_jobs() == []
    starting = asyncio.ensure_future(
        client.start_compute([dataset.did], algorithm=algorithm.did, orders=[tx])
    )
    await asyncio.sleep(0.6)
    assert not starting.done()
    # The chain drops the order's block while the Provider waits for blocks on top of it.
    assert await ganache.revert(mesh.w3, before_order)
    reverted = time.monotonic()
    await refused(client, starting, F, "ORDER_NOT_FOUND", "orders[0]")
    assert time.monotonic() - reverted < 2.0
    assert await client.list_jobs() == []


@needs_ganache
async def test_an_order_removed_by_a_reorganisation_starts_nothing(
    ganache_mesh: PaidMesh,
) -> None:
    mesh = ganache_mesh
    _, (algorithm,), dataset = await paid_setup(mesh)
    consumer, client = await mesh.consumer()
    fee = await quoted_fee(client, dataset, algorithm)
    before_order = await ganache.snapshot(mesh.w3)
    tx = await mesh.order(consumer, mesh.deployment.priced, fee)
    assert await ganache.revert(mesh.w3, before_order)
    # Blocks come again, up to and past the height the order had.
    await mesh.mine(3)

    await refused(
        client,
        client.start_compute([dataset.did], algorithm=algorithm.did, orders=[tx]),
        F,
        "ORDER_NOT_FOUND",
        "orders[0]",
    )


# -- priced algorithms, InitializeCompute, REST ----------------------------------------------


async def test_a_priced_algorithm_needs_its_own_order(tester_mesh: PaidMesh) -> None:
    mesh = tester_mesh
    owner = await mesh.client(mesh.owner)
    algorithm_token = await mesh.datatoken("ALGO")
    algorithm = await owner.publish_algorithm(
        SMALL,
        "python3 $ALGO",
        pricing=pb.Pricing(
            datatoken=algorithm_token.datatoken, exchange_id=algorithm_token.exchange_id
        ),
    )
    assert algorithm.pricing.datatoken == algorithm_token.datatoken
    dataset = await mesh.publish(owner, [algorithm], datatoken=mesh.deployment.priced)
    consumer, client = await mesh.consumer()

    quote = await client.initialize_compute([dataset.did], algorithm=algorithm.did)
    assert [(q.asset, q.pricing.datatoken) for q in quote.orders] == [
        (dataset.name, mesh.deployment.priced.datatoken),
        (algorithm.name, algorithm_token.datatoken),
    ]
    fee = fee_of(quote.provider_fee)
    for_dataset = await mesh.order(consumer, mesh.deployment.priced, fee)
    for_algorithm = await mesh.order(consumer, algorithm_token, fee)

    for given, unpaid in ((for_dataset, algorithm.name), (for_algorithm, dataset.name)):
        error = await refused(
            client,
            client.start_compute([dataset.did], algorithm=algorithm.did, orders=[given]),
            F,
            "ORDER_REQUIRED",
            "orders",
        )
        assert unpaid in (error.details() or "")
    job = await client.start_compute(
        [dataset.did], algorithm=algorithm.did, orders=[for_algorithm, for_dataset]
    )
    await succeeds(client, job)


async def test_initialize_compute_quotes_and_refuses_as_start_does(
    tester_mesh: PaidMesh,
) -> None:
    mesh = tester_mesh
    owner, (algorithm,), dataset = await paid_setup(mesh)
    (untrusted,) = await publish_algorithms(owner)
    _, client = await mesh.consumer()

    for call in (
        client.initialize_compute([dataset.did], algorithm=untrusted.did, environment="paid"),
        client.start_compute([dataset.did], algorithm=untrusted.did, environment="paid"),
    ):
        await refused(client, call, grpc.StatusCode.PERMISSION_DENIED, "ALGORITHM_NOT_TRUSTED")

    asked = time.time()
    quote = await client.initialize_compute(
        [dataset.did], algorithm=algorithm.did, environment="paid", valid_for_s=150
    )
    assert quote.chain_id == mesh.chain_id
    (order,) = quote.orders
    assert order.asset == dataset.name and order.valid_order == ""
    priced = mesh.deployment.priced
    assert (order.pricing.datatoken, order.pricing.nft, order.pricing.service_index) == (
        priced.datatoken,
        priced.nft,
        0,
    )
    assert (order.pricing.amount, order.pricing.exchange_id) == (str(10**18), priced.exchange_id)
    assert (order.pricing.base_token, order.pricing.price) == (mesh.contracts.ocean, str(PRICE))

    fee = fee_of(quote.provider_fee)
    provider = (await client.get_provider_info()).address
    assert ocean.provider_fee_signer(fee) == fee.address == provider
    assert (fee.token, fee.amount) == (mesh.contracts.ocean, 3 * FEE_PER_MINUTE)
    assert int(asked) + 150 <= fee.valid_until <= time.time() + 151
    assert json.loads(fee.data)["environment"] == "paid"

    invalid = await refused(
        client,
        client.initialize_compute([dataset.did], algorithm=algorithm.did, valid_for_s=10**9),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        "valid_for",
    )
    assert "30 days" in (invalid.details() or "")


async def test_initialize_compute_over_rest(tester_mesh: PaidMesh) -> None:
    mesh = tester_mesh
    _, (algorithm,), dataset = await paid_setup(mesh)
    consumer, client = await mesh.consumer()
    async with rest_edge(mesh) as rest:
        http = rest.http
        response = await http.post(
            "/v1/jobs:initialize",
            json={"dataset": dataset.name, "algorithm": algorithm.name, "environment": "paid"},
            headers=dict(await client.token_metadata()),
        )
        unauthenticated = await http.post("/v1/jobs:initialize", json={"dataset": dataset.name})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["chainId"] == str(mesh.chain_id)
    assert [(o["asset"], o["pricing"]["datatoken"]) for o in body["orders"]] == [
        (dataset.name, mesh.deployment.priced.datatoken)
    ]
    assert unauthenticated.status_code == 401

    # The fee as REST gave it orders on the chain and starts the job.
    fee = fee_of(json_format.ParseDict(body["providerFee"], pb.ProviderFee()))
    assert fee.address == (await client.get_provider_info()).address
    tx = await mesh.order(consumer, mesh.deployment.priced, fee)
    job = await client.start_compute(
        [dataset.did], algorithm=algorithm.did, environment="paid", orders=[tx]
    )
    await succeeds(client, job)
