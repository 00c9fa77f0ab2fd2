"""The three services as a generic gRPC tool sees them: `buf curl` with server reflection only
(no proto files), over TCP for the Provider and over Unix sockets for the Operator Service and
the Engine. Lists services and methods, checks health, calls unary and server-streaming
methods, and reads an error status."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from c2d.engine.v1 import engine_pb2
from c2d.operator.v1 import operator_pb2
from c2d.provider.v1 import provider_pb2 as pb
from google.protobuf.descriptor import FileDescriptor

from sdk.client import Client
from tests.conftest import LocalMesh, needs_root
from tests.interop.commands import ROOT, run

BUF = ROOT / "node_modules" / ".bin" / "buf"
HEALTH = "grpc.health.v1.Health"
# buf curl exits with the gRPC status code shifted three bits to the left.
NOT_FOUND_EXIT = 5 << 3

pytestmark = [
    needs_root,
    pytest.mark.skipif(not BUF.exists(), reason="node_modules/.bin/buf is missing: run `npm ci`"),
    pytest.mark.skipif(
        shutil.which("node") is None, reason="node is not installed (buf's npm launcher needs it)"
    ),
]

SUM_ALGORITHM = b"""
import json, os, time
dataset_id = json.loads(os.environ["DIDS"])[0]
with open(f"/data/inputs/{dataset_id}/0") as f:
    total = sum(int(line) for line in f if line.strip())
print("total", total, flush=True)
with open("/data/outputs/total.txt", "w") as f:
    f.write(str(total))
time.sleep(1)  # long enough for WatchJob to see the job change
"""


@dataclass(frozen=True)
class Target:
    """How buf curl reaches one service: a base URL, and a Unix socket when there is one."""

    service: str
    base_url: str
    socket: str | None
    descriptor: FileDescriptor

    def flags(self) -> list[str]:
        return ["--unix-socket", self.socket] if self.socket else []

    def methods(self) -> set[str]:
        service = self.descriptor.services_by_name[self.service.rpartition(".")[2]]
        return {f"{self.service}/{m.name}" for m in service.methods}


def targets(mesh: LocalMesh) -> dict[str, Target]:
    def unix(address: str) -> str:
        assert address.startswith("unix:"), address
        return address.removeprefix("unix:")

    return {
        "provider": Target(
            "c2d.provider.v1.ProviderService",
            f"http://{mesh.provider_address}",
            None,
            pb.DESCRIPTOR,
        ),
        "operator": Target(
            "c2d.operator.v1.OperatorService",
            # The host is a dummy: the connection goes to the socket.
            "http://operator.invalid",
            unix(mesh.operator_address),
            operator_pb2.DESCRIPTOR,
        ),
        "engine": Target(
            "c2d.engine.v1.EngineService",
            "http://engine.invalid",
            unix(mesh.engine_address),
            engine_pb2.DESCRIPTOR,
        ),
    }


@dataclass(frozen=True)
class Result:
    code: int
    stdout: str
    stderr: str

    def json_documents(self) -> list[dict[str, object]]:
        """The JSON messages buf curl printed, one after another."""
        decoder = json.JSONDecoder()
        text, position, documents = self.stdout, 0, []
        while True:
            while position < len(text) and text[position].isspace():
                position += 1
            if position == len(text):
                return documents
            document, position = decoder.raw_decode(text, position)
            documents.append(document)


async def buf_curl(
    target: Target, *args: str, home: Path, timeout: float = 30, path: str = ""
) -> Result:
    """Runs buf curl asynchronously: the servers under test live in this event loop."""
    url = f"{target.base_url}/{path}" if path else target.base_url
    code, stdout, stderr = await run(
        [
            str(BUF),
            "curl",
            "--protocol",
            "grpc",
            "--http2-prior-knowledge",
            *target.flags(),
            *args,
            url,
        ],
        env={"BUF_CACHE_DIR": str(home / "buf-cache"), "NO_COLOR": "1"},
        timeout=timeout,
    )
    return Result(code, stdout, stderr)


SERVICES = ["provider", "operator", "engine"]


@pytest.mark.parametrize("which", SERVICES)
async def test_reflection_lists_the_service_its_methods_and_health(
    local_mesh: LocalMesh, tmp_path: Path, which: str
) -> None:
    target = targets(local_mesh)[which]
    listed = await buf_curl(target, "--list-services", home=tmp_path)
    assert listed.code == 0, listed.stderr
    services = set(listed.stdout.split())
    assert {target.service, HEALTH} <= services, listed.stdout

    methods = await buf_curl(target, "--list-methods", home=tmp_path)
    assert methods.code == 0, methods.stderr
    listed_methods = set(methods.stdout.split())
    # Every method of the contract, as the generated descriptors know them.
    assert target.methods() <= listed_methods, methods.stdout
    assert f"{HEALTH}/Check" in listed_methods


@pytest.mark.parametrize("which", SERVICES)
async def test_health_and_list_environments_through_reflection(
    local_mesh: LocalMesh, tmp_path: Path, which: str
) -> None:
    target = targets(local_mesh)[which]
    for service in ("", target.service):
        health = await buf_curl(
            target,
            "-d",
            json.dumps({"service": service}),
            home=tmp_path,
            path=f"{HEALTH}/Check",
        )
        assert health.code == 0, health.stderr
        assert health.json_documents() == [{"status": "SERVING"}]

    environments = await buf_curl(
        target, "-d", "{}", home=tmp_path, path=f"{target.service}/ListEnvironments"
    )
    assert environments.code == 0, environments.stderr
    [response] = environments.json_documents()
    names = [e["name"] for e in response["environments"]]  # type: ignore[index,union-attr]
    assert sorted(names) == ["default", "small"], names


async def test_provider_lists_datasets_through_reflection(
    local_mesh: LocalMesh, tmp_path: Path
) -> None:
    target = targets(local_mesh)["provider"]
    empty = await buf_curl(target, "-d", "{}", home=tmp_path, path=f"{target.service}/ListDatasets")
    assert empty.code == 0, empty.stderr
    assert empty.json_documents() == [{}]

    data = local_mesh.data_file("buf/numbers.txt", b"1\n2\n")
    async with Client(local_mesh.provider_address, local_mesh.owner) as owner:
        dataset = await owner.publish_dataset(
            [data], metadata=pb.AssetMetadata(title="numbers", tags=["buf"])
        )
    listed = await buf_curl(
        target,
        "-d",
        json.dumps({"pageSize": 10}),
        home=tmp_path,
        path=f"{target.service}/ListDatasets",
    )
    assert listed.code == 0, listed.stderr
    [response] = listed.json_documents()
    [shown] = response["datasets"]  # type: ignore[misc]
    assert shown["name"] == dataset.name
    assert shown["did"] == dataset.did
    assert shown["metadata"] == {"title": "numbers", "tags": ["buf"]}
    # A dataset's location never leaves the node.
    assert str(data) not in listed.stdout


async def test_watch_job_streams_to_the_final_state_through_reflection(
    local_mesh: LocalMesh, tmp_path: Path
) -> None:
    target = targets(local_mesh)["provider"]
    data = local_mesh.data_file("buf/sum.txt", b"4\n5\n6\n")
    async with Client(local_mesh.provider_address, local_mesh.owner) as owner:
        algorithm = await owner.publish_algorithm(SUM_ALGORITHM, "python3 $ALGO")
        dataset = await owner.publish_dataset(
            [data],
            policy=pb.ComputePolicy(
                publisher_trusted_algorithms=[await owner.trust(algorithm.did)]
            ),
        )
        job = await owner.start_compute([dataset.did], algorithm=algorithm.did)
        [(_, authorization)] = await owner.token_metadata()

    watched = await buf_curl(
        target,
        "-H",
        f"authorization: {authorization}",
        "-d",
        json.dumps({"name": job.name}),
        home=tmp_path,
        timeout=40,
        path=f"{target.service}/WatchJob",
    )
    assert watched.code == 0, watched.stderr
    updates = watched.json_documents()
    # The job at once, then each change: more than one message, the last one final.
    assert len(updates) >= 2, watched.stdout
    assert all(u["job"]["name"] == job.name for u in updates)  # type: ignore[index]
    final = updates[-1]["job"]
    assert final["state"] == "STATE_SUCCEEDED", final  # type: ignore[index]
    assert "STATE_SUCCEEDED" in watched.stdout
    assert "total.txt" in {r["name"] for r in final["results"]}  # type: ignore[index]

    # Without credentials the same stream is refused.
    refused = await buf_curl(
        target,
        "-d",
        json.dumps({"name": job.name}),
        home=tmp_path,
        path=f"{target.service}/WatchJob",
    )
    assert refused.code == 16 << 3, (refused.code, refused.stderr)
    assert "unauthenticated" in refused.stderr


async def test_an_unknown_job_is_not_found_through_reflection(
    local_mesh: LocalMesh, tmp_path: Path
) -> None:
    target = targets(local_mesh)["provider"]
    async with Client(local_mesh.provider_address, local_mesh.owner) as owner:
        [(_, authorization)] = await owner.token_metadata()
    unknown = "jobs/" + "0" * 32
    result = await buf_curl(
        target,
        "-H",
        f"authorization: {authorization}",
        "-d",
        json.dumps({"name": unknown}),
        home=tmp_path,
        path=f"{target.service}/GetJob",
    )
    assert result.code == NOT_FOUND_EXIT, (result.code, result.stdout, result.stderr)
    error = json.loads(result.stderr)
    assert error["code"] == "not_found", error
