"""Mutual TLS on the internal hops: a whole job over TCP with the right certificates; callers
without a certificate, with one from another CA, or of a service not allowed to call, refused;
the plaintext health port; configuration mistakes; and `c2d certs`."""

from __future__ import annotations

import dataclasses
import os
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import grpc
import pytest
from c2d.common.v1 import job_pb2
from c2d.engine.v1 import engine_pb2, engine_pb2_grpc
from c2d.operator.v1 import operator_pb2, operator_pb2_grpc
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cli.certs import write_certs
from mesh.channels import open_channel
from mesh.server import Server
from mesh.tls import TlsConfig
from operator_engine.server import SERVICE_NAME as ENGINE_SERVICE
from operator_service.server import build as build_operator
from tests.conftest import needs_root, new_key
from tests.e2e.test_job import error_info, publish_pair, run_to_end
from tests.mesh.tls_mesh import Certs, TlsMesh, tls_mesh

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[TlsMesh]:
    async with tls_mesh(tmp_path) as started:
        yield started


async def list_environments(
    target: str, tls: TlsConfig | None = None, *, server_name: str = ""
) -> engine_pb2.ListEnvironmentsResponse:
    """ListEnvironments on the engine at `target`, as the caller `tls` names."""
    async with open_channel(target, tls, server_name=server_name) as channel:
        stub = engine_pb2_grpc.EngineServiceStub(channel)
        return await stub.ListEnvironments(engine_pb2.ListEnvironmentsRequest(), timeout=5)


def health_stub(channel: grpc.aio.Channel) -> Any:
    # The health stubs are typed for synchronous channels.
    return health_pb2_grpc.HealthStub(channel)


async def list_services(channel: grpc.aio.Channel) -> list[str]:
    """Server reflection's list of services (a stream of requests and replies)."""
    stub: Any = reflection_pb2_grpc.ServerReflectionStub(channel)  # type: ignore[arg-type]
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    replies = stub.ServerReflectionInfo(iter([request]), timeout=5)
    return [s.name async for reply in replies for s in reply.list_services_response.service]


async def refused(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return raised.value


@needs_root
async def test_a_job_runs_over_mutual_tls(mesh: TlsMesh, tmp_path: Path) -> None:
    node = mesh.node
    # The hops behind the Provider are TCP, not the embedded Unix sockets.
    assert node.operator_address.startswith("127.0.0.1:")
    assert node.engine_address.startswith("127.0.0.1:")
    consumer_key = new_key()
    async with node.client(node.owner) as owner, node.client(consumer_key) as consumer:
        assert [e.name for e in await consumer.list_environments()] == ["default"]
        algorithm, dataset = await publish_pair(node, owner)
        job = await consumer.start_compute([dataset.did], algorithm=algorithm.did)
        states, final = await run_to_end(consumer, job)
        assert states[-1] == job_pb2.Job.STATE_SUCCEEDED, final.message
        log_text = "".join([c.text async for c in consumer.stream_logs(job.name)])
        assert log_text == "total 6\n"
    # The operator service's certificate is the one the engine lets in, reflection too.
    caller = mesh.certs.tls("operator-service")
    assert [e.name for e in (await list_environments(node.engine_address, caller)).environments]
    async with open_channel(node.engine_address, caller) as channel:
        assert ENGINE_SERVICE in await list_services(channel)


@needs_root
async def test_a_caller_without_a_certificate_never_completes_the_handshake(
    mesh: TlsMesh,
) -> None:
    for target in (mesh.node.engine_address, mesh.node.operator_address):
        # Trusting the CA, but presenting no certificate of its own.
        credentials = grpc.ssl_channel_credentials(root_certificates=mesh.certs.ca.read_bytes())
        async with grpc.aio.secure_channel(target, credentials) as channel:
            stub = health_stub(channel)
            error = await refused(stub.Check(health_pb2.HealthCheckRequest(), timeout=5))
            assert error.code() == grpc.StatusCode.UNAVAILABLE
        # Plaintext on a TLS port.
        error = await refused(list_environments(target))
        assert error.code() == grpc.StatusCode.UNAVAILABLE


@needs_root
async def test_a_certificate_from_another_ca_is_refused(mesh: TlsMesh, tmp_path: Path) -> None:
    rogue = Certs.make(tmp_path / "rogue", ("operator-service",))
    # The right name, signed by another CA; the caller trusts the mesh's CA, so the server's
    # certificate passes and it is the server that refuses.
    caller = rogue.tls("operator-service", ca=mesh.certs.ca)
    error = await refused(list_environments(mesh.node.engine_address, caller))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    # And a server of another CA is refused by the mesh's clients.
    error = await refused(
        list_environments(mesh.node.engine_address, rogue.tls("operator-service"))
    )
    assert error.code() == grpc.StatusCode.UNAVAILABLE


@needs_root
async def test_a_service_not_allowed_to_call_gets_permission_denied(mesh: TlsMesh) -> None:
    provider = mesh.certs.tls("provider")
    # The provider's valid certificate calling the engine directly: every method, health and
    # reflection included.
    error = await refused(list_environments(mesh.node.engine_address, provider))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(error).reason == "PEER_NOT_ALLOWED"
    assert "provider" in (error.details() or "")
    async with open_channel(mesh.node.engine_address, provider) as channel:
        health = health_stub(channel)
        error = await refused(health.Check(health_pb2.HealthCheckRequest(), timeout=5))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await list_services(channel)
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # The engine's certificate calling the operator service.
    async with open_channel(mesh.node.operator_address, mesh.certs.tls("engine")) as channel:
        stub = operator_pb2_grpc.OperatorServiceStub(channel)
        error = await refused(
            stub.ListEnvironments(operator_pb2.ListEnvironmentsRequest(), timeout=5)
        )
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_info(error).reason == "PEER_NOT_ALLOWED"


@needs_root
async def test_the_plaintext_health_port_serves_health_alone(mesh: TlsMesh) -> None:
    async with grpc.aio.insecure_channel(mesh.engine_health_address) as channel:
        health = health_stub(channel)
        for service in ("", ENGINE_SERVICE):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        engine = engine_pb2_grpc.EngineServiceStub(channel)
        error = await refused(
            engine.ListEnvironments(engine_pb2.ListEnvironmentsRequest(), timeout=5)
        )
        assert error.code() == grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await list_services(channel)
        assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED


@needs_root
async def test_unix_sockets_stay_plaintext_and_names_can_be_overridden(
    mesh: TlsMesh, tmp_path: Path
) -> None:
    # An Operator Service with TLS on, on an owner-only socket: plaintext callers there, and
    # mutual TLS on its own hop to the engine.
    socket = tmp_path / "run" / "operator.sock"
    operator = await build_operator(
        dataclasses.replace(
            mesh.operator, listen=f"unix:{socket}", database=tmp_path / "second" / "operator.db"
        )
    )
    await operator.start()
    try:
        async with open_channel(f"unix:{socket}", mesh.certs.tls("provider")) as channel:
            stub = operator_pb2_grpc.OperatorServiceStub(channel)
            reply = await stub.ListEnvironments(operator_pb2.ListEnvironmentsRequest(), timeout=5)
            assert [e.name for e in reply.environments] == ["default"]
    finally:
        await operator.tracker.close()
        await operator.server.stop(0.5)
        await operator.close()
    # The server's certificate must name the expected service: the target's host by default,
    # or the hop's override.
    caller = mesh.certs.tls("operator-service")
    port = mesh.node.engine_address.rpartition(":")[2]
    await list_environments(f"localhost:{port}", caller, server_name="engine")
    error = await refused(list_environments(f"localhost:{port}", caller, server_name="provider"))
    assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_configuration_mistakes_name_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    certs = Certs.make(tmp_path / "certs")
    for name in ("C2D_TLS_CERT", "C2D_TLS_KEY", "C2D_TLS_CA", "C2D_TLS_ALLOWED_CLIENTS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("C2D_HEALTH_LISTEN", raising=False)
    assert TlsConfig.from_env() is None

    monkeypatch.setenv("C2D_TLS_CERT", str(certs.folder / "engine.crt"))
    with pytest.raises(ValueError, match="C2D_TLS_KEY, C2D_TLS_CA not set"):
        TlsConfig.from_env()
    monkeypatch.setenv("C2D_TLS_KEY", str(certs.folder / "provider.key"))
    monkeypatch.setenv("C2D_TLS_CA", str(certs.folder / "missing.crt"))
    with pytest.raises(ValueError, match=r"C2D_TLS_CA: cannot read .*missing\.crt"):
        TlsConfig.from_env()
    monkeypatch.setenv("C2D_TLS_CA", str(certs.ca))
    with pytest.raises(ValueError, match=r"C2D_TLS_KEY: .* not the key of the certificate"):
        TlsConfig.from_env()
    monkeypatch.setenv("C2D_TLS_KEY", str(certs.folder / "engine.key"))
    monkeypatch.setenv("C2D_TLS_ALLOWED_CLIENTS", "localhost")
    with pytest.raises(ValueError, match="C2D_TLS_ALLOWED_CLIENTS: localhost"):
        TlsConfig.from_env()
    monkeypatch.setenv("C2D_TLS_ALLOWED_CLIENTS", " operator-service, ,provider ")
    monkeypatch.setenv("C2D_HEALTH_LISTEN", "0.0.0.0:8081")
    config = TlsConfig.from_env()
    assert config is not None
    assert config.allowed_clients == {"operator-service", "provider"}
    assert config.health_listen == "0.0.0.0:8081"
    assert b"PRIVATE" not in repr(config).encode()

    monkeypatch.setenv("C2D_TLS_CA", str(certs.folder / "engine.key"))
    with pytest.raises(ValueError, match=r"C2D_TLS_CA: .* holds no PEM certificate"):
        TlsConfig.from_env()
    for name in ("C2D_TLS_CERT", "C2D_TLS_KEY", "C2D_TLS_CA", "C2D_TLS_ALLOWED_CLIENTS"):
        monkeypatch.delenv(name)
    with pytest.raises(ValueError, match="C2D_HEALTH_LISTEN is for services with TLS on"):
        TlsConfig.from_env()


async def test_a_tls_server_nobody_may_call_does_not_bind(tmp_path: Path) -> None:
    certs = Certs.make(tmp_path / "certs", ("engine",))
    server = Server("lonely", lambda _: None, [], tls=certs.tls("engine"))
    with pytest.raises(ValueError, match="C2D_TLS_ALLOWED_CLIENTS is empty"):
        server.bind("127.0.0.1:0")


def test_a_service_with_half_a_tls_configuration_does_not_start(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "C2D_HOME": str(tmp_path / "home"),
        "C2D_TLS_CERT": str(tmp_path / "operator-service.crt"),
        "C2D_LOG_FORMAT": "json",
    }
    for name in ("C2D_TLS_KEY", "C2D_TLS_CA", "C2D_TLS_ALLOWED_CLIENTS", "C2D_HEALTH_LISTEN"):
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, "-m", "operator_service"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    # One line naming what is missing, exit status 2: no traceback.
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "operator_service: bad configuration: C2D_TLS_KEY, C2D_TLS_CA not set: TLS needs "
        "C2D_TLS_CERT, C2D_TLS_KEY and C2D_TLS_CA"
    )
    assert not (tmp_path / "home" / "operator").exists(), "it started before the check"


def c2d_certs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", "certs", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_c2d_certs_writes_a_ca_and_a_certificate_per_service(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    done = c2d_certs("--out", str(out), "--days", "30")
    assert done.returncode == 0, done.stderr
    names = ("provider", "operator-service", "engine")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["ca.crt", "ca.key", *(f"{n}.crt" for n in names), *(f"{n}.key" for n in names)]
    )
    for path in out.iterdir():
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o600 if path.suffix == ".key" else 0o644), path.name
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for name in names:
        cert = x509.load_pem_x509_certificate((out / f"{name}.crt").read_bytes())
        assert cert.issuer == ca.subject
        cert.verify_directly_issued_by(ca)
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert alt.get_values_for_type(x509.DNSName) == [
            name,
            f"{name}.c2d-system",
            f"{name}.c2d-system.svc",
            f"{name}.c2d-system.svc.cluster.local",
            "localhost",
        ]
        assert [str(ip) for ip in alt.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        assert 30 <= lifetime.days <= 31
        # What it prints is what the service needs.
        assert f"C2D_TLS_CERT={out / name}.crt" in done.stdout
    assert "C2D_TLS_ALLOWED_CLIENTS=operator-service" in done.stdout
    assert "C2D_TLS_ALLOWED_CLIENTS=provider" in done.stdout
    # The files are what TlsConfig loads.
    TlsConfig.load(out / "engine.crt", out / "engine.key", out / "ca.crt")

    before = (out / "ca.crt").read_bytes()
    again = c2d_certs("--out", str(out))
    assert again.returncode == 1
    assert "already holds a CA; pass --force" in again.stderr
    assert (out / "ca.crt").read_bytes() == before
    forced = c2d_certs("--out", str(out), "--names", "engine", "--force")
    assert forced.returncode == 0, forced.stderr
    assert (out / "ca.crt").read_bytes() != before
    with pytest.raises(ValueError, match="'Bad_Name' cannot name a service"):
        write_certs(tmp_path / "other", ["engine", "Bad_Name"])
    assert not (tmp_path / "other").exists()
