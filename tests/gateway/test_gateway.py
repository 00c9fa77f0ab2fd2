"""The REST edge, end to end over real sockets: httpx -> uvicorn -> gateway -> gRPC.

`StandInProvider` below is a stand-in for the Provider, used to test the transcoding alone: it
implements a few ProviderService RPCs with fixed, predictable answers (echoing what it was
sent) so that each test can tell what the gateway turned an HTTP request into. It checks no
signatures and keeps no state; the real Provider is tested in tests/provider and tests/e2e.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest
import structlog
from c2d.common.v1 import job_pb2
from c2d.provider.v1 import provider_pb2, provider_pb2_grpc
from google.protobuf import any_pb2, json_format
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cli.supervisor import free_address
from gateway.app import BackgroundServer, create_app, run_in_background
from gateway.routes import parse_template, split_verb
from tests.sse import Event, read_events

LOG = "line one\nline two\nline three\n"
LOG_CHUNK = 9
CONTENT = bytes(range(256)) * 40  # 10240 bytes
DOWNLOAD_CHUNK = 4096
FORWARDED = ("x-c2d-address", "x-c2d-nonce", "x-c2d-signature", "authorization", "x-request-id")


async def _abort_rich(
    context: grpc.aio.ServicerContext[Any, Any],
    code: grpc.StatusCode,
    message: str,
    reason: str,
    metadata: dict[str, str],
) -> None:
    info = error_details_pb2.ErrorInfo(reason=reason, domain="c2d.mesh", metadata=metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(code=code.value[0], message=message, details=[detail])
    await context.abort(
        code, message, trailing_metadata=(("grpc-status-details-bin", status.SerializeToString()),)
    )


class StandInProvider(provider_pb2_grpc.ProviderServiceServicer):
    """A stand-in for the Provider (see the module docstring)."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()

    async def GetJob(
        self, request: provider_pb2.GetJobRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> provider_pb2.GetJobResponse:
        if request.name == "jobs/denied":
            await _abort_rich(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                "the dataset's policy does not trust this algorithm",
                "ALGORITHM_NOT_TRUSTED",
                {"field": "algorithm", "dataset": "datasets/1"},
            )
        if request.name.startswith("jobs/code-"):
            code = grpc.StatusCode[request.name.removeprefix("jobs/code-")]
            await context.abort(code, f"failing with {code.name}")
        # Echoes the forwarded metadata, so tests can see which headers reached gRPC.
        echoed = {
            key: value for key, value in context.invocation_metadata() or () if key in FORWARDED
        }
        return provider_pb2.GetJobResponse(
            job=job_pb2.Job(
                name=request.name,
                state=job_pb2.Job.STATE_RUNNING,
                message=json.dumps(echoed),
                results=[
                    job_pb2.ResultFile(
                        index=0,
                        name="out.bin",
                        kind=job_pb2.ResultFile.KIND_OUTPUT,
                        size_bytes=len(CONTENT),
                        sha256=hashlib.sha256(CONTENT).hexdigest(),
                    )
                ],
            )
        )

    async def ListJobs(
        self, request: provider_pb2.ListJobsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> provider_pb2.ListJobsResponse:
        return provider_pb2.ListJobsResponse(
            jobs=[job_pb2.Job(name="jobs/a")],
            next_page_token=f"{request.page_size}:{request.page_token}",
        )

    async def StartCompute(
        self,
        request: provider_pb2.StartComputeRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> provider_pb2.StartComputeResponse:
        return provider_pb2.StartComputeResponse(
            job=job_pb2.Job(
                name="jobs/new",
                dataset_ids=[request.dataset, *request.additional_datasets],
                environment=request.environment,
                state=job_pb2.Job.STATE_QUEUED,
                message=json.dumps(json_format.MessageToDict(request.parameters)),
            )
        )

    async def StopJob(
        self, request: provider_pb2.StopJobRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> provider_pb2.StopJobResponse:
        return provider_pb2.StopJobResponse(
            job=job_pb2.Job(name=request.name, state=job_pb2.Job.STATE_CANCELLED)
        )

    async def DeleteJob(
        self, request: provider_pb2.DeleteJobRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> provider_pb2.DeleteJobResponse:
        return provider_pb2.DeleteJobResponse()

    async def WatchJob(
        self, request: provider_pb2.WatchJobRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[provider_pb2.WatchJobResponse]:
        if request.name == "jobs/missing":
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such job")
        yield provider_pb2.WatchJobResponse(
            job=job_pb2.Job(name=request.name, state=job_pb2.Job.STATE_QUEUED)
        )
        # A pause between states: the first event must reach the client before it ends.
        await asyncio.sleep(1.0)
        if request.name == "jobs/broken":
            await _abort_rich(
                context, grpc.StatusCode.INTERNAL, "the engine went away", "ENGINE_LOST", {}
            )
        yield provider_pb2.WatchJobResponse(
            job=job_pb2.Job(name=request.name, state=job_pb2.Job.STATE_SUCCEEDED)
        )

    async def StreamJobLogs(
        self,
        request: provider_pb2.StreamJobLogsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[provider_pb2.StreamJobLogsResponse]:
        if request.name == "jobs/endless":
            try:
                offset = 0
                while True:
                    yield provider_pb2.StreamJobLogsResponse(
                        chunk=job_pb2.LogChunk(offset=offset, next_offset=offset + 1, text=".")
                    )
                    offset += 1
                    await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        offset = request.offset
        while offset < len(LOG):
            text = LOG[offset : offset + LOG_CHUNK]
            yield provider_pb2.StreamJobLogsResponse(
                chunk=job_pb2.LogChunk(offset=offset, next_offset=offset + len(text), text=text)
            )
            offset += len(text)

    async def DownloadResult(
        self,
        request: provider_pb2.DownloadResultRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[provider_pb2.DownloadResultResponse]:
        if request.name == "jobs/corrupt/results/0":
            await _abort_rich(
                context, grpc.StatusCode.DATA_LOSS, "checksum mismatch", "CHECKSUM_MISMATCH", {}
            )
        if request.name != "jobs/done/results/0":
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such result")
        offset = request.offset
        while offset < len(CONTENT):
            yield provider_pb2.DownloadResultResponse(
                offset=offset, data=CONTENT[offset : offset + DOWNLOAD_CHUNK]
            )
            offset += DOWNLOAD_CHUNK


@dataclass
class Edge:
    provider: StandInProvider
    http: httpx.AsyncClient
    gateway: BackgroundServer


@pytest.fixture
async def edge() -> AsyncIterator[Edge]:
    """The stand-in Provider on 127.0.0.1:0 and the gateway in front of it on another port."""
    server = grpc.aio.server()
    servicer = StandInProvider()
    provider_pb2_grpc.add_ProviderServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await health_servicer.set(
        "c2d.provider.v1.ProviderService", health_pb2.HealthCheckResponse.SERVING
    )
    app = create_app(f"127.0.0.1:{port}", keepalive_seconds=0.3)
    gateway = await run_in_background(app)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as http:
        yield Edge(servicer, http, gateway)
    await gateway.stop()
    await server.stop(0)


def _error(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == response.status_code
    return body["error"]  # type: ignore[no-any-return]


# -- unary calls ------------------------------------------------------------------------


async def test_get_with_path_variable(edge: Edge) -> None:
    response = await edge.http.get("/v1/jobs/abc123")
    assert response.status_code == 200
    job = response.json()["job"]
    assert job["name"] == "jobs/abc123"
    # proto3 JSON: lowerCamelCase names, enums by name, 64-bit integers as strings.
    assert job["state"] == "STATE_RUNNING"
    assert job["results"][0]["sizeBytes"] == str(len(CONTENT))
    assert job["results"][0]["kind"] == "KIND_OUTPUT"


async def test_post_with_body(edge: Edge) -> None:
    response = await edge.http.post(
        "/v1/jobs",
        json={
            "dataset": "datasets/1",
            "additionalDatasets": ["datasets/2"],
            "environment": "small",
            "parameters": {"n": 3, "mode": "fast"},
            "raw_algorithm": {"code": "print(1)", "entrypoint": "python3 $ALGO"},
        },
    )
    assert response.status_code == 200, response.text
    job = response.json()["job"]
    assert job["datasetIds"] == ["datasets/1", "datasets/2"]
    assert job["environment"] == "small"
    assert json.loads(job["message"]) == {"n": 3, "mode": "fast"}


async def test_custom_verb_and_delete(edge: Edge) -> None:
    stopped = await edge.http.post("/v1/jobs/abc:stop")  # no body at all is an empty request
    assert stopped.status_code == 200
    assert stopped.json()["job"] == {"name": "jobs/abc", "state": "STATE_CANCELLED"}
    deleted = await edge.http.delete("/v1/jobs/abc")
    assert deleted.status_code == 200
    assert deleted.json() == {}


async def test_unknown_json_field_is_400_naming_it(edge: Edge) -> None:
    response = await edge.http.post("/v1/jobs", json={"dataset": "datasets/1", "bogus": 1})
    assert response.status_code == 400
    error = _error(response)
    assert error["status"] == "INVALID_ARGUMENT"
    assert "bogus" in error["message"]
    assert error["details"][0]["metadata"] == {"field": "bogus"}

    nested = await edge.http.post("/v1/jobs", json={"rawAlgorithm": {"code": "x", "oops": 1}})
    assert nested.status_code == 400
    assert _error(nested)["details"][0]["metadata"] == {"field": "rawAlgorithm.oops"}


async def test_malformed_body_is_400(edge: Edge) -> None:
    response = await edge.http.post(
        "/v1/jobs", content=b'{"dataset": ', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert "not valid JSON" in _error(response)["message"]
    wrong_type = await edge.http.post("/v1/jobs", json={"additionalDatasets": "datasets/2"})
    assert wrong_type.status_code == 400
    assert "additionalDatasets" in _error(wrong_type)["message"]


async def test_query_parameters(edge: Edge) -> None:
    camel = await edge.http.get("/v1/jobs", params={"pageSize": "10", "pageToken": "x"})
    assert camel.status_code == 200
    assert camel.json()["nextPageToken"] == "10:x"
    snake = await edge.http.get("/v1/jobs?page_size=7&page_token=y")
    assert snake.json()["nextPageToken"] == "7:y"

    bad = await edge.http.get("/v1/jobs?page_size=ten")
    assert bad.status_code == 400
    error = _error(bad)
    assert "page_size" in error["message"]
    assert error["details"][0]["metadata"] == {"field": "page_size"}

    unknown = await edge.http.get("/v1/jobs?color=red")
    assert unknown.status_code == 400
    assert "color" in _error(unknown)["message"]


async def test_credentials_are_never_taken_from_the_query(edge: Edge) -> None:
    response = await edge.http.get("/v1/jobs/abc?authorization=Bearer%20t&x-c2d-nonce=1")
    assert response.status_code == 400
    assert _error(response)["details"][0]["reason"] == "CREDENTIALS_IN_URL"


async def test_headers_are_forwarded_as_metadata(edge: Edge) -> None:
    headers = {
        "X-C2D-Address": "0xabc",
        "X-C2D-Nonce": "42",
        "X-C2D-Signature": "0xsig",
        "Authorization": "Bearer tok",
        "X-Request-Id": "req-1",
        "X-Unrelated": "not forwarded",
    }
    response = await edge.http.get("/v1/jobs/echo", headers=headers)
    assert response.status_code == 200
    echoed = json.loads(response.json()["job"]["message"])
    assert echoed == {
        "x-c2d-address": "0xabc",
        "x-c2d-nonce": "42",
        "x-c2d-signature": "0xsig",
        "authorization": "Bearer tok",
        "x-request-id": "req-1",
    }
    assert response.headers["x-request-id"] == "req-1"


async def test_rich_error_becomes_json_with_error_info(edge: Edge) -> None:
    response = await edge.http.get("/v1/jobs/denied")
    assert response.status_code == 403
    assert _error(response) == {
        "code": 403,
        "status": "PERMISSION_DENIED",
        "message": "the dataset's policy does not trust this algorithm",
        "details": [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "ALGORITHM_NOT_TRUSTED",
                "domain": "c2d.mesh",
                "metadata": {"field": "algorithm", "dataset": "datasets/1"},
            }
        ],
    }


@pytest.mark.parametrize(
    ("code", "http_status"),
    [
        ("INVALID_ARGUMENT", 400),
        ("FAILED_PRECONDITION", 400),
        ("OUT_OF_RANGE", 400),
        ("UNAUTHENTICATED", 401),
        ("PERMISSION_DENIED", 403),
        ("NOT_FOUND", 404),
        ("ALREADY_EXISTS", 409),
        ("ABORTED", 409),
        ("RESOURCE_EXHAUSTED", 429),
        ("UNIMPLEMENTED", 501),
        ("UNAVAILABLE", 503),
        ("INTERNAL", 500),
        ("DATA_LOSS", 500),
        ("UNKNOWN", 500),
    ],
)
async def test_status_codes_map_to_http(edge: Edge, code: str, http_status: int) -> None:
    response = await edge.http.get(f"/v1/jobs/code-{code}")
    assert response.status_code == http_status
    error = _error(response)
    assert error["status"] == code
    assert error["message"] == f"failing with {code}"
    assert error["details"] == []


async def test_unknown_route_and_wrong_method(edge: Edge) -> None:
    missing = await edge.http.get("/v2/nothing")
    assert missing.status_code == 404
    assert _error(missing)["status"] == "NOT_FOUND"
    unknown_verb = await edge.http.get("/v1/jobs/abc:explode")
    assert unknown_verb.status_code == 404

    wrong = await edge.http.put("/v1/jobs/abc", json={})
    assert wrong.status_code == 405
    assert wrong.headers["allow"] == "DELETE, GET"
    _error(wrong)
    wrong_builtin = await edge.http.post("/healthz")
    assert wrong_builtin.status_code == 405
    _error(wrong_builtin)


async def test_one_summary_log_line_per_request(edge: Edge) -> None:
    with structlog.testing.capture_logs(
        processors=[structlog.contextvars.merge_contextvars]
    ) as logs:
        await edge.http.get("/v1/jobs/abc", headers={"X-Request-Id": "trace-7"})
    lines = [entry for entry in logs if entry["event"] == "http"]
    assert len(lines) == 1
    assert lines[0]["method"] == "GET"
    assert lines[0]["path"] == "/v1/jobs/abc"
    assert lines[0]["status"] == 200
    assert lines[0]["request_id"] == "trace-7"
    assert lines[0]["duration_ms"] >= 0


# -- server streams as Server-Sent Events ----------------------------------------------------


async def test_watch_streams_events_as_they_happen(edge: Edge) -> None:
    started = time.monotonic()
    received: list[Event | str] = []
    async with edge.http.stream("GET", "/v1/jobs/abc:watch") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        async for item in read_events(response):
            received.append(item)
    events = [item for item in received if isinstance(item, Event)]
    assert [e.name for e in events] == ["WatchJobResponse", "WatchJobResponse"]
    assert [json.loads(e.data)["job"]["state"] for e in events] == [
        "STATE_QUEUED",
        "STATE_SUCCEEDED",
    ]
    assert all(e.id is None for e in events)
    # The first event is flushed at once, not held until the stream's second message or end.
    assert events[0].received_at - started < 0.5
    assert events[1].received_at - started >= 0.9
    # The second message comes after a second of silence: keepalives (0.3 s here) fill it.
    assert ": keepalive" in received[1:-1]


async def test_watch_refused_at_once_is_an_http_error(edge: Edge) -> None:
    response = await edge.http.get("/v1/jobs/missing:watch")
    assert response.status_code == 404
    assert _error(response)["status"] == "NOT_FOUND"


async def test_watch_failing_midway_ends_with_an_error_event(edge: Edge) -> None:
    async with edge.http.stream("GET", "/v1/jobs/broken:watch") as response:
        assert response.status_code == 200
        events = [item async for item in read_events(response) if isinstance(item, Event)]
    assert [e.name for e in events] == ["WatchJobResponse", "error"]
    error = json.loads(events[1].data)["error"]
    assert error["code"] == 500
    assert error["status"] == "INTERNAL"
    assert error["details"][0]["reason"] == "ENGINE_LOST"


async def test_logs_carry_resume_ids_and_resume_from_last_event_id(edge: Edge) -> None:
    async with edge.http.stream("GET", "/v1/jobs/abc:streamLogs") as response:
        events = [item async for item in read_events(response) if isinstance(item, Event)]
    assert all(e.name == "StreamJobLogsResponse" for e in events)
    chunks = [json.loads(e.data)["chunk"] for e in events]
    assert "".join(c["text"] for c in chunks) == LOG
    assert [e.id for e in events] == [c["nextOffset"] for c in chunks]
    assert events[0].id == str(LOG_CHUNK)

    resume_at = events[1].id
    assert resume_at is not None
    async with edge.http.stream(
        "GET", "/v1/jobs/abc:streamLogs", headers={"Last-Event-ID": resume_at}
    ) as response:
        resumed = [item async for item in read_events(response) if isinstance(item, Event)]
    texts = "".join(json.loads(e.data)["chunk"]["text"] for e in resumed)
    assert texts == LOG[int(resume_at) :]
    assert json.loads(resumed[0].data)["chunk"]["offset"] == resume_at

    bad = await edge.http.get("/v1/jobs/abc:streamLogs", headers={"Last-Event-ID": "x"})
    assert bad.status_code == 400


async def test_client_disconnect_cancels_the_grpc_call(edge: Edge) -> None:
    async with edge.http.stream("GET", "/v1/jobs/endless:streamLogs") as response:
        async for item in read_events(response):
            if isinstance(item, Event):
                break
    await asyncio.wait_for(edge.provider.cancelled.wait(), timeout=3)


async def test_stopping_the_gateway_ends_event_streams(edge: Edge) -> None:
    async with edge.http.stream("GET", "/v1/jobs/endless:streamLogs") as response:
        events = read_events(response)
        async for item in events:
            if isinstance(item, Event):
                break
        started = time.monotonic()
        stopping = asyncio.create_task(edge.gateway.stop())
        # The stream ends cleanly (the client reconnects elsewhere with Last-Event-ID) rather
        # than holding the shutdown for its whole grace period.
        async for _ in events:
            pass
        await stopping
    assert time.monotonic() - started < 2
    await asyncio.wait_for(edge.provider.cancelled.wait(), timeout=3)


# -- downloads --------------------------------------------------------------------------


TOKEN = {"Authorization": "Bearer tok"}


async def test_download_whole_file(edge: Edge) -> None:
    response = await edge.http.get("/v1/jobs/done/results/0:download", headers=TOKEN)
    assert response.status_code == 200
    assert response.content == CONTENT
    assert response.headers["content-type"] == "application/octet-stream"
    # With a token the gateway knows the result's own name, made safe.
    assert response.headers["content-disposition"] == 'attachment; filename="out.bin"'
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["content-length"] == str(len(CONTENT))
    assert response.headers["accept-ranges"] == "bytes"


async def test_download_with_range(edge: Edge) -> None:
    response = await edge.http.get(
        "/v1/jobs/done/results/0:download", headers={**TOKEN, "Range": "bytes=5000-"}
    )
    assert response.status_code == 206
    assert response.headers["content-range"] == f"bytes 5000-{len(CONTENT) - 1}/{len(CONTENT)}"
    assert response.headers["content-disposition"] == 'attachment; filename="out.bin"'
    assert response.content == CONTENT[5000:]

    closed = await edge.http.get(
        "/v1/jobs/done/results/0:download", headers={**TOKEN, "Range": "bytes=10-19"}
    )
    assert closed.status_code == 206
    assert closed.headers["content-range"] == f"bytes 10-19/{len(CONTENT)}"
    assert closed.content == CONTENT[10:20]

    suffix = await edge.http.get(
        "/v1/jobs/done/results/0:download", headers={**TOKEN, "Range": "bytes=-100"}
    )
    assert suffix.status_code == 206
    assert suffix.content == CONTENT[-100:]

    past_end = await edge.http.get(
        "/v1/jobs/done/results/0:download", headers={**TOKEN, "Range": "bytes=99999-"}
    )
    assert past_end.status_code == 416
    assert past_end.headers["content-range"] == f"bytes */{len(CONTENT)}"
    assert _error(past_end)["status"] == "OUT_OF_RANGE"


async def test_download_without_token(edge: Edge) -> None:
    # A signed download cannot ask GetJob for the size: the bytes come without a length...
    whole = await edge.http.get("/v1/jobs/done/results/0:download")
    assert whole.status_code == 200
    assert whole.content == CONTENT
    # ...resuming is by the request's own offset field...
    resumed = await edge.http.get("/v1/jobs/done/results/0:download?offset=10000")
    assert resumed.content == CONTENT[10000:]
    # ...and a Range, which needs the size, is refused rather than answered wrongly.
    ranged = await edge.http.get("/v1/jobs/done/results/0:download", headers={"Range": "bytes=10-"})
    assert ranged.status_code == 400
    assert _error(ranged)["details"][0]["reason"] == "RANGE_NEEDS_TOKEN"


async def test_download_errors_before_the_first_byte_are_json(edge: Edge) -> None:
    corrupt = await edge.http.get("/v1/jobs/corrupt/results/0:download")
    assert corrupt.status_code == 500
    error = _error(corrupt)
    assert error["status"] == "DATA_LOSS"
    assert error["details"][0]["reason"] == "CHECKSUM_MISMATCH"

    unlisted = await edge.http.get("/v1/jobs/done/results/7:download", headers=TOKEN)
    assert unlisted.status_code == 404
    _error(unlisted)


def test_path_templates() -> None:
    template = parse_template("/v1/{name=jobs/*/results/*}:download")
    assert template.verb == "download"
    assert template.match("/v1/jobs/a/results/3") == {("name",): "jobs/a/results/3"}
    assert template.match("/v1/jobs/a") is None
    nested = parse_template("/v1/{parent.name=shelves/*}/books/{book_id}")
    assert nested.match("/v1/shelves/s1/books/b2") == {
        ("parent", "name"): "shelves/s1",
        ("book_id",): "b2",
    }
    assert split_verb("/v1/jobs/abc:watch") == ("/v1/jobs/abc", "watch")
    assert split_verb("/v1/a:b/jobs") == ("/v1/a:b/jobs", "")


# -- the gateway's own endpoints, and a Provider that is down --------------------------------


async def test_healthz(edge: Edge) -> None:
    response = await edge.http.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "SERVING"}


async def test_provider_down_is_503_json() -> None:
    app = create_app(free_address())
    gateway = await run_in_background(app)
    try:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as http:
            started = time.monotonic()
            for path in ("/v1/jobs/abc", "/v1/jobs/abc:watch", "/v1/jobs/a/results/0:download"):
                response = await http.get(path)
                assert response.status_code == 503, path
                assert _error(response)["status"] == "UNAVAILABLE"
            health_response = await http.get("/healthz")
            assert health_response.status_code == 503
            assert time.monotonic() - started < 5
    finally:
        await gateway.stop()


async def test_openapi_lists_every_annotated_path(edge: Edge) -> None:
    response = await edge.http.get("/openapi.json")
    assert response.status_code == 200
    document = json.loads(response.content)
    assert document["openapi"] == "3.1.0"
    operations = {
        (method, path): operation
        for path, item in document["paths"].items()
        for method, operation in item.items()
    }
    assert set(operations) == {
        ("post", "/v1/authTokens"),
        ("post", "/v1/authTokens:revoke"),
        ("post", "/v1/datasets"),
        ("get", "/v1/datasets/{dataset}"),
        ("get", "/v1/datasets"),
        ("post", "/v1/algorithms"),
        ("get", "/v1/algorithms/{algorithm}"),
        ("get", "/v1/algorithms"),
        ("get", "/v1/environments"),
        ("post", "/v1/jobs"),
        ("post", "/v1/jobs:initialize"),
        ("get", "/v1/jobs/{job}"),
        ("get", "/v1/jobs"),
        ("get", "/v1/jobs/{job}:watch"),
        ("get", "/v1/jobs/{job}:streamLogs"),
        ("post", "/v1/jobs/{job}:stop"),
        ("delete", "/v1/jobs/{job}"),
        ("get", "/v1/jobs/{job}/results/{result}:download"),
        ("get", "/v1/jobs/{job}/results/{result}:url"),
        ("post", "/v1/jobs/{job}:publishOutputs"),
        ("post", "/v1/datasets/{dataset}:setPolicy"),
        ("post", "/v1/algorithms/{algorithm}:update"),
        ("get", "/v1/algorithms/{algorithm}:download"),
        ("get", "/v1/jobs/{job}:provenance"),
        ("post", "/v1/approvalRequests"),
        ("get", "/v1/approvalRequests"),
        ("get", "/v1/approvalRequests/{approvalRequest}"),
        ("post", "/v1/approvalRequests/{approvalRequest}:approve"),
        ("post", "/v1/approvalRequests/{approvalRequest}:reject"),
        ("post", "/v1/approvalRequests/{approvalRequest}:runSample"),
        ("get", "/v1/auditEvents"),
        ("get", "/v1/providerInfo"),
    }
    service = provider_pb2.DESCRIPTOR.services_by_name["ProviderService"]
    assert {op["operationId"] for op in operations.values()} == {m.name for m in service.methods}
    # Every operation keeps the annotation it came from.
    assert operations[("get", "/v1/jobs/{job}/results/{result}:download")]["x-http-rule"] == (
        "get: /v1/{name=jobs/*/results/*}:download"
    )
    # Every $ref points at a schema that exists.
    schemas = document["components"]["schemas"]
    refs = set(_refs(document))
    assert refs
    assert {ref.removeprefix("#/components/schemas/") for ref in refs} <= set(schemas)
    # Descriptions are the proto comments (read from the generated stubs).
    assert "NOT_FOUND" in operations[("get", "/v1/jobs/{job}")]["description"]
    assert schemas["c2d.common.v1.Job"]["properties"]["queuePosition"]["description"]


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)
