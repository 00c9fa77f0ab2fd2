"""The data owner's control through the REST edge, as a market integration drives it: policy
edits with their versions, an approval request reviewed on the sample and approved, viewers,
limits refused up front, the provider's identity and a job's provenance checked offline.

Bodies are proto3 JSON; each signature is computed over the protobuf request parsed from the
same body plus the path's name, so it only verifies when the gateway transcodes faithfully."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import pytest
from c2d.provider.v1 import provider_pb2 as pb
from google.protobuf import json_format

from mesh.provenance import ProvenanceError, verify_document
from sdk.client import Client
from tests.conftest import Rest, needs_root, new_key
from tests.e2e.test_rest import bearer, error_info, error_of, signed

pytestmark = needs_root

COUNT = b"""
import json, os
dataset = json.loads(os.environ["DIDS"])[0]
rows = open(f"/data/inputs/{dataset}/0").read().split()
params = json.load(open("/data/inputs/algoCustomData.json"))
print("rows", len(rows), "k", params["k"], flush=True)
open("/data/outputs/count.txt", "w").write(str(len(rows)))
"""


async def call(
    rest: Rest,
    client: Client,
    method: str,
    path: str,
    command: str,
    body: dict[str, Any] | None = None,
    name: str = "",
) -> Any:
    """A signed REST call; the signature covers the request the body and `name` make."""
    message = json_format.ParseDict(body or {}, getattr(pb, f"{command}Request")())
    if name:
        message.name = name  # type: ignore[attr-defined]
    headers = signed(client, command, message)
    if method == "GET":
        return await rest.http.get(path, headers=headers)
    return await rest.http.post(path, json=body or {}, headers=headers)


async def final_state(client: Client, name: str) -> Any:
    """The job once the watch ends, which it does after the final state."""
    seen = [job async for job in client.watch_job(name)]
    return seen[-1]


def ok(response: Any) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_the_owner_reviews_and_approves_over_rest(rest: Rest) -> None:
    mesh = rest.mesh
    consumer_key, viewer_key, stranger_key = new_key(), new_key(), new_key()
    async with (
        mesh.client(mesh.owner) as owner,
        mesh.client(consumer_key) as consumer,
        mesh.client(viewer_key) as viewer,
        mesh.client(stranger_key) as stranger,
    ):
        info = ok(await rest.http.get("/v1/providerInfo"))
        provider_address = info["address"]
        assert info["owners"] == [mesh.owner.address]

        declaration = [
            {"name": "k", "type": "PARAMETER_TYPE_INTEGER", "required": True, "minimum": 1}
        ]
        algorithm = ok(
            await call(
                rest,
                consumer,
                "POST",
                "/v1/algorithms",
                "PublishAlgorithm",
                {
                    "requestId": uuid.uuid4().hex,
                    "code": base64.b64encode(COUNT).decode(),
                    "entrypoint": "python3 $ALGO",
                    "parameters": declaration,
                },
            )
        )["algorithm"]
        assert algorithm["access"] == "ALGORITHM_ACCESS_PRIVATE"
        # The private code is withheld from a stranger, with the reason.
        denied = await call(
            rest,
            stranger,
            "GET",
            f"/v1/{algorithm['name']}:download",
            "DownloadAlgorithm",
            name=algorithm["name"],
        )
        error = error_of(denied, 403, "PERMISSION_DENIED")
        assert error_info(error)["reason"] == "ALGORITHM_PRIVATE"
        assert b"rows" not in denied.content

        data = mesh.data_file(f"d-{uuid.uuid4().hex}.txt", b"".join(b"%d\n" % i for i in range(9)))
        sample_file = mesh.data_file(f"s-{uuid.uuid4().hex}.txt", b"1\n2\n3\n")
        dataset = ok(
            await call(
                rest,
                owner,
                "POST",
                "/v1/datasets",
                "PublishDataset",
                {"requestId": uuid.uuid4().hex, "filePaths": [str(data)]},
            )
        )["dataset"]
        assert dataset["policyVersion"] == "1"
        ok(
            await call(
                rest,
                owner,
                "POST",
                "/v1/datasets",
                "PublishDataset",
                {
                    "requestId": uuid.uuid4().hex,
                    "filePaths": [str(sample_file)],
                    "sampleOf": dataset["name"],
                },
            )
        )

        # A policy edit over REST: a bound, then a stale version is refused.
        policy_path = f"/v1/{dataset['name']}:setPolicy"
        bound = {"policy": {"parameterBounds": [{"name": "k", "minimum": 5}]}}
        edited = ok(
            await call(
                rest,
                owner,
                "POST",
                policy_path,
                "UpdateDatasetPolicy",
                {**bound, "expectedPolicyVersion": "1"},
                dataset["name"],
            )
        )["dataset"]
        assert edited["policyVersion"] == "2"
        stale = await call(
            rest,
            owner,
            "POST",
            policy_path,
            "UpdateDatasetPolicy",
            {**bound, "expectedPolicyVersion": "1"},
            dataset["name"],
        )
        error_of(stale, 409, "ABORTED")
        not_owner = await call(
            rest, consumer, "POST", policy_path, "UpdateDatasetPolicy", bound, dataset["name"]
        )
        error_of(not_owner, 403, "PERMISSION_DENIED")

        start = {
            "requestId": uuid.uuid4().hex,
            "dataset": dataset["name"],
            "algorithm": algorithm["name"],
            "parameters": {"k": 5},
        }
        untrusted = await call(rest, consumer, "POST", "/v1/jobs", "StartCompute", start)
        assert error_info(error_of(untrusted, 403, "PERMISSION_DENIED"))["reason"] == (
            "ALGORITHM_NOT_TRUSTED"
        )

        # The approval request, over REST from both sides.
        request = ok(
            await call(
                rest,
                consumer,
                "POST",
                "/v1/approvalRequests",
                "CreateApprovalRequest",
                {
                    "requestId": uuid.uuid4().hex,
                    "dataset": dataset["name"],
                    "algorithm": algorithm["name"],
                    "message": "please",
                    "parameters": {"k": 5},
                },
            )
        )["approvalRequest"]
        assert request["state"] == "APPROVAL_STATE_PENDING"
        name = request["name"]
        owner_token = await bearer(owner)
        listed = ok(
            await rest.http.get(
                "/v1/approvalRequests?state=APPROVAL_STATE_PENDING", headers=owner_token
            )
        )
        assert [r["name"] for r in listed["approvalRequests"]] == [name]
        error_of(
            await rest.http.get(f"/v1/{name}", headers=await bearer(stranger)), 404, "NOT_FOUND"
        )
        code = await rest.http.get(f"/v1/{algorithm['name']}:download", headers=owner_token)
        assert code.status_code == 200 and code.content == COUNT, code.text
        assert code.headers["etag"] == f'"{algorithm["filesChecksum"]}"'
        tail = await rest.http.get(
            f"/v1/{algorithm['name']}:download", headers={**owner_token, "Range": "bytes=10-"}
        )
        assert tail.status_code == 206 and tail.content == COUNT[10:], tail.text

        sample_job = ok(
            await call(
                rest,
                owner,
                "POST",
                f"/v1/{name}:runSample",
                "RunApprovalSample",
                {"requestId": uuid.uuid4().hex},
                name,
            )
        )["job"]
        final = await final_state(owner, sample_job["name"])
        assert final.state == final.STATE_SUCCEEDED, final.message

        approve_body = {
            "filesChecksum": request["filesChecksum"],
            "containerSectionChecksum": request["containerSectionChecksum"],
            "note": "ok",
        }
        approved = ok(
            await call(
                rest,
                owner,
                "POST",
                f"/v1/{name}:approve",
                "ApproveApprovalRequest",
                approve_body,
                name,
            )
        )
        assert approved["approvalRequest"]["state"] == "APPROVAL_STATE_APPROVED"
        assert approved["dataset"]["policyVersion"] == "3"
        again = await call(
            rest, owner, "POST", f"/v1/{name}:approve", "ApproveApprovalRequest", approve_body, name
        )
        error_of(again, 400, "FAILED_PRECONDITION")

        # Limits above the environment's are refused up front, naming the field.
        environments = ok(await rest.http.get("/v1/environments"))["environments"]
        default = next(e for e in environments if e["name"] == "default")
        assert "maxQueueWait" in default and "maxQueuedJobs" in default
        too_much = {
            **start,
            "requestId": uuid.uuid4().hex,
            "resources": {"memoryBytes": str(int(default["memoryBytes"]) * 2)},
        }
        error = error_of(
            await call(rest, consumer, "POST", "/v1/jobs", "StartCompute", too_much),
            400,
            "INVALID_ARGUMENT",
        )
        assert "resources.memory_bytes" in json.dumps(error)
        below_bound = {**start, "requestId": uuid.uuid4().hex, "parameters": {"k": 2}}
        error = error_of(
            await call(rest, consumer, "POST", "/v1/jobs", "StartCompute", below_bound),
            400,
            "INVALID_ARGUMENT",
        )
        assert "parameters.k" in json.dumps(error)

        # The approved algorithm runs, with a viewer.
        job = ok(
            await call(
                rest,
                consumer,
                "POST",
                "/v1/jobs",
                "StartCompute",
                {**start, "requestId": uuid.uuid4().hex, "viewers": [viewer_key.address]},
            )
        )["job"]
        done = await final_state(consumer, job["name"])
        assert done.state == done.STATE_SUCCEEDED, done.message
        viewer_token = await bearer(viewer)
        seen = ok(await rest.http.get(f"/v1/{job['name']}", headers=viewer_token))["job"]
        assert seen["viewers"] == [viewer_key.address]
        error_of(
            await rest.http.get(f"/v1/{job['name']}", headers=await bearer(stranger)),
            404,
            "NOT_FOUND",
        )

        # Its provenance over REST verifies offline against the pinned address only.
        document = ok(await rest.http.get(f"/v1/{job['name']}:provenance", headers=viewer_token))[
            "document"
        ].encode()
        record = verify_document(document, provider_address)
        assert record["job"] == job["name"]
        assert [d["policy_version"] for d in record["datasets"]] == [3]
        assert [r["name"] for r in record["results"] if r["name"] == "count.txt"]
        with pytest.raises(ProvenanceError):
            verify_document(document, mesh.owner.address)
