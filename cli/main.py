"""`c2d`: run a node, publish assets, and run compute jobs."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import grpc
from c2d.common.v1 import container_pb2, job_pb2
from c2d.provider.v1 import provider_pb2 as pb

from cli import chain as paid
from cli import delivery, owner, storage
from cli.certs import register as register_certs
from cli.common import client as _client
from cli.common import emit as _emit
from cli.common import key as _key
from cli.common import parse_parameters
from cli.follow import follow
from cli.output import (
    delivery_text,
    describe,
    kind_name,
    print_json,
    selection_text,
    state_name,
    to_dict,
)
from mesh import config as mesh_config
from mesh import containers
from mesh import jobs as job_facts
from mesh.logging import configure_logging

# -- node ----------------------------------------------------------------------------------


async def cmd_up(args: argparse.Namespace) -> int:
    from cli.supervisor import Mesh, Supervisor

    home = mesh_config.home()
    owner = _key(args)
    mesh = Mesh.defaults(home, owner.address)
    # The chain `c2d chain up` runs, unless the environment names one: paid assets sell there.
    local_chain = paid.current_chain()
    if local_chain is not None and "C2D_CHAIN_URL" not in os.environ:
        mesh.env.update(local_chain.env())
    try:
        if args.engine == "kubernetes":
            mesh.env.update(kubernetes_engine_env(args, home))
        mesh.env.update(await storage.storage_env(args))
    except ValueError as error:
        print(f"c2d up: {error}", file=sys.stderr)
        return 2
    supervisor = Supervisor(mesh)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await supervisor.start()
    except RuntimeError as error:
        print(f"c2d up: {error}", file=sys.stderr)
        return 1
    info = {
        "provider": mesh.provider,
        "gateway": f"http://{mesh.gateway}",
        "home": str(home),
        "owner": owner.address,
        "chain": local_chain.url if local_chain else "",
        "engine": args.engine,
        "storage": mesh.env.get("C2D_STORAGE", str(home / "results")),
    }
    _emit(
        args,
        info,
        (
            f"c2d node up (owner {owner.address})\n"
            f"  provider gRPC  {mesh.provider}\n"
            f"  REST edge      http://{mesh.gateway}  (OpenAPI at /openapi.json)\n"
            f"  state          {home}\n"
            f"  chain          {local_chain.url if local_chain else 'none: everything is free'}\n"
            f"  jobs run in    {_engine_place(args, mesh.env)}\n"
            f"  results in     {info['storage']}\n"
            "Ctrl-C stops everything."
        ),
    )
    sys.stdout.flush()
    stopped = asyncio.ensure_future(stop.wait())
    code = 0
    while not stop.is_set():
        exited = asyncio.ensure_future(supervisor.wait())
        await asyncio.wait({exited, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not exited.done():
            exited.cancel()
            break
        name = exited.result()
        # A crashed part comes back; the jobs it was handling carry on or end with a reason.
        print(f"c2d up: {name} exited unexpectedly; restarting it", file=sys.stderr)
        if not await supervisor.restart(name):
            print(f"c2d up: {name} does not stay up; stopping everything", file=sys.stderr)
            code = 1
            break
    stopped.cancel()
    await supervisor.stop()
    return code


def kubernetes_engine_env(args: argparse.Namespace, home: Path) -> dict[str, str]:
    """The engine's settings for running jobs in the cluster a kubeconfig names. Without
    volumes given, job pods reach this machine's data and results folders by hostPath: right
    for a one-node cluster on this machine (kind, with deploy/kind/cluster.yaml's mounts)."""
    kubeconfig = Path(
        args.kubeconfig or os.environ.get("KUBECONFIG", "") or Path.home() / ".kube" / "config"
    ).expanduser()
    if not kubeconfig.is_file():
        raise ValueError(
            f"--engine kubernetes needs a kubeconfig: {kubeconfig} does not exist "
            "(give --kubeconfig or set KUBECONFIG)"
        )
    data = mesh_config.data_root()
    results = Path(mesh_config.storage_url().removeprefix("file://"))
    for folder in (data, results):
        folder.mkdir(parents=True, exist_ok=True)

    def host_path(path: Path) -> str:
        return json.dumps({"hostPath": {"path": str(path), "type": "Directory"}})

    return {
        "C2D_ENGINE_BACKEND": "kubernetes",
        "C2D_K8S_KUBECONFIG": str(kubeconfig.absolute()),
        "C2D_K8S_NAMESPACE": args.namespace,
        "C2D_K8S_PODS_IMAGE": args.pods_image,
        "C2D_K8S_DATA_VOLUME": args.data_volume or host_path(data),
        "C2D_K8S_RESULTS_VOLUME": args.results_volume or host_path(results),
        "C2D_DATA_ROOT": str(data),
        "C2D_STORAGE": str(results),
    }


def _engine_place(args: argparse.Namespace, env: dict[str, str]) -> str:
    if args.engine == "kubernetes":
        return f"Kubernetes namespace {env['C2D_K8S_NAMESPACE']} ({env['C2D_K8S_KUBECONFIG']})"
    return "the local sandbox (bubblewrap)"


async def cmd_demo(args: argparse.Namespace) -> int:
    from cli.demo import run_demo

    return await run_demo(args)


# -- assets --------------------------------------------------------------------------------


async def _pricing(args: argparse.Namespace, title: str) -> pb.Pricing | None:
    with paid.chain_errors():
        return await paid.pricing_for(args, title)


async def cmd_algorithm_publish(args: argparse.Namespace) -> int:
    code = Path(args.file).read_bytes()
    async with _client(args) as client:
        title = args.title or args.file
        algorithm = await client.publish_algorithm(
            code,
            args.entrypoint,
            metadata=pb.AssetMetadata(title=title),
            access=pb.ALGORITHM_ACCESS_PUBLIC if args.public else pb.ALGORITHM_ACCESS_PRIVATE,
            parameters=owner.read_parameter_specs(args.parameters),
            pricing=await _pricing(args, title),
            container=args.image,
        )
    if algorithm.HasField("pricing") and not args.json:
        print(paid.describe_pricing(algorithm.pricing), file=sys.stderr)
    _emit(args, to_dict(algorithm), algorithm.did)
    return 0


async def cmd_dataset_show(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        dataset = await client.get_dataset(args.did)
    print_json(to_dict(dataset))
    return 0


async def cmd_environments(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        environments = await client.list_environments()
    if args.json:
        print_json([to_dict(e) for e in environments])
    else:
        for e in environments:
            print(
                f"{e.name}: {e.cpus:g} CPU, {e.memory_bytes >> 20} MiB memory, "
                f"{e.disk_bytes >> 20} MiB disk, {e.max_processes} processes, "
                f"{e.max_duration.seconds} s, {e.max_concurrent_jobs} at once, "
                f"network {'allowed' if e.network_allowed else 'off'}, "
                f"{_price(e)}; queue up to {e.max_queued_jobs} jobs "
                f"for {e.max_queue_wait.seconds} s; {_retention(e)}"
            )
    return 0


def _retention(environment: job_pb2.Environment) -> str:
    if not environment.HasField("result_retention"):
        return "results kept until the job is deleted"
    seconds = environment.result_retention.ToNanoseconds() / 1e9
    return f"results kept {seconds:g} s after the job ends"


def _results_expiry(job: job_pb2.Job) -> str:
    """When the job's results expire or expired; "" when they are kept until it is deleted."""
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(job.results_expire_time.seconds))
    if job.results_expired:
        return f"results expired at {when}: still listed, no longer downloadable"
    if job.HasField("results_expire_time"):
        return f"results expire at {when}"
    return ""


def _price(environment: job_pb2.Environment) -> str:
    if environment.free:
        return "free"
    price = environment.price
    return f"paid: {paid.tokens(price.amount_per_minute)} of token {price.token} a minute"


# -- compute -------------------------------------------------------------------------------


_SIZE = re.compile(r"([0-9]+)\s*([kmgt]i?b?)?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes from `512M`, `2GiB`, `1048576` (binary units)."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512M, 2G)")
    return int(match[1]) * _UNITS[(match[2] or "")[:1].lower()]


def _resources(args: argparse.Namespace) -> job_pb2.Resources | None:
    if not (args.cpus or args.memory or args.disk or args.max_duration):
        return None
    resources = job_pb2.Resources(
        cpus=args.cpus or 0, memory_bytes=args.memory or 0, disk_bytes=args.disk or 0
    )
    if args.max_duration:
        resources.max_duration.seconds = args.max_duration
    return resources


async def cmd_compute_order(args: argparse.Namespace) -> int:
    """Asks the Provider what the job costs, then makes the orders on the chain."""
    async with _client(args) as client:
        quote = await client.initialize_compute(
            args.datasets,
            algorithm=args.algorithm or "",
            environment=args.environment,
            valid_for_s=args.valid_for or 0,
        )
        if not quote.orders:
            _emit(args, {"orders": []}, "nothing to pay: the job is free")
            return 0
        if not args.json:
            fee = quote.provider_fee
            print(
                f"provider fee: {paid.tokens(fee.provider_fee_amount)} of token "
                f"{fee.provider_fee_token}, valid until "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(fee.valid_until))}",
                file=sys.stderr,
            )
        with paid.chain_errors():
            transactions = await paid.order(paid.require_chain(), paid.account(args), quote)
    flags = " ".join(f"--order {tx}" for tx in transactions)
    _emit(
        args,
        {"orders": transactions},
        "\n".join(transactions) + f"\nstart the job with: c2d compute start ... {flags}",
    )
    return 0


async def cmd_compute_start(args: argparse.Namespace) -> int:
    if bool(args.algorithm) == bool(args.raw):
        raise SystemExit("c2d: give exactly one of --algorithm DID or --raw FILE")
    # Read before connecting: a missing key or a bad URL file stops the command up front.
    deliver = delivery.from_args(args)
    async with _client(args) as client:
        job = await client.start_compute(
            args.dataset,
            algorithm=args.algorithm or "",
            raw_code=Path(args.raw).read_text() if args.raw else "",
            raw_entrypoint=args.entrypoint,
            parameters=parse_parameters(args.param),
            environment=args.environment,
            viewers=args.viewer,
            resources=_resources(args),
            require_network=args.require_network,
            orders=args.order,
            results=args.results or job_pb2.RESULT_SELECTION_UNSPECIFIED,
            delivery=deliver,
        )
        job_id = job.name.removeprefix("jobs/")
        if not args.follow:
            _emit(args, to_dict(job), job_id)
            return 0
        if not args.json:
            print(f"job {job_id}", file=sys.stderr)
        final = await follow(client, job.name, quiet_status=args.json)
    if args.json:
        print_json(to_dict(final))
    else:
        print(f"job {job_id}: {describe(final)}", file=sys.stderr)
        if shown := delivery_text(final):
            print(f"  {shown}", file=sys.stderr)
    return 0 if final.state == final.STATE_SUCCEEDED else 1


async def cmd_compute_status(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        job = await client.get_job(args.job)
    text = (
        f"{job.name.removeprefix('jobs/')}: {describe(job)} (status {job.status_code} "
        f"{job.status_text})"
    )
    text += f"\n  keeps {selection_text(job.result_selection)}"
    if shown := delivery_text(job):
        text += f"\n  {shown}"
    expiry = _results_expiry(job)
    if expiry:
        text += f"\n  {expiry}"
    for r in job.results:
        text += f"\n  result {r.index}: {r.name} [{kind_name(r.kind)}] {r.size_bytes} bytes"
    _emit(args, to_dict(job), text)
    return 0


async def cmd_compute_list(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        jobs = await client.list_jobs()
    if args.json:
        print_json([to_dict(j) for j in jobs])
    else:
        for job in jobs:
            print(
                f"{job.name.removeprefix('jobs/')}  {state_name(job.state):10}  "
                f"{job.create_time.ToDatetime():%Y-%m-%d %H:%M:%S}  {describe(job)}"
                + ("  (results expired)" if job.results_expired else "")
            )
    return 0


async def cmd_compute_logs(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        if not args.follow:
            job = await client.get_job(args.job)
            if not job_facts.is_final(job.state):
                # Without -f, print what there is so far and stop.
                async for chunk in _until_idle(client.stream_logs(args.job)):
                    sys.stdout.write(chunk.text)
                return 0
        async for chunk in client.stream_logs(args.job):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
    return 0


async def _until_idle(stream: Any) -> Any:
    iterator = stream.__aiter__()
    while True:
        try:
            yield await asyncio.wait_for(iterator.__anext__(), 0.5)
        except (StopAsyncIteration, TimeoutError):
            return


async def cmd_compute_results(args: argparse.Namespace) -> int:
    out = Path(args.out)
    async with _client(args) as client:
        job = await client.get_job(args.job)
        if not job.results:
            print("c2d: the job has no results (yet)", file=sys.stderr)
            return 1
        if args.urls:
            return await _print_result_urls(args, client, job)
        out.mkdir(parents=True, exist_ok=True)
        saved = []
        for result in job.results:
            dest = out / _safe_local_name(result)
            dest.parent.mkdir(parents=True, exist_ok=True)
            await client.download_result(args.job, result, dest)
            saved.append(
                {
                    "index": result.index,
                    "name": result.name,
                    "kind": kind_name(result.kind),
                    "path": str(dest),
                    "sha256": result.sha256,
                }
            )
    _emit(args, saved, "\n".join(f"{s['path']}  ({s['kind']}, sha256 ok)" for s in saved))
    return 0


async def _print_result_urls(args: argparse.Namespace, client: Any, job: Any) -> int:
    urls = []
    for result in job.results:
        response = await client.result_url(args.job, result)
        urls.append(
            {
                "index": result.index,
                "name": result.name,
                "kind": kind_name(result.kind),
                "url": response.url,
                "expire_time": response.expire_time.ToJsonString(),
                "size_bytes": result.size_bytes,
                "sha256": result.sha256,
            }
        )
    _emit(
        args,
        urls,
        "\n".join(
            f"{u['name']} ({u['kind']}, {u['size_bytes']} bytes, sha256 {u['sha256']}, "
            f"until {u['expire_time']}):\n  {u['url']}"
            for u in urls
        ),
    )
    return 0


def _safe_local_name(result: Any) -> Path:
    """A local path for a result: outputs keep their relative path, logs go under logs/, and
    nothing can climb out of the chosen folder."""
    parts = [p for p in str(result.name).split("/") if p not in ("", ".", "..")]
    base = Path(*parts) if parts else Path(f"result-{result.index}")
    return base if result.kind == 1 else Path("logs") / base.name


async def cmd_compute_stop(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        job = await client.stop_job(args.job)
    _emit(args, to_dict(job), describe(job))
    return 0


async def cmd_compute_delete(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        await client.delete_job(args.job)
    _emit(args, {"deleted": args.job}, f"deleted {args.job}")
    return 0


def _result_indexes(text: str) -> list[int]:
    """`0,2`: result indexes, in the order given."""
    try:
        indexes = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"result indexes like 0,2, not {text!r}") from None
    if any(index < 0 for index in indexes):
        raise argparse.ArgumentTypeError("a result index is never negative")
    return indexes


async def cmd_compute_publish_outputs(args: argparse.Namespace) -> int:
    policy = owner.read_policy_file(args.policy_file) if args.policy_file else None
    async with _client(args) as client:
        dataset = await client.publish_job_outputs(
            args.job,
            metadata=pb.AssetMetadata(title=args.title, description=args.description),
            result_indexes=args.outputs,
            policy=policy,
        )
    _emit(args, to_dict(dataset), f"{dataset.did}\n{owner.describe_policy(dataset)}")
    return 0


# -- wiring --------------------------------------------------------------------------------


def _image_reference(text: str) -> container_pb2.Container:
    try:
        return containers.parse_reference(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON document")
    common.add_argument(
        "--provider",
        help="the Provider's gRPC address (default $C2D_PROVIDER_ADDRESS or 127.0.0.1:8031)",
    )
    common.add_argument(
        "--key-file",
        help="your Ethereum key (default $C2D_KEY_FILE or "
        "$C2D_HOME/key.json, created on first use)",
    )

    parser = argparse.ArgumentParser(prog="c2d", description=__doc__, parents=[common])
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", parents=[common], help="run a node in the foreground")
    up.add_argument(
        "--engine",
        choices=("local", "kubernetes"),
        default="local",
        help="where jobs run: this machine's sandbox (default) or the cluster of a kubeconfig",
    )
    up.add_argument("--kubeconfig", help="default: $KUBECONFIG, else ~/.kube/config")
    up.add_argument("--namespace", default="c2d-jobs", help="the jobs' namespace (must exist)")
    up.add_argument(
        "--pods-image",
        default="c2d-mesh:dev",
        help="the mesh's image, for the configure and publish pods (see deploy/images)",
    )
    up.add_argument(
        "--data-volume",
        metavar="JSON",
        help="the datasets as a Kubernetes volume source; default: hostPath of the data root",
    )
    up.add_argument(
        "--results-volume",
        metavar="JSON",
        help="the results folder as a volume source; default: hostPath of the results folder",
    )
    storage.add_arguments(up)
    up.set_defaults(run=cmd_up)
    demo = commands.add_parser(
        "demo", parents=[common], help="run a whole job on a fresh local node, then stop it"
    )
    demo.add_argument(
        "--paid",
        action="store_true",
        help="the paid flow: a local chain, a dataset sold for OCEAN, an order, a priced "
        "environment",
    )
    storage.add_arguments(demo)
    demo.set_defaults(run=cmd_demo)
    envs = commands.add_parser(
        "environments", parents=[common], help="list the compute environments"
    )
    envs.set_defaults(run=cmd_environments)

    dataset = commands.add_parser("dataset", help="datasets (data owners)").add_subparsers(
        dest="action", required=True
    )
    publish = dataset.add_parser("publish", parents=[common], help="publish files as a dataset")
    owner.add_dataset_file_flags(publish)
    publish.add_argument("--title")
    publish.add_argument(
        "--sample-of", metavar="DID", help="register this dataset as that dataset's sample"
    )
    owner.add_policy_flags(publish, editing=False)
    paid.add_pricing_flags(publish)
    publish.set_defaults(run=owner.cmd_dataset_publish)
    show = dataset.add_parser("show", parents=[common], help="a dataset's public record")
    show.add_argument("did")
    show.set_defaults(run=cmd_dataset_show)

    algorithm = commands.add_parser("algorithm", help="algorithms").add_subparsers(
        dest="action", required=True
    )
    apublish = algorithm.add_parser("publish", parents=[common], help="publish an algorithm")
    apublish.add_argument("file")
    apublish.add_argument(
        "--entrypoint",
        required=True,
        help="the command, with $ALGO for the code, e.g. 'python3 $ALGO'",
    )
    apublish.add_argument(
        "--image",
        type=_image_reference,
        metavar="REPOSITORY[:TAG]@sha256:DIGEST",
        help="run in this container image (pinned by its manifest digest) instead of the "
        "node's host runtime",
    )
    apublish.add_argument("--title")
    apublish.add_argument(
        "--public",
        action="store_true",
        help="let anyone download the code (default: private, usable only inside jobs)",
    )
    apublish.add_argument(
        "--parameters",
        metavar="FILE",
        help='JSON list of declarations, e.g. [{"name": "k", "type": "integer", "minimum": 1}]',
    )
    paid.add_pricing_flags(apublish)
    apublish.set_defaults(run=cmd_algorithm_publish)

    compute = commands.add_parser("compute", help="compute jobs").add_subparsers(
        dest="action", required=True
    )
    start = compute.add_parser("start", parents=[common], help="start a job")
    start.add_argument("--dataset", action="append", required=True, metavar="DID")
    start.add_argument("--algorithm", metavar="DID")
    start.add_argument("--raw", metavar="FILE", help="send this file as raw code")
    start.add_argument("--entrypoint", default="python3 $ALGO")
    start.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
    start.add_argument("--environment", default="")
    start.add_argument(
        "--viewer",
        action="append",
        default=[],
        metavar="ADDRESS",
        help="let this address read the job's status, logs, results and provenance",
    )
    start.add_argument("--cpus", type=float, help="fewer CPUs than the environment's")
    start.add_argument("--memory", type=parse_size, help="less memory, e.g. 512M")
    start.add_argument("--disk", type=parse_size, help="less disk, e.g. 256M")
    start.add_argument("--max-duration", type=int, metavar="SECONDS", help="a shorter deadline")
    start.add_argument(
        "--require-network",
        action="store_true",
        help="refuse up front unless the job will have the network",
    )
    start.add_argument(
        "--order",
        action="append",
        default=[],
        metavar="TX",
        help="an order transaction paying for a paid asset (see `c2d compute order`)",
    )
    delivery.add_flags(start)
    start.add_argument(
        "--follow",
        "-f",
        action="store_true",
        help="show status changes and log lines live until the job ends",
    )
    start.set_defaults(run=cmd_compute_start)
    order = compute.add_parser(
        "order",
        parents=[common],
        help="pay for a job on paid assets: order each one on the chain",
    )
    order.add_argument("datasets", nargs="+", metavar="DID")
    order.add_argument("--algorithm", metavar="DID", help="the algorithm the job will run")
    order.add_argument("--environment", default="")
    order.add_argument(
        "--valid-for",
        type=int,
        metavar="SECONDS",
        help="how long the provider fee lets jobs start (default: the environment's duration)",
    )
    order.set_defaults(run=cmd_compute_order)

    chain_commands = commands.add_parser(
        "chain", help="a local EVM chain with Ocean's contracts, for paid compute"
    ).add_subparsers(dest="action", required=True)
    chain_up = chain_commands.add_parser(
        "up",
        parents=[common],
        help="run ganache on 127.0.0.1 with Ocean's contracts deployed, until Ctrl-C",
    )
    chain_up.add_argument("--port", type=int, default=paid.DEFAULT_PORT)
    chain_up.add_argument("--chain-id", type=int, default=paid.DEFAULT_CHAIN_ID)
    chain_up.add_argument(
        "--fund",
        action="append",
        default=[],
        metavar="ADDRESS",
        help="give this address ETH and OCEAN too (your own key's address always gets some)",
    )
    chain_up.set_defaults(run=paid.cmd_chain_up)
    fund = chain_commands.add_parser(
        "fund", parents=[common], help="give an address ETH and OCEAN on the local chain"
    )
    fund.add_argument("address")
    fund.add_argument("--ether", type=paid.parse_tokens, default=10 * 10**18, metavar="ETH")
    fund.add_argument("--ocean", type=paid.parse_tokens, default=1000 * 10**18, metavar="OCEAN")
    fund.set_defaults(run=paid.cmd_chain_fund)
    for name, run, text in [
        ("status", cmd_compute_status, "a job's state and results"),
        ("stop", cmd_compute_stop, "stop a job"),
        ("delete", cmd_compute_delete, "delete a finished job and its results"),
    ]:
        sub = compute.add_parser(name, parents=[common], help=text)
        sub.add_argument("job")
        sub.set_defaults(run=run)
    logs = compute.add_parser("logs", parents=[common], help="the algorithm's log")
    logs.add_argument("job")
    logs.add_argument("--follow", "-f", action="store_true", help="follow until the job ends")
    logs.set_defaults(run=cmd_compute_logs)
    results = compute.add_parser("results", parents=[common], help="download the results")
    results.add_argument("job")
    results.add_argument("--out", default=".", help="folder to save them in")
    results.add_argument(
        "--urls",
        action="store_true",
        help="print short-lived download URLs (results in S3) instead of downloading; check "
        "each download against the sha256 printed beside it",
    )
    results.set_defaults(run=cmd_compute_results)
    listing = compute.add_parser("list", parents=[common], help="your jobs and those you view")
    listing.set_defaults(run=cmd_compute_list)
    outputs = compute.add_parser(
        "publish-outputs",
        parents=[common],
        help="publish a succeeded job's outputs as a dataset of yours on the node (they never "
        "leave it), where the datasets it read allow it",
    )
    outputs.add_argument("job")
    outputs.add_argument(
        "--outputs",
        type=_result_indexes,
        default=[],
        metavar="INDEXES",
        help="the outputs' result indexes, e.g. 0,2, in the dataset's file order (default: "
        "every output)",
    )
    outputs.add_argument("--title", required=True)
    outputs.add_argument("--description", default="")
    outputs.add_argument(
        "--policy-file",
        metavar="FILE",
        help="the dataset's compute policy as JSON, e.g. "
        '{"publisherTrustedAlgorithms": [...]} (default: it trusts no algorithm; change it '
        "later with c2d dataset policy)",
    )
    outputs.set_defaults(run=cmd_compute_publish_outputs)

    register_certs(commands)
    owner.register(commands, dataset, algorithm, common)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    # The CLI's own log lines are for trouble only: its output is the command's answer.
    configure_logging("cli", level=os.environ.get("C2D_LOG_LEVEL", "warning"))
    try:
        code = asyncio.run(args.run(args))
    except grpc.aio.AioRpcError as error:
        if args.json:
            print_json({"error": {"status": error.code().name, "message": error.details()}})
        else:
            print(f"c2d: {error.code().name}: {error.details()}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
