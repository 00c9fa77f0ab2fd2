"""Whole jobs through the REST edge: httpx -> gateway (uvicorn) -> Provider -> Operator Service
-> Engine, all real and in this event loop. Request bodies are written by hand in proto3 JSON;
the signing headers are computed by the SDK over the equivalent protobuf request built from the
same values, so a signature only verifies when the gateway transcodes the body faithfully."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
from c2d.provider.v1 import provider_pb2 as pb
from google.api import annotations_pb2
from google.protobuf import duration_pb2
from google.protobuf.message import Message

from sdk.client import Client
from tests.conftest import Rest, needs_root, new_key
from tests.sse import Event, read_events

pytestmark = needs_root

ENTRYPOINT = "python3 $ALGO"
# It sleeps a little so that a watch started just after the job sees it running.
SUM_ALGORITHM = b"""
import json, os, time
time.sleep(0.5)
total = 0
for dataset_id in json.loads(os.environ["DIDS"]):
    folder = os.path.join("/data/inputs", dataset_id)
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name)) as f:
            total += sum(int(line) for line in f if line.strip())
print("total", total, flush=True)
with open("/data/outputs/total.json", "w") as f:
    json.dump({"total": total, "padding": "x" * 100}, f)
"""
LIVE_ALGORITHM = b"import time\nprint('A', flush=True)\ntime.sleep(3)\nprint('B', flush=True)\n"
ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"


# -- helpers ---------------------------------------------------------------------------------


def signed(client: Client, command: str, message: Message) -> dict[str, str]:
    return dict(client.signature_metadata(command, message))


async def bearer(client: Client) -> dict[str, str]:
    return dict(await client.token_metadata())


def error_of(response: httpx.Response, http_code: int, status: str) -> dict[str, Any]:
    """The `error` object of a JSON error response, after checking its shape."""
    assert response.status_code == http_code, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == {"code", "status", "message", "details"}
    assert error["code"] == http_code
    assert error["status"] == status
    assert isinstance(error["message"], str) and error["message"]
    return error


def error_info(error: dict[str, Any]) -> dict[str, Any]:
    infos = [d for d in error["details"] if d.get("@type") == ERROR_INFO]
    assert infos, f"no ErrorInfo in {error['details']}"
    info: dict[str, Any] = infos[0]
    return info


async def sse(response: httpx.Response) -> AsyncIterator[Event]:
    """The events of a stream, as they arrive, after checking it is one."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    async for item in read_events(response):
        if isinstance(item, Event):
            yield item


async def events(
    http: httpx.AsyncClient, path: str, headers: dict[str, str], *, name: str
) -> list[Event]:
    async with http.stream("GET", path, headers=headers) as response:
        received = [event async for event in sse(response)]
    assert received
    assert all(event.name == name for event in received), [e.name for e in received]
    return received


def metadata_json(title: str) -> dict[str, Any]:
    return {"title": title, "description": "d", "author": "a", "license": "MIT", "tags": ["t"]}


def metadata_pb(title: str) -> pb.AssetMetadata:
    return pb.AssetMetadata(title=title, description="d", author="a", license="MIT", tags=["t"])


async def publish_algorithm(rest: Rest, client: Client, code: bytes) -> dict[str, Any]:
    request_id = uuid.uuid4().hex
    body = {
        "requestId": request_id,
        "metadata": metadata_json("algo"),
        "code": base64.b64encode(code).decode(),
        "entrypoint": ENTRYPOINT,
    }
    message = pb.PublishAlgorithmRequest(
        request_id=request_id, metadata=metadata_pb("algo"), code=code, entrypoint=ENTRYPOINT
    )
    response = await rest.http.post(
        "/v1/algorithms", json=body, headers=signed(client, "PublishAlgorithm", message)
    )
    assert response.status_code == 200, response.text
    algorithm: dict[str, Any] = response.json()["algorithm"]
    assert algorithm["sizeBytes"] == str(len(code))
    assert algorithm["entrypoint"] == ENTRYPOINT
    return algorithm


def dataset_request(
    paths: Sequence[Path], trusted: Sequence[dict[str, Any]]
) -> tuple[dict[str, Any], pb.PublishDatasetRequest]:
    request_id = uuid.uuid4().hex
    body: dict[str, Any] = {
        "requestId": request_id,
        "metadata": metadata_json("numbers"),
        "filePaths": [str(p) for p in paths],
    }
    message = pb.PublishDatasetRequest(
        request_id=request_id, metadata=metadata_pb("numbers"), file_paths=[str(p) for p in paths]
    )
    if trusted:
        keys = ("did", "filesChecksum", "containerSectionChecksum")
        body["policy"] = {
            "publisherTrustedAlgorithms": [{k: a[k] for k in keys} for a in trusted],
            "timeout": "600s",
        }
        message.policy.CopyFrom(
            pb.ComputePolicy(
                publisher_trusted_algorithms=[
                    pb.TrustedAlgorithm(
                        did=a["did"],
                        files_checksum=a["filesChecksum"],
                        container_section_checksum=a["containerSectionChecksum"],
                    )
                    for a in trusted
                ],
                timeout=duration_pb2.Duration(seconds=600),
            )
        )
    return body, message


async def publish_dataset(
    rest: Rest, client: Client, trusted: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    data = rest.mesh.data_file(f"numbers-{uuid.uuid4().hex}.txt", b"1\n2\n3\n")
    body, message = dataset_request([data], trusted)
    response = await rest.http.post(
        "/v1/datasets", json=body, headers=signed(client, "PublishDataset", message)
    )
    assert response.status_code == 200, response.text
    dataset: dict[str, Any] = response.json()["dataset"]
    assert dataset["did"] == "did:c2d:" + dataset["name"].removeprefix("datasets/")
    assert str(data) not in response.text  # the public record never says where files are
    return dataset


def compute_request(dataset: str, algorithm: str) -> tuple[dict[str, Any], pb.StartComputeRequest]:
    request_id = uuid.uuid4().hex
    body = {"requestId": request_id, "dataset": dataset, "algorithm": algorithm}
    message = pb.StartComputeRequest(request_id=request_id, dataset=dataset, algorithm=algorithm)
    return body, message


async def start_compute(
    rest: Rest, client: Client, dataset: dict[str, Any], algorithm: dict[str, Any]
) -> dict[str, Any]:
    body, message = compute_request(dataset["name"], algorithm["name"])
    response = await rest.http.post(
        "/v1/jobs", json=body, headers=signed(client, "StartCompute", message)
    )
    assert response.status_code == 200, response.text
    job: dict[str, Any] = response.json()["job"]
    assert re.fullmatch(r"jobs/[0-9a-f]{32}", job["name"])
    return job


# -- a whole job -----------------------------------------------------------------------------


async def test_a_whole_job_over_rest(rest: Rest) -> None:
    http = rest.http
    consumer_key = new_key()
    async with (
        rest.mesh.client(rest.mesh.owner) as owner,
        rest.mesh.client(consumer_key) as consumer,
    ):
        algorithm = await publish_algorithm(rest, owner, SUM_ALGORITHM)
        dataset = await publish_dataset(rest, owner, [algorithm])
        assert dataset["policy"]["publisherTrustedAlgorithms"][0]["did"] == algorithm["did"]

        # A bearer token, created over REST too.
        token_request = pb.CreateAuthTokenRequest(valid_for=duration_pb2.Duration(seconds=600))
        created = await http.post(
            "/v1/authTokens",
            json={"validFor": "600s"},
            headers=signed(consumer, "CreateAuthToken", token_request),
        )
        assert created.status_code == 200, created.text
        token = {"Authorization": f"Bearer {created.json()['token']}"}

        job = await start_compute(rest, consumer, dataset, algorithm)
        assert job["owner"] == consumer_key.address
        path = f"/v1/{job['name']}"

        watched = await events(http, f"{path}:watch", token, name="WatchJobResponse")
        jobs = [json.loads(event.data)["job"] for event in watched]
        assert all(j["name"] == job["name"] for j in jobs)
        assert all({"state", "statusCode", "statusText"} <= set(j) for j in jobs), jobs
        states = [j["state"] for j in jobs]
        assert states[-1] == "STATE_SUCCEEDED", jobs[-1]
        assert "STATE_RUNNING" in states
        assert states.count("STATE_SUCCEEDED") == 1  # the stream ends after the final state
        assert any(j.get("statusCode") == 40 for j in jobs)
        final = jobs[-1]
        assert final["statusCode"] == 70 and final["statusText"] == "Job finished"

        # Logs: each event's id is the offset to resume from.
        logs = await events(http, f"{path}:streamLogs", token, name="StreamJobLogsResponse")
        chunks = [json.loads(event.data)["chunk"] for event in logs]
        assert "".join(c.get("text", "") for c in chunks) == "total 6\n"
        assert [event.id for event in logs] == [c["nextOffset"] for c in chunks]
        assert logs[-1].id == str(len("total 6\n"))
        # Resuming after the last event sends nothing again.
        resumed = await rest.http.get(
            f"{path}:streamLogs", headers={**token, "Last-Event-ID": logs[-1].id or ""}
        )
        assert resumed.status_code == 200
        assert "total" not in resumed.text

        # Results: the raw bytes, as an attachment, resumable with Range.
        output = next(r for r in final["results"] if r["name"] == "total.json")
        download = f"{path}/results/{output.get('index', 0)}:download"
        whole = await http.get(download, headers=token)
        assert whole.status_code == 200, whole.text
        assert whole.headers["content-disposition"].startswith("attachment")
        assert whole.headers["content-type"] == "application/octet-stream"
        assert json.loads(whole.content)["total"] == 6
        assert len(whole.content) == int(output["sizeBytes"])
        assert hashlib.sha256(whole.content).hexdigest() == output["sha256"]
        start = 10
        part = await http.get(download, headers={**token, "Range": f"bytes={start}-"})
        assert part.status_code == 206, part.text
        size = len(whole.content)
        assert part.headers["content-range"] == f"bytes {start}-{size - 1}/{size}"
        assert part.content == whole.content[start:]

        # The same job read over REST, then listed, then deleted.
        got = await http.get(path, headers=token)
        assert got.status_code == 200 and got.json()["job"]["state"] == "STATE_SUCCEEDED"
        listed = await http.get("/v1/jobs", headers=token)
        assert [j["name"] for j in listed.json()["jobs"]] == [job["name"]]
        deleted = await http.delete(
            path, headers=signed(consumer, "DeleteJob", pb.DeleteJobRequest(name=job["name"]))
        )
        assert deleted.status_code == 200, deleted.text
        assert deleted.json() == {}
        error_of(await http.get(path, headers=token), 404, "NOT_FOUND")


async def test_log_lines_arrive_live_and_resume_from_last_event_id(rest: Rest) -> None:
    """Also, while the job runs: someone else cannot see it, and it cannot be deleted."""
    http = rest.http
    async with (
        rest.mesh.client(rest.mesh.owner) as owner,
        rest.mesh.client(new_key()) as stranger,
    ):
        algorithm = await publish_algorithm(rest, owner, LIVE_ALGORITHM)
        dataset = await publish_dataset(rest, owner, [algorithm])
        job = await start_compute(rest, owner, dataset, algorithm)
        path = f"/v1/{job['name']}"
        token = await bearer(owner)

        arrivals: dict[str, float] = {}
        received: list[Event] = []
        checked = False
        async with http.stream("GET", f"{path}:streamLogs", headers=token) as response:
            async for event in sse(response):
                assert event.name == "StreamJobLogsResponse"
                received.append(event)
                text = json.loads(event.data)["chunk"].get("text", "")
                for letter in "AB":
                    if letter in text:
                        arrivals.setdefault(letter, event.received_at)
                if "A" in arrivals and "B" not in arrivals and not checked:
                    checked = True
                    await check_running_job(rest, owner, stranger, job["name"])
        assert checked
        # B is printed 3 s after A: A must have come through at once, not with B.
        assert arrivals["B"] - arrivals["A"] >= 2.5, arrivals

        # Reconnecting with the id of the event that carried A resumes after it.
        a_event = next(e for e in received if "A" in json.loads(e.data)["chunk"].get("text", ""))
        assert a_event.id is not None
        rest_of_log = await events(
            http,
            f"{path}:streamLogs",
            {**token, "Last-Event-ID": a_event.id},
            name="StreamJobLogsResponse",
        )
        chunks = [json.loads(e.data)["chunk"] for e in rest_of_log]
        assert chunks[0]["offset"] == a_event.id
        assert "".join(c.get("text", "") for c in chunks) == "B\n"


async def check_running_job(rest: Rest, owner: Client, stranger: Client, name: str) -> None:
    http = rest.http
    path = f"/v1/{name}"
    # DELETE while it runs: FAILED_PRECONDITION, which is 400.
    refused = await http.delete(
        path, headers=signed(owner, "DeleteJob", pb.DeleteJobRequest(name=name))
    )
    error_of(refused, 400, "FAILED_PRECONDITION")
    # Someone else's job does not exist, whichever way it is asked for.
    other = await bearer(stranger)
    error_of(await http.get(path, headers=other), 404, "NOT_FOUND")
    error_of(await http.get(f"{path}:watch", headers=other), 404, "NOT_FOUND")
    error_of(await http.get(f"{path}:streamLogs", headers=other), 404, "NOT_FOUND")
    stop = await http.post(
        f"{path}:stop", json={}, headers=signed(stranger, "StopJob", pb.StopJobRequest(name=name))
    )
    error_of(stop, 404, "NOT_FOUND")


# -- errors ----------------------------------------------------------------------------------


async def test_refusals_have_the_right_http_code_and_json_error(rest: Rest, tmp_path: Path) -> None:
    http = rest.http
    async with (
        rest.mesh.client(rest.mesh.owner) as owner,
        rest.mesh.client(new_key()) as consumer,
    ):
        algorithm = await publish_algorithm(rest, owner, SUM_ALGORITHM)
        dataset = await publish_dataset(rest, owner, [algorithm])
        body, message = compute_request(dataset["name"], algorithm["name"])

        # Unsigned.
        unsigned = error_of(await http.post("/v1/jobs", json=body), 401, "UNAUTHENTICATED")
        assert error_info(unsigned)["reason"] == "SIGNATURE_REQUIRED"
        # A signature over other content: the digest does not match this body.
        _, other_message = compute_request(dataset["name"], algorithm["name"])
        moved = await http.post(
            "/v1/jobs", json=body, headers=signed(consumer, "StartCompute", other_message)
        )
        error_of(moved, 401, "UNAUTHENTICATED")
        # The right signature works once; the same headers again reuse the nonce.
        headers = signed(consumer, "StartCompute", message)
        first = await http.post("/v1/jobs", json=body, headers=headers)
        assert first.status_code == 200, first.text
        job_name = first.json()["job"]["name"]
        replayed = error_of(
            await http.post("/v1/jobs", json=body, headers=headers), 401, "UNAUTHENTICATED"
        )
        assert error_info(replayed)["reason"] == "NONCE_REUSED"

        # A consumer may not publish datasets.
        data = rest.mesh.data_file("mine.txt", b"1\n")
        ds_body, ds_message = dataset_request([data], [])
        not_owner = await http.post(
            "/v1/datasets", json=ds_body, headers=signed(consumer, "PublishDataset", ds_message)
        )
        assert error_info(error_of(not_owner, 403, "PERMISSION_DENIED"))["reason"] == (
            "NOT_A_DATA_OWNER"
        )

        # A file outside the data root: 400, without echoing where it is.
        secret = tmp_path / "outside" / "secret-location.csv"
        secret.parent.mkdir()
        secret.write_text("1\n")
        secret.chmod(0o644)
        ds_body, ds_message = dataset_request([secret], [])
        outside = await http.post(
            "/v1/datasets", json=ds_body, headers=signed(owner, "PublishDataset", ds_message)
        )
        outside_error = error_of(outside, 400, "INVALID_ARGUMENT")
        assert "secret-location" not in outside.text
        assert str(rest.mesh.data_root) not in outside.text
        assert error_info(outside_error)["metadata"]["field"] == "file_paths[0]"

        # Bodies the gateway cannot turn into the request message.
        malformed = await http.post(
            "/v1/jobs", content=b'{"dataset": ', headers={"content-type": "application/json"}
        )
        assert error_info(error_of(malformed, 400, "INVALID_ARGUMENT"))["reason"] == (
            "INVALID_JSON"
        )
        for bad_body, field in (
            ({**body, "bogusField": 1}, "bogusField"),
            ({**body, "rawAlgorithm": {"cod": "x"}}, "rawAlgorithm.cod"),
            ({**body, "dataset": 5}, "dataset"),
        ):
            bad = error_of(await http.post("/v1/jobs", json=bad_body), 400, "INVALID_ARGUMENT")
            assert error_info(bad)["metadata"]["field"] == field
            assert field.rpartition(".")[2] in bad["message"]

        # Jobs that are unknown, or not jobs at all.
        token = await bearer(consumer)
        unknown = await http.get("/v1/jobs/" + "0" * 32, headers=token)
        error_of(unknown, 404, "NOT_FOUND")
        not_a_job = error_of(
            await http.get("/v1/jobs/not-a-job", headers=token), 400, "INVALID_ARGUMENT"
        )
        assert error_info(not_a_job)["metadata"]["field"] == "name"

        # An algorithm the dataset does not trust.
        untrusting = await publish_dataset(rest, owner, [])
        body, message = compute_request(untrusting["name"], algorithm["name"])
        untrusted = await http.post(
            "/v1/jobs", json=body, headers=signed(consumer, "StartCompute", message)
        )
        untrusted_error = error_of(untrusted, 403, "PERMISSION_DENIED")
        assert error_info(untrusted_error)["reason"] == "ALGORITHM_NOT_TRUSTED"
        assert untrusting["name"] in untrusted_error["message"]

        # Let the accepted job end before the mesh stops.
        await events(http, f"/v1/{job_name}:watch", token, name="WatchJobResponse")


# -- the service endpoints -------------------------------------------------------------------


def _shape(path: str) -> str:
    """A path with every variable replaced by `*`, as written in OpenAPI (`{job}`) or in an
    HttpRule (`{name=jobs/*}`, `{name}`)."""
    return re.sub(r"\{[^}=]+=([^}]+)\}|\{[^}]+\}", lambda m: m.group(1) or "*", path)


async def test_openapi_lists_every_provider_route_and_health_is_ok(rest: Rest) -> None:
    response = await rest.http.get("/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"].startswith("3.1")
    served = {
        (method, _shape(path), operation["operationId"])
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if isinstance(operation, dict) and "operationId" in operation
    }
    expected = set()
    service = pb.DESCRIPTOR.services_by_name["ProviderService"]
    for method in service.methods:
        rule = method.GetOptions().Extensions[annotations_pb2.http]
        for binding in [rule, *rule.additional_bindings]:
            verb = binding.WhichOneof("pattern")
            assert verb is not None and verb != "custom"
            expected.add((verb, _shape(getattr(binding, verb)), method.name))
    assert {name for _, _, name in expected} == {m.name for m in service.methods}
    assert expected <= served, expected - served

    health = await rest.http.get("/healthz")
    assert health.status_code == 200
    assert health.json() == {"status": "SERVING"}
