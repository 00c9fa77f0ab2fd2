"""The consumer's choice of results and delivery at the REST edge: POST /v1/jobs takes
`results` by name and `delivery` in both forms (S3, and upload URLs as a JSON map) through the
generic proto-JSON path, signed over the same digest as gRPC; the OpenAPI document shows them;
and no response ever echoes a secret."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from c2d.provider.v1 import provider_pb2 as pb
from google.protobuf import json_format

from mesh import delivery
from sdk.client import Client
from tests.conftest import Rest, needs_root, new_key, rest_edge, start_local_mesh
from tests.e2e.test_job import publish_pair, run_to_end
from tests.e2e.test_rest import bearer, error_info, error_of, signed
from tests.s3_server import S3Server

pytestmark = needs_root

SECRET = "rest-delivery-secret-" + uuid.uuid4().hex
URL_SIGNATURE = "X-Amz-Signature=" + uuid.uuid4().hex


@pytest.fixture(autouse=True)
def _no_allowed_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(delivery.ALLOW_HOSTS_ENV, raising=False)


def s3_json(endpoint: str, bucket: str = "consumer-results") -> dict[str, Any]:
    return {
        "s3": {
            "endpoint": endpoint,
            "bucket": bucket,
            "prefix": "runs/",
            "accessKeyId": "AKIACONSUMER",
            "secretAccessKey": SECRET,
        }
    }


def urls_json(host: str) -> dict[str, Any]:
    return {
        "uploadUrls": {
            "urls": {
                "total.json": f"https://{host}/put/total?{URL_SIGNATURE}",
                "logs/algorithm.log": f"https://{host}/put/log?{URL_SIGNATURE}",
            }
        }
    }


async def post_start(
    http: httpx.AsyncClient, consumer: Client, dataset: str, algorithm: str, **choice: Any
) -> httpx.Response:
    """POST /v1/jobs with `choice` in the body, signed over the message the body parses to."""
    body = {"requestId": uuid.uuid4().hex, "dataset": dataset, "algorithm": algorithm, **choice}
    message = json_format.ParseDict(body, pb.StartComputeRequest())
    response = await http.post(
        "/v1/jobs", json=body, headers=signed(consumer, "StartCompute", message)
    )
    assert SECRET not in response.text and URL_SIGNATURE not in response.text
    return response


async def test_the_openapi_document_shows_the_choice(rest: Rest) -> None:
    document = (await rest.http.get("/openapi.json")).json()
    schemas = document["components"]["schemas"]
    start = schemas["c2d.provider.v1.StartComputeRequest"]["properties"]
    assert start["results"]["$ref"].endswith("/c2d.common.v1.ResultSelection")
    assert start["delivery"]["$ref"].endswith("/c2d.common.v1.ResultDelivery")
    assert "RESULT_SELECTION_OUTPUTS" in schemas["c2d.common.v1.ResultSelection"]["enum"]
    destination = schemas["c2d.common.v1.ResultDelivery"]["properties"]
    assert set(destination) == {"s3", "uploadUrls"}
    assert set(schemas["c2d.common.v1.S3Delivery"]["properties"]) == {
        "endpoint",
        "region",
        "bucket",
        "prefix",
        "accessKeyId",
        "secretAccessKey",
        "sessionToken",
    }
    urls = schemas["c2d.common.v1.UploadUrls"]["properties"]["urls"]
    assert urls["type"] == "object" and urls["additionalProperties"] == {"type": "string"}
    job = schemas["c2d.common.v1.Job"]["properties"]
    assert job["resultSelection"]["$ref"].endswith("/c2d.common.v1.ResultSelection")
    assert job["delivery"]["$ref"].endswith("/c2d.common.v1.DeliveryStatus")


async def test_both_forms_parse_and_sign_like_grpc_and_are_refused_alike(rest: Rest) -> None:
    async with (
        rest.mesh.client(rest.mesh.owner) as owner,
        rest.mesh.client(new_key()) as consumer,
    ):
        algorithm, dataset = await publish_pair(rest.mesh, owner)
        names = (dataset.name, algorithm.name)
        # Parsed, signed and checked as over gRPC: refused for the destination (loopback,
        # not allowed on this node), not for the signature (401) or the body (400).
        for destination in (s3_json("https://127.0.0.1:9000"), urls_json("127.0.0.1")):
            response = await post_start(
                rest.http,
                consumer,
                *names,
                results="RESULT_SELECTION_OUTPUTS",
                delivery=destination,
            )
            error = error_of(response, 403, "PERMISSION_DENIED")
            assert error_info(error)["reason"] == delivery.REFUSED
        malformed = await post_start(
            rest.http, consumer, *names, delivery=s3_json("https://s3.example.invalid", "A_B")
        )
        error = error_of(malformed, 400, "INVALID_ARGUMENT")
        assert error_info(error)["metadata"]["field"] == "delivery.s3.bucket"
        unknown = await post_start(rest.http, consumer, *names, results=9)
        assert error_info(error_of(unknown, 400, "INVALID_ARGUMENT"))["metadata"] == {
            "field": "results"
        }
        # A name the enum does not have is the edge's own refusal, before any signature check.
        misspelt = await rest.http.post(
            "/v1/jobs",
            json={"dataset": dataset.name, "results": "RESULT_SELECTION_ALL"},
            headers=signed(consumer, "StartCompute", pb.StartComputeRequest()),
        )
        error = error_of(misspelt, 400, "INVALID_ARGUMENT")
        assert error_info(error)["metadata"]["field"] == "results"


async def test_a_job_started_over_rest_reports_its_choice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3_server: S3Server, s3_bucket: str
) -> None:
    """Needs the engine's side too (Job.result_selection and Job.delivery)."""
    monkeypatch.setenv(delivery.ALLOW_HOSTS_ENV, s3_server.endpoint_url.removeprefix("http://"))
    async with (
        start_local_mesh(tmp_path) as mesh,
        rest_edge(mesh) as edge,
        mesh.client(mesh.owner) as owner,
        mesh.client(new_key()) as consumer,
    ):
        algorithm, dataset = await publish_pair(mesh, owner)
        response = await post_start(
            edge.http,
            consumer,
            dataset.name,
            algorithm.name,
            results="RESULT_SELECTION_OUTPUTS",
            delivery=s3_json(s3_server.endpoint_url, s3_bucket),
        )
        assert response.status_code == 200, response.text
        name = response.json()["job"]["name"]
        job = await consumer.get_job(name)
        await run_to_end(consumer, job)
        shown = await edge.http.get(f"/v1/{name}", headers=await bearer(consumer))
        assert shown.status_code == 200
        assert SECRET not in shown.text
        got = shown.json()["job"]
        assert got["resultSelection"] == "RESULT_SELECTION_OUTPUTS"
        where = f"s3://{s3_bucket}/runs/{name.removeprefix('jobs/')}/ at "
        assert got["delivery"]["destination"].startswith(where)
