"""The data owner's workflow as the README gives it, through the `c2d` command against `c2d up`:
publish (local and remote files), set a policy, review an approval request on the sample,
approve, read the audit log, and check a job's provenance offline."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import pytest
from c2d.provider.v1 import provider_pb2 as pb

from cli import owner
from cli.main import build_parser
from tests.cli.test_cli import Node, node  # noqa: F401  (the fixture)
from tests.conftest import needs_root
from tests.pods.http_source import HttpSource
from tests.s3_server import S3Server

ALGORITHM = """\
import csv, json, os
params = json.load(open('/data/inputs/algoCustomData.json'))
dataset = json.loads(os.environ['DIDS'])[0]
rows = list(csv.reader(open(f'/data/inputs/{dataset}/0')))
if len(rows) < params['min_group_size']:
    secret_marker_line = 'SECRET-SOURCE-LINE'; raise SystemExit('too few rows')
open('/data/outputs/count.txt', 'w').write(str(len(rows)))
print('counted', len(rows), 'rows')
"""
PARAMETERS = [{"name": "min_group_size", "type": "integer", "required": True, "minimum": 1}]


def ok(result: object) -> str:
    assert getattr(result, "returncode", None) == 0, getattr(result, "stderr", result)
    return str(getattr(result, "stdout", "")).strip()


def refused(result: object, status: str) -> str:
    stderr = str(getattr(result, "stderr", ""))
    assert getattr(result, "returncode", 0) != 0 and status in stderr, stderr
    return stderr


@needs_root
def test_the_owner_reviews_approves_audits_and_proves_what_ran(
    node: Node,  # noqa: F811
    tmp_path: Path,
) -> None:
    consumer = str(tmp_path / "consumer.json")
    viewer = str(tmp_path / "viewer.json")
    stranger = str(tmp_path / "stranger.json")
    # Anyone pins the provider's address beforehand (any command creates the caller's key).
    info = json.loads(ok(node.c2d("provider", "info", "--json", key=viewer)))
    provider_address = info["address"]
    viewer_key = json.loads(Path(viewer).read_text())["address"]
    assert provider_address != viewer_key

    # The consumer publishes a private algorithm that declares its parameter.
    algo = tmp_path / "count.py"
    algo.write_text(ALGORITHM)
    params = tmp_path / "params.json"
    params.write_text(json.dumps(PARAMETERS))
    published = json.loads(
        ok(
            node.c2d(
                "algorithm", "publish", str(algo), "--entrypoint", "python3 $ALGO",
                "--parameters", str(params), "--json", key=consumer,
            )
        )
    )  # fmt: skip
    algorithm = published["did"]
    assert published["access"] == "ALGORITHM_ACCESS_PRIVATE"
    # Nobody else can read a private algorithm's code.
    refused(
        node.c2d("algorithm", "download", algorithm, "--out", str(tmp_path / "x"), key=stranger),
        "PERMISSION_DENIED",
    )

    # The owner publishes the dataset (trusting nothing, bounding the parameter) and a sample.
    data = node.data_file("patients.csv", "".join(f"{i},x\n" for i in range(30)))
    sample_data = node.data_file("patients-sample.csv", "".join(f"{i},y\n" for i in range(12)))
    dataset = ok(node.c2d("dataset", "publish", str(data), "--bound", "min_group_size=10.."))
    sample = ok(node.c2d("dataset", "publish", str(sample_data), "--sample-of", dataset))
    policy = ok(node.c2d("dataset", "policy", dataset))
    assert "policy version 1" in policy and "trusts no algorithm" in policy
    assert f"sample datasets/{sample.removeprefix('did:c2d:')}" in policy

    start = ["compute", "start", "--dataset", dataset, "--algorithm", algorithm]
    stderr = refused(node.c2d(*start, "--param", "min_group_size=20", key=consumer), "")
    assert "PERMISSION_DENIED" in stderr and "does not trust" in stderr

    # The consumer asks; the owner reviews the code and runs it on the sample.
    request = json.loads(
        ok(
            node.c2d(
                "approval", "request", "--dataset", dataset, "--algorithm", algorithm,
                "--message", "counts rows", "--param", "min_group_size=10", "--json",
                key=consumer,
            )
        )
    )  # fmt: skip
    request_id = request["name"].removeprefix("approvalRequests/")
    pending = ok(node.c2d("approval", "list", "--state", "pending"))
    assert request_id in pending
    refused(node.c2d("approval", "show", request_id, key=stranger), "NOT_FOUND")
    code_copy = tmp_path / "review.py"
    shown = ok(node.c2d("approval", "show", request_id, "--code", str(code_copy)))
    assert request["filesChecksum"] in shown
    assert code_copy.read_text() == ALGORITHM
    sample_run = node.c2d("approval", "sample", request_id, "--follow", "--json")
    sample_job = json.loads(ok(sample_run))
    assert sample_job["state"] == "STATE_SUCCEEDED", sample_run.stderr
    sample_out = tmp_path / "sample-results"
    ok(node.c2d("compute", "results", sample_job["name"], "--out", str(sample_out)))
    assert (sample_out / "count.txt").read_text() == "12"

    approved = ok(node.c2d("approval", "approve", request_id, "--note", "fine"))
    assert "approved" in approved and "policy version 2" in approved
    status = json.loads(ok(node.c2d("approval", "show", request_id, "--json", key=consumer)))
    assert status["state"] == "APPROVAL_STATE_APPROVED" and status["decisionNote"] == "fine"

    # The owner's bound holds even though the algorithm allows smaller groups.
    stderr = refused(node.c2d(*start, "--param", "min_group_size=3", key=consumer), "")
    assert "INVALID_ARGUMENT" in stderr and "min_group_size" in stderr

    # The approved algorithm runs; a viewer reads it; a stranger does not see it.
    run = node.c2d(
        *start, "--param", "min_group_size=10", "--viewer", viewer_key, "--follow", "--json",
        key=consumer,
    )  # fmt: skip
    job = json.loads(ok(run))
    assert job["state"] == "STATE_SUCCEEDED", run.stderr
    job_id = job["name"].removeprefix("jobs/")
    assert "counted 30 rows" in ok(node.c2d("compute", "logs", job_id, key=viewer))
    refused(node.c2d("compute", "status", job_id, key=stranger), "NOT_FOUND")
    refused(node.c2d("compute", "stop", job_id, key=viewer), "NOT_FOUND")

    # Provenance: saved by the viewer, checked offline against the pinned address.
    record = tmp_path / "provenance.json"
    ok(node.c2d("provenance", "get", job_id, "--out", str(record), key=viewer))
    verified = ok(node.c2d("provenance", "verify", str(record), "--provider", provider_address))
    assert verified.startswith(f"valid: signed by {provider_address}")
    assert "policy version 2" in verified and "count.txt" in verified
    document = json.loads(record.read_text())
    assert document["provenance"]["datasets"][0]["policy_version"] == 2
    wrong = node.c2d("provenance", "verify", str(record), "--provider", viewer_key)
    assert wrong.returncode == 1 and "NOT VALID" in wrong.stderr
    tampered = tmp_path / "tampered.json"
    tampered.write_bytes(record.read_bytes().replace(b'"count.txt"', b'"count.txT"'))
    bad = node.c2d("provenance", "verify", str(tampered), "--provider", provider_address)
    assert bad.returncode == 1 and "NOT VALID" in bad.stderr

    # The audit log has each decision, a refused start with its reason, and exports verified.
    audit = ok(node.c2d("audit", "list", "--action", "compute.start"))
    assert "refused" in audit and "ALGORITHM_NOT_TRUSTED" in audit and "allowed" in audit
    refused(node.c2d("audit", "list", key=consumer), "PERMISSION_DENIED")
    export = tmp_path / "audit.jsonl"
    exported = ok(node.c2d("audit", "export", "--out", str(export)))
    assert "the chain verifies" in exported
    actions = [json.loads(line)["action"] for line in export.read_text().splitlines()]
    for action in (
        "algorithm.publish",
        "dataset.publish",
        "approval.create",
        "approval.sample",
        "approval.approve",
        "compute.start",
    ):
        assert action in actions, actions
    assert "SECRET-SOURCE-LINE" not in export.read_text()


# -- remote files --------------------------------------------------------------------------

HEX = "ab" * 32


def dataset_files(*argv: str) -> list[str | pb.DatasetFileLocation]:
    """The files `c2d dataset publish ARGV` would publish, in order."""
    args = build_parser().parse_args(["dataset", "publish", *argv])
    return asyncio.run(owner.dataset_files(args))


def mistake(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """What `c2d dataset publish ARGV` says before it exits, without publishing anything."""
    with pytest.raises(SystemExit) as stopped:
        dataset_files(*argv)
    assert stopped.value.code != 0
    return str(stopped.value.code) + capsys.readouterr().err


def test_the_file_flags_keep_their_order_and_refuse_mistakes(
    capsys: pytest.CaptureFixture[str], http_source: HttpSource
) -> None:
    assert dataset_files("/d/a.csv", "/d/b.csv") == ["/d/a.csv", "/d/b.csv"]
    assert dataset_files(
        "--file", "/d/a.csv",
        "--remote", "s3://lake/b.csv", "--size", "5", "--credentials", "lake", "--sha256", HEX,
        "--file", "/d/c.csv",
        "--remote", "https://data.example.org/d.csv", "--sha256", HEX.upper(), "--size", "7",
    ) == [
        "/d/a.csv",
        pb.DatasetFileLocation(url="s3://lake/b.csv", size_bytes=5, sha256=HEX, credentials="lake"),
        "/d/c.csv",
        pb.DatasetFileLocation(url="https://data.example.org/d.csv", size_bytes=7, sha256=HEX),
    ]  # fmt: skip

    assert "not both" in mistake(capsys, "/d/a.csv", "--remote", "s3://lake/b.csv")
    assert "at least one file" in mistake(capsys)
    assert "put it after that --remote" in mistake(capsys, "--sha256", HEX, "--file", "/d/a")
    assert "put it after that --remote" in mistake(capsys, "--file", "/d/a", "--size", "3")
    twice = mistake(capsys, "--remote", "s3://l/b", "--credentials", "x", "--credentials", "y")
    assert "--credentials is given twice for file 0" in twice
    assert "1 or more" in mistake(capsys, "--remote", "s3://l/b", "--size", "0")
    assert "give both --sha256 and --size" in mistake(
        capsys, "--file", "/d/a", "--remote", "s3://l/b", "--sha256", HEX
    )
    assert "an s3://, http:// or https:// URL" in mistake(capsys, "--remote", "ftp://h/x")
    missing = mistake(capsys, "--remote", http_source.url("/files/missing.csv"))
    assert "file 0 could not be measured (HTTP 404)" in missing


def test_a_remote_file_without_its_facts_is_measured_on_the_owners_side(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    http_source: HttpSource,
    s3_server: S3Server,
    s3_bucket: str,
) -> None:
    served = bytes(range(256)) * 8192 + b"tail"  # 2 MiB and a bit: several chunks
    http_url = http_source.serve("big.bin", served)
    s3_content = b"s3 object\n"
    s3_server.put_object(s3_bucket, "k/object.txt", s3_content)
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)

    files = dataset_files(
        "--remote", http_url,
        "--remote", f"s3://{s3_bucket}/k/object.txt", "--credentials", "lake",
        "--remote", f"s3://{s3_bucket}/k/missing.txt", "--size", "9", "--sha256", HEX,
    )  # fmt: skip
    assert files == [
        pb.DatasetFileLocation(
            url=http_url, size_bytes=len(served), sha256=hashlib.sha256(served).hexdigest()
        ),
        pb.DatasetFileLocation(
            url=f"s3://{s3_bucket}/k/object.txt",
            size_bytes=len(s3_content),
            sha256=hashlib.sha256(s3_content).hexdigest(),
            credentials="lake",
        ),
        # Given with its facts: not fetched (it does not even exist).
        pb.DatasetFileLocation(url=f"s3://{s3_bucket}/k/missing.txt", size_bytes=9, sha256=HEX),
    ]
    progress = capsys.readouterr().err
    assert f"c2d: file 0: {len(served)} bytes, sha256 {hashlib.sha256(served).hexdigest()}" in (
        progress
    )
    assert "c2d: file 1: 10 bytes" in progress and "file 2" not in progress
    gone = mistake(capsys, "--remote", f"s3://{s3_bucket}/k/missing.txt")
    assert "file 0 could not be measured (NoSuchKey)" in gone


@needs_root
def test_the_owner_publishes_local_and_remote_files_from_the_command_line(
    node: Node,  # noqa: F811
    http_source: HttpSource,
) -> None:
    local = node.data_file("visits.csv", "1,a\n2,b\n")
    remote = b"code,label\n"
    http_url = http_source.serve("codes.csv", remote)
    s3_url = "s3://lake/visits/2024.parquet"
    published = json.loads(
        ok(
            node.c2d(
                "dataset", "publish", "--json",
                "--file", str(local),
                "--remote", s3_url, "--sha256", HEX, "--size", "4096", "--credentials", "lake",
                "--remote", http_url,
            )
        )
    )  # fmt: skip
    assert published["metadata"]["title"] == "visits.csv"
    assert [(f.get("index", 0), f["sizeBytes"], f["sha256"]) for f in published["files"]] == [
        (0, "8", hashlib.sha256(b"1,a\n2,b\n").hexdigest()),
        (1, "4096", HEX),
        (2, str(len(remote)), hashlib.sha256(remote).hexdigest()),
    ]
    shown = ok(node.c2d("dataset", "show", published["did"]))
    for location in (str(local), s3_url, http_url, "lake"):
        assert location not in shown

    # A URL with a secret in it is refused by the Provider, which never repeats it.
    refusal = refused(
        node.c2d(
            "dataset", "publish",
            "--remote", "https://reader:hunter2@data.example.org/x.csv",
            "--sha256", HEX, "--size", "3",
        ),
        "INVALID_ARGUMENT",
    )  # fmt: skip
    assert "files[0].url" in refusal and "hunter2" not in refusal
