"""The data owner's workflow as the README gives it, through the `c2d` command against `c2d up`:
publish, set a policy, review an approval request on the sample, approve, read the audit log,
and check a job's provenance offline."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli.test_cli import Node, node  # noqa: F401  (the fixture)
from tests.conftest import needs_root

pytestmark = needs_root

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
