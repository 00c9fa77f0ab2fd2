"""The owner's control from the command line: publishing datasets (local and remote files),
dataset policies, approval requests, the audit log, and provenance records with the provider's
identity."""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import httpx
from c2d.provider.v1 import provider_pb2 as pb
from google.protobuf import duration_pb2, json_format

from cli import chain as paid
from cli.common import client as _client
from cli.common import emit as _emit
from cli.common import parse_parameters, write_file
from cli.output import print_json, to_dict
from mesh import jobs as job_facts
from mesh.provenance import ProvenanceError, verify_document
from mesh.s3 import S3Settings, error_code, parse_s3_url
from sdk.client import asset_did, remote_file

_BOUND = re.compile(
    r"(?P<name>[A-Za-z][A-Za-z0-9_]{0,63})(?:@(?P<did>did:c2d:[0-9a-f]{64}))?"
    r"=(?P<min>.*?)\.\.(?P<max>.*)"
)


# -- policies ------------------------------------------------------------------------------


def parse_bound(text: str) -> pb.ParameterBound:
    """`NAME[@ALGORITHM_DID]=MIN..MAX`, either end may be empty: `min_group=10..`."""
    match = _BOUND.fullmatch(text)
    if match is None:
        raise SystemExit(f"c2d: --bound takes NAME[@ALGORITHM_DID]=MIN..MAX, not {text!r}")
    bound = pb.ParameterBound(name=match["name"], algorithm_did=match["did"] or "")
    try:
        if match["min"]:
            bound.minimum = float(match["min"])
        if match["max"]:
            bound.maximum = float(match["max"])
    except ValueError:
        raise SystemExit(f"c2d: the ends of --bound {text!r} must be numbers") from None
    if not (bound.HasField("minimum") or bound.HasField("maximum")):
        raise SystemExit(f"c2d: --bound {text!r} bounds nothing")
    return bound


def _describe_bound(bound: pb.ParameterBound) -> str:
    low = f"{bound.minimum:g}" if bound.HasField("minimum") else ""
    high = f"{bound.maximum:g}" if bound.HasField("maximum") else ""
    scope = f"@{bound.algorithm_did}" if bound.algorithm_did else ""
    return f"{bound.name}{scope}={low}..{high}"


def describe_policy(dataset: pb.Dataset) -> str:
    policy = dataset.policy
    lines = [f"{dataset.did}  policy version {dataset.policy_version}"]
    for trusted in policy.publisher_trusted_algorithms:
        lines.append(
            f"  trusts {trusted.did}  files {trusted.files_checksum[:12]}…  "
            f"container {trusted.container_section_checksum[:12]}…"
        )
    for publisher in policy.publisher_trusted_algorithm_publishers:
        lines.append(
            "  trusts every algorithm published here"
            if publisher == "*"
            else f"  trusts publisher {publisher}"
        )
    if len(lines) == 1:
        lines.append("  trusts no algorithm")
    lines.append(f"  raw code {'allowed' if policy.allow_raw_algorithm else 'refused'}")
    lines.append(f"  network {'allowed' if policy.allow_network_access else 'refused'}")
    derived = "allowed" if policy.allow_derived_datasets else "refused"
    lines.append(f"  datasets of jobs' outputs {derived}")
    for bound in policy.parameter_bounds:
        lines.append(f"  bound {_describe_bound(bound)}")
    if policy.timeout.seconds:
        lines.append(f"  order valid for {policy.timeout.seconds} s")
    if dataset.sample:
        lines.append(f"  sample {dataset.sample}")
    if dataset.sample_of:
        lines.append(f"  sample of {dataset.sample_of}")
    if dataset.HasField("derived_from"):
        origin = dataset.derived_from
        lines.append(f"  made from the outputs of {origin.job} ({', '.join(origin.outputs)})")
        lines.append(f"    which read {', '.join(origin.datasets)}")
        lines.append(f"    publisher {dataset.publisher}")
    return "\n".join(lines)


def add_policy_flags(parser: argparse.ArgumentParser, *, editing: bool) -> None:
    """The policy flags shared by `dataset publish` and `dataset policy`."""
    parser.add_argument(
        "--trust",
        action="append",
        default=[],
        metavar="ALGORITHM_DID",
        help="trust this algorithm, pinned to its current checksums",
    )
    parser.add_argument(
        "--trust-publisher",
        action="append",
        default=[],
        metavar="ADDRESS",
        help="trust every algorithm of this publisher ('*': of everyone)",
    )
    parser.add_argument(
        "--bound",
        action="append",
        default=[],
        metavar="NAME[@ALGORITHM_DID]=MIN..MAX",
        help="bound a numeric algorithm parameter, e.g. min_group_size=10..",
    )
    parser.add_argument(
        "--timeout", type=int, metavar="SECONDS", help="how long a paid order grants access"
    )
    if not editing:
        parser.add_argument(
            "--allow-raw",
            action="store_true",
            help="let consumers send raw code (most prone to data escape)",
        )
        parser.add_argument(
            "--allow-network",
            action="store_true",
            help="let jobs use the network (the environment must permit it too)",
        )
        parser.add_argument(
            "--allow-derived-datasets",
            action="store_true",
            help="let a job's consumer publish its outputs as a dataset of its own on this "
            "node (c2d compute publish-outputs); they never leave the node",
        )
        return
    for flag, what in (
        ("raw", "raw code"),
        ("network", "the network"),
        ("derived-datasets", "datasets made from jobs' outputs"),
    ):
        group = parser.add_mutually_exclusive_group()
        dest = f"allow_{flag.replace('-', '_')}"
        group.add_argument(f"--allow-{flag}", dest=dest, action="store_const", const=True)
        group.add_argument(
            f"--forbid-{flag}",
            dest=dest,
            action="store_const",
            const=False,
            help=f"allow or forbid {what}",
        )
    parser.add_argument("--untrust", action="append", default=[], metavar="ALGORITHM_DID")
    parser.add_argument("--untrust-publisher", action="append", default=[], metavar="ADDRESS")
    parser.add_argument(
        "--unbound", action="append", default=[], metavar="NAME", help="drop a parameter bound"
    )


async def apply_policy_flags(
    client: Any, policy: pb.ComputePolicy, args: argparse.Namespace
) -> None:
    """Changes `policy` in place as the flags say."""
    untrust = {asset_did("algorithms", ref) for ref in getattr(args, "untrust", [])}
    new = [await client.trust(ref) for ref in args.trust]
    replaced = untrust | {t.did for t in new}
    kept = [t for t in policy.publisher_trusted_algorithms if t.did not in replaced]
    del policy.publisher_trusted_algorithms[:]
    policy.publisher_trusted_algorithms.extend([*kept, *new])

    drop = {p.lower() for p in getattr(args, "untrust_publisher", [])}
    publishers = [p for p in policy.publisher_trusted_algorithm_publishers if p.lower() not in drop]
    publishers += [p for p in args.trust_publisher if p not in publishers]
    del policy.publisher_trusted_algorithm_publishers[:]
    policy.publisher_trusted_algorithm_publishers.extend(publishers)

    bounds = [parse_bound(text) for text in args.bound]
    unbound = set(getattr(args, "unbound", [])) | {b.name for b in bounds}
    kept_bounds = [b for b in policy.parameter_bounds if b.name not in unbound]
    del policy.parameter_bounds[:]
    policy.parameter_bounds.extend([*kept_bounds, *bounds])

    if args.allow_raw is not None:
        policy.allow_raw_algorithm = args.allow_raw
    if args.allow_network is not None:
        policy.allow_network_access = args.allow_network
    if args.allow_derived_datasets is not None:
        policy.allow_derived_datasets = args.allow_derived_datasets
    if args.timeout is not None:
        policy.timeout.CopyFrom(duration_pb2.Duration(seconds=args.timeout))


def read_policy_file(path: str) -> pb.ComputePolicy:
    """A compute policy from a JSON file, as the API writes one (proto3 JSON: field names in
    lowerCamelCase or as in the proto), e.g. {"publisherTrustedAlgorithms": [{"did": ...,
    "filesChecksum": ..., "containerSectionChecksum": ...}], "allowDerivedDatasets": true}."""
    try:
        return json_format.Parse(Path(path).read_text("utf-8"), pb.ComputePolicy())
    except (OSError, UnicodeDecodeError, json_format.ParseError) as error:
        raise SystemExit(f"c2d: --policy-file {path}: {error}") from None


async def cmd_dataset_policy(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        dataset = await client.get_dataset(args.did)
        policy = pb.ComputePolicy()
        policy.CopyFrom(dataset.policy)
        await apply_policy_flags(client, policy, args)
        # Without change flags (or with flags that change nothing) the policy is only shown.
        if policy != dataset.policy:
            # Only over the version just read: an edit by another owner in between is not lost.
            dataset = await client.update_policy(
                args.did, policy, expected_version=dataset.policy_version
            )
    _emit(args, to_dict(dataset), describe_policy(dataset))
    return 0


# -- algorithms ----------------------------------------------------------------------------

_TYPE_NAMES = {
    "string": "PARAMETER_TYPE_STRING",
    "integer": "PARAMETER_TYPE_INTEGER",
    "number": "PARAMETER_TYPE_NUMBER",
    "boolean": "PARAMETER_TYPE_BOOLEAN",
}


def read_parameter_specs(path: str | None) -> list[pb.ParameterSpec]:
    """A JSON list of parameter declarations, for example
    `[{"name": "min_group_size", "type": "integer", "default": 10, "minimum": 5}]`."""
    if not path:
        return []
    try:
        items = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SystemExit(f"c2d: cannot read the parameters file: {error}") from None
    if not isinstance(items, list):
        raise SystemExit("c2d: the parameters file must hold a JSON list")
    specs = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise SystemExit(f"c2d: parameters[{index}] must be an object")
        item = dict(item)
        if "default" in item:
            item["defaultValue"] = item.pop("default")
        kind = str(item.get("type", ""))
        item["type"] = _TYPE_NAMES.get(kind.lower(), kind)
        try:
            specs.append(json_format.ParseDict(item, pb.ParameterSpec()))
        except json_format.ParseError as error:
            raise SystemExit(f"c2d: parameters[{index}]: {error}") from None
    return specs


async def cmd_algorithm_update(args: argparse.Namespace) -> int:
    code = Path(args.file).read_bytes()
    async with _client(args) as client:
        algorithm = await client.update_algorithm(
            args.did, code, args.entrypoint, parameters=read_parameter_specs(args.parameters)
        )
    _emit(
        args,
        to_dict(algorithm),
        f"{algorithm.did} version {algorithm.version}: files {algorithm.files_checksum}",
    )
    return 0


async def cmd_algorithm_show(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        algorithm = await client.get_algorithm(args.did)
    print_json(to_dict(algorithm))
    return 0


async def cmd_algorithm_download(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        code = await client.download_algorithm(args.did)
    _write_private(Path(args.out), code)
    _emit(args, {"path": args.out, "bytes": len(code)}, f"{args.out}  ({len(code)} bytes)")
    return 0


def _write_private(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, content, 0o600)


# -- approval requests ---------------------------------------------------------------------


def _state(state: int) -> str:
    return pb.ApprovalState.Name(state).removeprefix("APPROVAL_STATE_").lower()  # type: ignore[arg-type]


def describe_approval(request: pb.ApprovalRequest, *, full: bool = False) -> str:
    line = (
        f"{request.name.removeprefix('approvalRequests/')}  {_state(request.state):8}  "
        f"{request.algorithm_did} on {request.dataset}  by {request.requester}"
    )
    if not full:
        return line
    lines = [
        line,
        f"  message: {request.message or '(none)'}",
        f"  files checksum:             {request.files_checksum}",
        f"  container section checksum: {request.container_section_checksum}",
    ]
    parameters = job_facts.whole_numbers(json_format.MessageToDict(request.parameters))
    if parameters:
        lines.append(f"  parameters: {json.dumps(parameters, sort_keys=True)}")
    if request.decided_by:
        lines.append(f"  decided by {request.decided_by}: {request.decision_note or '(no note)'}")
    for job in request.sample_jobs:
        lines.append(f"  sample run {job.removeprefix('jobs/')}")
    return "\n".join(lines)


async def cmd_approval_request(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        request = await client.create_approval_request(
            args.dataset,
            args.algorithm,
            message=args.message,
            parameters=parse_parameters(args.param),
        )
    _emit(args, to_dict(request), describe_approval(request))
    return 0


async def cmd_approval_list(args: argparse.Namespace) -> int:
    state = (
        pb.ApprovalState.Value(f"APPROVAL_STATE_{args.state.upper()}")
        if args.state
        else pb.APPROVAL_STATE_UNSPECIFIED
    )
    async with _client(args) as client:
        requests = await client.list_approval_requests(dataset=args.dataset or "", state=state)
    if args.json:
        print_json([to_dict(r) for r in requests])
    else:
        print("\n".join(describe_approval(r) for r in requests) or "no approval requests")
    return 0


async def cmd_approval_show(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        request = await client.get_approval_request(args.id)
        if args.code:
            # The code as it is now: the owner compares its checksum with the request's.
            code = await client.download_algorithm(request.algorithm)
            _write_private(Path(args.code), code)
    text = describe_approval(request, full=True)
    if args.code:
        text += f"\n  code saved to {args.code}"
    _emit(args, to_dict(request), text)
    return 0


async def cmd_approval_approve(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        request = await client.get_approval_request(args.id)
        # Approving pins the checksums shown by `approval show`, and the Provider refuses if
        # the algorithm has changed since.
        response = await client.approve(
            request.name,
            args.files_checksum or request.files_checksum,
            args.container_section_checksum or request.container_section_checksum,
            note=args.note,
        )
    _emit(
        args,
        to_dict(response),
        f"{describe_approval(response.approval_request)}\n"
        f"{response.dataset.did} is now at policy version {response.dataset.policy_version}",
    )
    return 0


async def cmd_approval_reject(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        request = await client.reject(args.id, args.reason)
    _emit(args, to_dict(request), describe_approval(request, full=True))
    return 0


async def cmd_approval_sample(args: argparse.Namespace) -> int:
    from cli.follow import follow
    from cli.output import describe

    async with _client(args) as client:
        job = await client.run_approval_sample(args.id, environment=args.environment)
        job_id = job.name.removeprefix("jobs/")
        if not args.follow:
            _emit(args, to_dict(job), job_id)
            return 0
        if not args.json:
            print(f"sample job {job_id}", file=sys.stderr)
        final = await follow(client, job.name, quiet_status=args.json)
    _emit(args, to_dict(final), f"sample job {job_id}: {describe(final)}")
    return 0 if final.state == final.STATE_SUCCEEDED else 1


# -- audit log -----------------------------------------------------------------------------


def _outcome(outcome: int) -> str:
    return pb.AuditOutcome.Name(outcome).removeprefix("AUDIT_OUTCOME_").lower()  # type: ignore[arg-type]


async def cmd_audit_list(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        events = await client.list_audit_events(action=args.action, resource=args.resource)
    if args.json:
        print_json([to_dict(e) for e in events])
        return 0
    for e in events:
        reason = f"  {e.reason}" if e.reason else ""
        print(
            f"{e.sequence:6}  {e.time.ToDatetime():%Y-%m-%d %H:%M:%S}  {_outcome(e.outcome):7}  "
            f"{e.action:22}  {e.resource}  by {e.actor}{reason}"
        )
    return 0


async def cmd_audit_export(args: argparse.Namespace) -> int:
    from provider.audit import AuditChainError, verify_chain

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    count, last = 0, ""
    async with _client(args) as client:
        pages = client.pages("ListAuditEvents", pb.ListAuditEventsRequest(page_size=1000), "events")
        # One JSON object per line, as the REST edge shows them: each line's hash can be
        # checked from the line before it. Page by page, so a long log never sits in memory.
        with partial.open("w") as f:
            async for page in pages:
                try:
                    count += verify_chain(page, last)
                except AuditChainError as error:
                    partial.unlink()
                    print(f"c2d: the audit log does not verify: {error}", file=sys.stderr)
                    return 1
                last = page[-1].hash if page else last
                f.writelines(json.dumps(to_dict(e), sort_keys=True) + "\n" for e in page)
                if not args.json and sys.stderr.isatty():
                    print(f"\r{count} entries checked", end="", file=sys.stderr, flush=True)
    partial.replace(out)
    if not args.json and sys.stderr.isatty():
        print(file=sys.stderr)
    _emit(
        args,
        {"path": str(out), "events": count, "last_hash": last},
        f"{count} entries to {out}; the chain verifies; last hash {last}",
    )
    return 0


# -- provider and provenance ---------------------------------------------------------------


async def cmd_provider_info(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        info = await client.get_provider_info()
    _emit(
        args,
        to_dict(info),
        f"provider address {info.address}\n"
        f"  owners  {', '.join(info.owners)}\n"
        f"  version {info.version}\n"
        "Pin this address: `c2d provenance verify FILE --provider ADDRESS` checks records "
        "against it.",
    )
    return 0


async def cmd_provenance_get(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        document = await client.get_provenance(args.job)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(document)
    _emit(args, {"path": str(out), "bytes": len(document)}, f"{out}  ({len(document)} bytes)")
    return 0


async def cmd_provenance_verify(args: argparse.Namespace) -> int:
    """Offline: no Provider is asked anything."""
    try:
        record = verify_document(Path(args.file).read_bytes(), args.provider)
    except OSError as error:
        print(f"c2d: cannot read {args.file}: {error.strerror}", file=sys.stderr)
        return 2
    except ProvenanceError as error:
        if args.json:
            print_json({"valid": False, "error": str(error)})
        else:
            print(f"c2d: NOT VALID: {error}", file=sys.stderr)
        return 1
    algorithm = record.get("algorithm", {})
    text = (
        f"valid: signed by {args.provider}\n"
        f"  job        {record.get('job')}  {record.get('state')}\n"
        f"  algorithm  {algorithm.get('did') or 'raw code'}  "
        f"files {algorithm.get('files_checksum')}\n"
        + "".join(
            f"  dataset    {d.get('did')}  policy version {d.get('policy_version')}  "
            f"({d.get('decision')})\n"
            for d in record.get("datasets", [])
        )
        + "".join(
            f"  result     {r.get('name')}  sha256 {r.get('sha256')}\n"
            for r in record.get("results", [])
        )
    ).rstrip()
    _emit(args, {"valid": True, "provenance": record}, text)
    return 0


# -- publishing a dataset ------------------------------------------------------------------

_FILES_HELP = """\
Files are numbered in the order given: file i appears to jobs as /data/inputs/{id}/i.
Give local files (on the node, under its data root) as PATH arguments, or list local and
remote files in order with --file and --remote (not both ways at once):

  c2d dataset publish ~/.c2d/data/a.csv ~/.c2d/data/b.csv
  c2d dataset publish --file ~/.c2d/data/a.csv \\
      --remote s3://lake/visits.parquet --sha256 9f86d0...0a08 --size 52428800 \\
      --credentials lake --remote https://data.example.org/codes.csv

--sha256, --size and --credentials describe the --remote just before them. Without --sha256
and --size, c2d downloads the file once, here, to measure it (https: as served; s3: with
this machine's C2D_S3_* or AWS settings). Each job fetches a remote file on the node and
fails when its size or sha256 differs. --credentials names a source credential configured
on the node's engine, never a secret; URLs hold no user:password@. Consumers never see a
file's path or URL, only its index, size and sha256."""


@dataclass
class _FileArgument:
    """One --file or --remote, with the flags that describe a remote file after it."""

    location: str
    remote: bool
    sha256: str | None = None
    size: int | None = None
    credentials: str | None = None


def _files_so_far(namespace: argparse.Namespace) -> list[_FileArgument]:
    files: list[_FileArgument] | None = getattr(namespace, "file_arguments", None)
    if files is None:
        files = []
        namespace.file_arguments = files
    return files


class _AddFile(argparse.Action):
    """--file, --remote: the next file."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        _files_so_far(namespace).append(_FileArgument(str(values), self.dest == "remote"))


class _DescribeRemote(argparse.Action):
    """--sha256, --size, --credentials: set on the --remote given just before."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        files = _files_so_far(namespace)
        if not files or not files[-1].remote:
            parser.error(f"{option_string} describes a --remote URL: put it after that --remote")
        if getattr(files[-1], self.dest) is not None:
            parser.error(f"{option_string} is given twice for file {len(files) - 1}")
        setattr(files[-1], self.dest, values)


def _byte_count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError("a whole number of bytes, 1 or more")
    return int(text)


def add_dataset_file_flags(parser: argparse.ArgumentParser) -> None:
    """The files of `dataset publish`: PATH arguments, or --file and --remote in order."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _FILES_HELP
    parser.add_argument(
        "paths", nargs="*", metavar="PATH", help="local files on the node, in order"
    )
    parser.add_argument(
        "--file", dest="file", action=_AddFile, metavar="PATH", help="the next file: local"
    )
    parser.add_argument(
        "--remote",
        dest="remote",
        action=_AddFile,
        metavar="URL",
        help="the next file: s3://BUCKET/KEY or an http(s):// URL",
    )
    parser.add_argument(
        "--sha256",
        dest="sha256",
        action=_DescribeRemote,
        metavar="HEX",
        help="the --remote file's sha256 (64 lowercase hex digits)",
    )
    parser.add_argument(
        "--size",
        dest="size",
        action=_DescribeRemote,
        type=_byte_count,
        metavar="BYTES",
        help="the --remote file's size in bytes",
    )
    parser.add_argument(
        "--credentials",
        dest="credentials",
        action=_DescribeRemote,
        metavar="NAME",
        help="the node's source credential for the --remote file",
    )


async def dataset_files(args: argparse.Namespace) -> list[str | pb.DatasetFileLocation]:
    """The files the command line lists, in order, measuring each remote file given without
    --sha256 and --size. Exits with a message on a mistake."""
    given: list[_FileArgument] = getattr(args, "file_arguments", None) or []
    if args.paths and given:
        raise SystemExit(
            "c2d: give the files as PATH arguments or with --file/--remote, not both "
            "(--file and --remote keep the order they are given in)"
        )
    if not given:
        if not args.paths:
            raise SystemExit("c2d: a dataset needs at least one file (PATH, --file or --remote)")
        return list(args.paths)
    files: list[str | pb.DatasetFileLocation] = []
    for index, item in enumerate(given):
        if not item.remote:
            files.append(item.location)
            continue
        if (item.sha256 is None) != (item.size is None):
            raise SystemExit(
                f"c2d: file {index}: give both --sha256 and --size, or neither to have c2d "
                "measure the file"
            )
        if item.size is None or item.sha256 is None:
            item.size, item.sha256 = await measure_remote(item.location, index)
        files.append(
            remote_file(
                item.location,
                size_bytes=item.size,
                sha256=item.sha256.lower(),
                credentials=item.credentials or "",
            )
        )
    return files


def file_title(file: str | pb.DatasetFileLocation) -> str:
    """A dataset's default title: its first file's name."""
    if isinstance(file, str):
        return Path(file).name
    return PurePosixPath(urlsplit(file.url).path).name or "dataset"


async def cmd_dataset_publish(args: argparse.Namespace) -> int:
    files = await dataset_files(args)
    async with _client(args) as client:
        policy = pb.ComputePolicy()
        await apply_policy_flags(client, policy, args)
        title = args.title or file_title(files[0])
        with paid.chain_errors():
            pricing = await paid.pricing_for(args, title)
        local_only = all(isinstance(f, str) for f in files)
        dataset = await client.publish_dataset(
            # PATH arguments travel as file_paths, as they always have.
            [str(f) for f in files] if local_only else (),
            files=() if local_only else files,
            metadata=pb.AssetMetadata(title=title),
            policy=policy,
            sample_of=args.sample_of or "",
            pricing=pricing,
        )
    if dataset.HasField("pricing") and not args.json:
        print(paid.describe_pricing(dataset.pricing), file=sys.stderr)
    _emit(args, to_dict(dataset), dataset.did)
    return 0


# -- measuring a remote file, on the owner's side --------------------------------------------

_MIB = 1 << 20


class _Progress:
    """How much of a remote file has been read, on stderr: one updating line on a terminal,
    one line at the end otherwise."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.live = sys.stderr.isatty()
        self.shown = 0.0

    def update(self, size: int, total: int | None) -> None:
        now = time.monotonic()
        if not self.live or now - self.shown < 0.2:
            return
        self.shown = now
        of = f" of {total / _MIB:.1f}" if total else ""
        print(
            f"\rc2d: measuring file {self.index}: {size / _MIB:.1f}{of} MiB",
            end="",
            file=sys.stderr,
            flush=True,
        )

    def done(self, size: int, sha256: str) -> None:
        end = "\r" if self.live else ""
        print(
            f"{end}c2d: file {self.index}: {size} bytes, sha256 {sha256}",
            file=sys.stderr,
            flush=True,
        )


async def measure_remote(url: str, index: int) -> tuple[int, str]:
    """Downloads a remote file once to learn its size and sha256, as a job will check them."""
    progress = _Progress(index)
    digest = hashlib.sha256()
    size = 0
    try:
        async for chunk, total in _remote_chunks(url):
            digest.update(chunk)
            size += len(chunk)
            progress.update(size, total)
    except _MeasureError as error:
        raise SystemExit(
            f"c2d: file {index} could not be measured ({error}); give --sha256 and --size"
        ) from None
    if not size:
        raise SystemExit(f"c2d: file {index} is empty; a dataset file holds 1 byte or more")
    progress.done(size, digest.hexdigest())
    return size, digest.hexdigest()


class _MeasureError(Exception):
    """Why a remote file could not be read here."""


def _remote_chunks(url: str) -> AsyncIterator[tuple[bytes, int | None]]:
    if url.startswith("s3://"):
        return _s3_chunks(url)
    if url.startswith(("http://", "https://")):
        return _http_chunks(url)
    raise SystemExit("c2d: --remote takes an s3://, http:// or https:// URL")


async def _http_chunks(url: str) -> AsyncIterator[tuple[bytes, int | None]]:
    # The bytes as served (identity, no decoding) and no redirect followed: what is hashed
    # is what a job's fetch of this very URL receives.
    timeout = httpx.Timeout(60.0, connect=10.0)
    try:
        async with (
            httpx.AsyncClient(timeout=timeout, follow_redirects=False) as http,
            http.stream("GET", url, headers={"Accept-Encoding": "identity"}) as response,
        ):
            if response.status_code != 200:
                raise _MeasureError(f"HTTP {response.status_code}")
            length = response.headers.get("content-length", "")
            total = int(length) if length.isdigit() else None
            async for chunk in response.aiter_raw(_MIB):
                yield chunk, total
    except httpx.HTTPError as error:
        raise _MeasureError(type(error).__name__) from None


async def _s3_chunks(url: str) -> AsyncIterator[tuple[bytes, int | None]]:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        bucket, key = parse_s3_url(url)
        settings = S3Settings.from_env()
    except ValueError as error:
        raise _MeasureError(str(error)) from None
    try:
        async with settings.client() as s3:
            response = await s3.get_object(Bucket=bucket, Key=key)
            total = int(response["ContentLength"])
            body = response["Body"]
            # Entered for its release of the connection; read through the body itself, whose
            # iter_chunks also checks the length S3 announced.
            async with body:
                async for chunk in body.iter_chunks(_MIB):
                    yield chunk, total
    except ClientError as error:
        raise _MeasureError(error_code(error) or "S3 error") from None
    except BotoCoreError as error:
        raise _MeasureError(type(error).__name__) from None


# -- wiring --------------------------------------------------------------------------------


def register(
    commands: Any,
    dataset: Any,
    algorithm: Any,
    common: argparse.ArgumentParser,
) -> None:
    """Adds the owner's commands to the `c2d` parser."""
    policy = dataset.add_parser(
        "policy",
        parents=[common],
        help="show a dataset's compute policy, or change it (owners)",
        description="With no change flags, shows the policy. Changes apply to jobs started "
        "afterwards, and only over the version just read.",
    )
    policy.add_argument("did")
    add_policy_flags(policy, editing=True)
    policy.set_defaults(run=cmd_dataset_policy)

    update = algorithm.add_parser(
        "update", parents=[common], help="replace an algorithm's code (its publisher)"
    )
    update.add_argument("did")
    update.add_argument("file")
    update.add_argument("--entrypoint", required=True)
    update.add_argument("--parameters", metavar="FILE", help="JSON list of declarations")
    update.set_defaults(run=cmd_algorithm_update)
    show = algorithm.add_parser("show", parents=[common], help="an algorithm's public record")
    show.add_argument("did")
    show.set_defaults(run=cmd_algorithm_show)
    download = algorithm.add_parser(
        "download",
        parents=[common],
        help="save an algorithm's code (public ones; private ones: their publisher)",
    )
    download.add_argument("did")
    download.add_argument("--out", required=True)
    download.set_defaults(run=cmd_algorithm_download)

    approval = commands.add_parser(
        "approval", help="ask an owner to trust an algorithm, and review such requests"
    ).add_subparsers(dest="action", required=True)
    request = approval.add_parser(
        "request", parents=[common], help="ask a dataset's owners to trust an algorithm"
    )
    request.add_argument("--dataset", required=True, metavar="DID")
    request.add_argument("--algorithm", required=True, metavar="DID")
    request.add_argument("--message", default="")
    request.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
    request.set_defaults(run=cmd_approval_request)
    listing = approval.add_parser(
        "list", parents=[common], help="requests (owners: all; others: their own)"
    )
    listing.add_argument("--dataset", metavar="DID")
    listing.add_argument("--state", choices=["pending", "approved", "rejected"])
    listing.set_defaults(run=cmd_approval_list)
    show_request = approval.add_parser(
        "show", parents=[common], help="a request with the checksums to review"
    )
    show_request.add_argument("id")
    show_request.add_argument(
        "--code", metavar="FILE", help="owners: save the algorithm's code to review it"
    )
    show_request.set_defaults(run=cmd_approval_show)
    sample = approval.add_parser(
        "sample", parents=[common], help="owners: run the algorithm on the dataset's sample"
    )
    sample.add_argument("id")
    sample.add_argument("--environment", default="")
    sample.add_argument("--follow", "-f", action="store_true")
    sample.set_defaults(run=cmd_approval_sample)
    approve = approval.add_parser(
        "approve", parents=[common], help="owners: trust the algorithm at the reviewed checksums"
    )
    approve.add_argument("id")
    approve.add_argument("--note", default="")
    approve.add_argument("--files-checksum", help="default: the request's")
    approve.add_argument("--container-section-checksum", help="default: the request's")
    approve.set_defaults(run=cmd_approval_approve)
    reject = approval.add_parser("reject", parents=[common], help="owners: refuse, with a reason")
    reject.add_argument("id")
    reject.add_argument("--reason", required=True)
    reject.set_defaults(run=cmd_approval_reject)

    audit = commands.add_parser("audit", help="the audit log (owners)").add_subparsers(
        dest="action", required=True
    )
    audit_list = audit.add_parser("list", parents=[common], help="every decision, oldest first")
    audit_list.add_argument("--action", default="", help="e.g. compute.start")
    audit_list.add_argument("--resource", default="", help="e.g. datasets/<id>")
    audit_list.set_defaults(run=cmd_audit_list)
    export = audit.add_parser(
        "export", parents=[common], help="save the whole log as JSON lines, after checking it"
    )
    export.add_argument("--out", required=True)
    export.set_defaults(run=cmd_audit_export)

    provider = commands.add_parser("provider", help="the provider").add_subparsers(
        dest="action", required=True
    )
    info = provider.add_parser(
        "info", parents=[common], help="the address that signs provenance records"
    )
    info.set_defaults(run=cmd_provider_info)

    provenance = commands.add_parser(
        "provenance", help="signed records of what ran"
    ).add_subparsers(dest="action", required=True)
    get = provenance.add_parser("get", parents=[common], help="save a finished job's record")
    get.add_argument("job")
    get.add_argument("--out", required=True)
    get.set_defaults(run=cmd_provenance_get)
    # Offline, so without the common flags: here --provider is the pinned address, not where
    # a Provider listens.
    verify = provenance.add_parser(
        "verify", help="check a record offline against the provider's pinned address"
    )
    verify.add_argument("file")
    verify.add_argument(
        "--provider",
        required=True,
        metavar="ADDRESS",
        help="the provider's address, as `c2d provider info` showed it beforehand",
    )
    verify.add_argument("--json", action="store_true", help="print one JSON document")
    verify.set_defaults(run=cmd_provenance_verify)
