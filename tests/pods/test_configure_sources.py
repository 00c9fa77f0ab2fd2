"""The configure stage's remote dataset files: fetched from a real S3 server (moto's, on
127.0.0.1) and a real HTTP server (tests/pods/http_source.py), streamed into the workspace,
checked against their recorded size and sha256, within the node's limits, and never named by
their location (nor the credentials) in an error, the configuration log or a log line."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import structlog
from c2d.common.v1 import job_pb2
from c2d.engine.v1 import engine_pb2
from google.protobuf import json_format

from mesh.s3 import S3Settings
from operator_engine.mounts import mount, unmount
from operator_engine.sources import HttpCredential, S3Credential, SourceSettings
from pods.configure import (
    ConfigureStopped,
    DataProvisioningError,
    Mount,
    configure,
)
from tests.conftest import needs_root
from tests.pods.http_source import TOKEN, HttpSource
from tests.pods.test_configure import DS1, DS2, make_file, mode_of, run_program, spec
from tests.s3_server import ACCESS_KEY_ID, REGION, S3Server

KEY = "warehouse/2024/sales-q3.csv"
CONTENT = b"".join(f"{n}\n".encode() for n in range(1000))
# Secrets that must never show up anywhere the consumer or a log reader looks.
S3_SECRET = "s3-secret-never-shown-4e1b"


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sources(server: S3Server | None = None, **limits: Any) -> SourceSettings:
    """Settings with an S3 entry `store` (moto accepts any secret: a recognisable one is used)
    and an HTTP entry `api` carrying the test server's token."""
    credentials: dict[str, Any] = {"api": HttpCredential({"Authorization": f"Bearer {TOKEN}"})}
    if server is not None:
        credentials["store"] = S3Credential(
            S3Settings(
                endpoint_url=server.endpoint_url,
                region=REGION,
                access_key_id=ACCESS_KEY_ID,
                secret_access_key=S3_SECRET,
            )
        )
    return SourceSettings(credentials=credentials, **limits)


def remote(
    *,
    s3_url: str = "",
    http_url: str = "",
    content: bytes = CONTENT,
    credentials: str = "",
    size_bytes: int | None = None,
    sha256: str | None = None,
) -> engine_pb2.DatasetFileSource:
    source = engine_pb2.DatasetFileSource(
        credentials=credentials,
        size_bytes=len(content) if size_bytes is None else size_bytes,
        sha256=digest(content) if sha256 is None else sha256,
    )
    if s3_url:
        source.s3_url = s3_url
    else:
        source.http_url = http_url
    return source


def datasets(
    *files: engine_pb2.DatasetFileSource, dataset_id: str = DS1
) -> engine_pb2.DatasetInput:
    return engine_pb2.DatasetInput(id=dataset_id, files=files, ddo_json='{"name": "ds"}')


def local(path: Path) -> engine_pb2.DatasetFileSource:
    return engine_pb2.DatasetFileSource(path=str(path))


def configuration_log(workspace: Path) -> str:
    return (workspace / "logs" / "configuration.log").read_text()


def leftovers(workspace: Path) -> list[str]:
    inputs = workspace / "dataset-inputs"
    return sorted(p.name for p in inputs.rglob("*") if p.is_file()) if inputs.exists() else []


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    return root


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir(mode=0o700)
    return ws


def test_an_s3_file_is_fetched_checked_and_mounted_read_only(
    s3_server: S3Server, s3_bucket: str, data_root: Path, workspace: Path
) -> None:
    s3_server.put_object(s3_bucket, KEY, CONTENT)
    here = make_file(data_root / "local.csv")
    job = spec(
        [
            datasets(local(here), remote(s3_url=f"s3://{s3_bucket}/{KEY}", credentials="store")),
            datasets(local(here), dataset_id=DS2),
        ]
    )
    with structlog.testing.capture_logs() as logs:
        result = configure(job, workspace, data_root, sources(s3_server))

    fetched = workspace / "dataset-inputs" / DS1 / "1"
    assert result.mounts[:3] == [
        Mount(here.resolve(), f"/data/inputs/{DS1}/0", False),
        Mount(fetched, f"/data/inputs/{DS1}/1", False),
        Mount(here.resolve(), f"/data/inputs/{DS2}/0", False),
    ]
    assert fetched.read_bytes() == CONTENT
    # Readable through the sandbox's read-only mount, writable by nobody but root, in folders
    # only root may enter.
    assert mode_of(fetched) == 0o444
    assert os.stat(fetched).st_uid == os.geteuid()
    assert mode_of(workspace / "dataset-inputs") == 0o700
    assert mode_of(workspace / "dataset-inputs" / DS1) == 0o700
    assert leftovers(workspace) == ["1"]  # no temporary file left beside it

    log = configuration_log(workspace)
    assert (
        f"file 1 of dataset {DS1}: {len(CONTENT)} bytes fetched from S3 in " in log
        and f"sha256 {digest(CONTENT)} verified" in log
    )
    assert f"dataset {DS1}: 2 files (1 to fetch)" in log
    (line,) = [entry for entry in logs if entry["event"] == "configure.file_fetched"]
    assert line["job_id"] == job.job_id
    assert (line["dataset_id"], line["index"], line["source"]) == (DS1, 1, "S3")
    assert line["bytes"] == len(CONTENT)


def test_s3_without_a_credential_name_uses_the_nodes_s3_settings(
    s3_server: S3Server,
    s3_bucket: str,
    data_root: Path,
    workspace: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    s3_server.put_object(s3_bucket, KEY, CONTENT)
    job = spec([datasets(remote(s3_url=f"s3://{s3_bucket}/{KEY}"))])
    configure(job, workspace, data_root, SourceSettings())
    assert (workspace / "dataset-inputs" / DS1 / "0").read_bytes() == CONTENT


def test_an_http_file_is_fetched_with_the_credentials_headers(
    http_source: HttpSource, data_root: Path, workspace: Path
) -> None:
    http_source.serve("sales.csv", CONTENT)
    job = spec(
        [datasets(remote(http_url=http_source.url("/private/sales.csv"), credentials="api"))]
    )

    result = configure(job, workspace, data_root, sources())

    assert (workspace / "dataset-inputs" / DS1 / "0").read_bytes() == CONTENT
    assert result.mounts[0].sandbox_path == f"/data/inputs/{DS1}/0"
    assert http_source.seen == [("/private/sales.csv", f"Bearer {TOKEN}")]
    assert f"{len(CONTENT)} bytes fetched from HTTP" in configuration_log(workspace)


def test_a_redirect_keeps_the_credentials_only_on_the_same_origin(
    http_source: HttpSource, data_root: Path, workspace: Path
) -> None:
    http_source.serve("sales.csv", CONTENT)
    same = spec(
        [datasets(remote(http_url=http_source.url("/redirect/sales.csv"), credentials="api"))]
    )
    configure(same, workspace, data_root, sources())
    assert http_source.seen[-1] == ("/private/sales.csv", f"Bearer {TOKEN}")

    away = spec(
        [datasets(remote(http_url=http_source.url("/redirect-away/sales.csv"), credentials="api"))]
    )
    with pytest.raises(DataProvisioningError) as caught:
        configure(away, workspace, data_root, sources())
    # The other origin never saw the token, so it refused.
    assert str(caught.value) == f"file 0 of dataset {DS1}: the server answered HTTP 401"
    assert http_source.seen[-1] == ("/private/sales.csv", "")


def test_without_credentials_a_private_url_fails(
    http_source: HttpSource, data_root: Path, workspace: Path
) -> None:
    http_source.serve("sales.csv", CONTENT)
    job = spec([datasets(remote(http_url=http_source.url("/private/sales.csv")))])
    with pytest.raises(DataProvisioningError, match="answered HTTP 401"):
        configure(job, workspace, data_root, sources())


def test_a_checksum_mismatch_fails_and_leaves_nothing(
    s3_server: S3Server, s3_bucket: str, http_source: HttpSource, data_root: Path, workspace: Path
) -> None:
    s3_server.put_object(s3_bucket, KEY, CONTENT)
    tampered = b"9" + CONTENT[1:]
    url = http_source.serve("sales.csv", tampered)
    here = make_file(data_root / "local.csv")
    for source in (
        remote(http_url=url, content=CONTENT),
        remote(s3_url=f"s3://{s3_bucket}/{KEY}", credentials="store", sha256=digest(tampered)),
    ):
        job = spec([datasets(local(here), source)])
        with pytest.raises(DataProvisioningError) as caught:
            configure(job, workspace, data_root, sources(s3_server))
        assert str(caught.value) == (
            f"file 1 of dataset {DS1}: content does not match its recorded sha256"
        )
        assert caught.value.reason == job_pb2.FAILURE_REASON_DATA_PROVISIONING_FAILED
        assert caught.value.status_code == 31
        assert leftovers(workspace) == []
        assert "configure failed: file 1 of dataset" in configuration_log(workspace)


@pytest.mark.parametrize(
    ("path", "recorded", "message"),
    [
        # Announced larger than recorded: refused before a byte is read.
        ("/more/f.csv", len(CONTENT), f"larger than its recorded size of {len(CONTENT)} bytes"),
        # Nothing announced, and no end: refused at the first byte past the recorded size.
        ("/endless", len(CONTENT), f"larger than its recorded size of {len(CONTENT)} bytes"),
        ("/short/f.csv", len(CONTENT), "smaller than its recorded size"),
        # The file itself, recorded as larger or smaller than it is.
        ("/files/f.csv", len(CONTENT) + 1, "smaller than its recorded size"),
        ("/files/f.csv", len(CONTENT) - 1, "larger than its recorded size"),
    ],
)
def test_a_file_of_another_size_than_recorded_fails(
    http_source: HttpSource,
    data_root: Path,
    workspace: Path,
    path: str,
    recorded: int,
    message: str,
) -> None:
    http_source.serve("f.csv", CONTENT)
    job = spec([datasets(remote(http_url=http_source.url(path), size_bytes=recorded))])
    started = time.monotonic()
    with pytest.raises(DataProvisioningError, match=message):
        configure(job, workspace, data_root, sources())
    assert time.monotonic() - started < 5
    assert leftovers(workspace) == []


@pytest.mark.parametrize(("recorded", "message"), [(10, "larger"), (10**6, "smaller")])
def test_an_s3_object_of_another_size_than_recorded_fails(
    s3_server: S3Server,
    s3_bucket: str,
    data_root: Path,
    workspace: Path,
    recorded: int,
    message: str,
) -> None:
    s3_server.put_object(s3_bucket, KEY, CONTENT)
    job = spec(
        [
            datasets(
                remote(s3_url=f"s3://{s3_bucket}/{KEY}", credentials="store", size_bytes=recorded)
            )
        ]
    )
    with pytest.raises(DataProvisioningError, match=f"{message} than its recorded size"):
        configure(job, workspace, data_root, sources(s3_server))


def test_a_missing_s3_object_fails(
    s3_server: S3Server, s3_bucket: str, data_root: Path, workspace: Path
) -> None:
    job = spec([datasets(remote(s3_url=f"s3://{s3_bucket}/{KEY}", credentials="store"))])
    with pytest.raises(DataProvisioningError) as caught:
        configure(job, workspace, data_root, sources(s3_server))
    assert str(caught.value) == f"file 0 of dataset {DS1}: not found in the store"


def test_a_server_that_never_answers_fails_in_bounded_time(
    http_source: HttpSource, silent_server: str, data_root: Path, workspace: Path
) -> None:
    limits = {"read_timeout_s": 0.5, "connect_timeout_s": 0.5, "timeout_s": 2.0}
    for url in (http_source.url("/hang"), f"{silent_server}/data.csv"):
        job = spec([datasets(remote(http_url=url))])
        started = time.monotonic()
        with pytest.raises(DataProvisioningError) as caught:
            configure(job, workspace, data_root, sources(**limits))
        assert time.monotonic() - started < 3
        assert str(caught.value) == f"file 0 of dataset {DS1}: timed out (no answer within 0.5 s)"


def test_a_trickling_server_fails_at_the_time_limit_per_file(
    http_source: HttpSource, data_root: Path, workspace: Path
) -> None:
    http_source.serve("f.csv", CONTENT)
    job = spec([datasets(remote(http_url=http_source.url("/slow/f.csv")))])
    started = time.monotonic()
    with pytest.raises(DataProvisioningError) as caught:
        configure(job, workspace, data_root, sources(timeout_s=1.0))
    assert 0.9 < time.monotonic() - started < 3
    assert str(caught.value) == (
        f"file 0 of dataset {DS1}: timed out (the node allows 1 s per file)"
    )


def test_an_s3_store_that_never_answers_fails_in_bounded_time(
    silent_server: str, data_root: Path, workspace: Path
) -> None:
    hung = SourceSettings(
        credentials={
            "hung": S3Credential(
                S3Settings(
                    endpoint_url=silent_server,
                    region=REGION,
                    access_key_id=ACCESS_KEY_ID,
                    secret_access_key=S3_SECRET,
                )
            )
        },
        timeout_s=1.5,
        read_timeout_s=0.5,
    )
    job = spec([datasets(remote(s3_url="s3://hung-bucket/data.csv", credentials="hung"))])
    started = time.monotonic()
    with pytest.raises(DataProvisioningError, match="timed out"):
        configure(job, workspace, data_root, hung)
    assert time.monotonic() - started < 3


def test_unknown_credentials_fail_before_any_fetch(
    http_source: HttpSource, data_root: Path, workspace: Path
) -> None:
    url = http_source.serve("f.csv", CONTENT)
    here = make_file(data_root / "local.csv")
    job = spec(
        [datasets(remote(http_url=url), local(here), remote(http_url=url, credentials="nope"))]
    )
    with pytest.raises(DataProvisioningError) as caught:
        configure(job, workspace, data_root, sources())
    assert str(caught.value) == f"file 2 of dataset {DS1}: unknown source credentials"
    # Every file is checked before the first download.
    assert http_source.seen == []

    wrong_kind = spec([datasets(remote(http_url=url, credentials="store"))])
    with pytest.raises(DataProvisioningError, match="credentials are for S3"):
        configure(wrong_kind, workspace, data_root, sources(S3Server("http://127.0.0.1:9")))


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (remote(http_url="ftp://files.example/x.csv"), "not an http:// or https:// URL"),
        (remote(http_url="https://owner:hunter2@files.example/x.csv"), "not in the URL"),
        (remote(http_url="https://files.example:99999/x.csv"), "not a usable"),
        (remote(s3_url="s3://bucket-only"), "names no object"),
        (remote(s3_url="s3://Bad_Bucket/key"), "not a valid S3 bucket name"),
        (remote(http_url="https://files.example/x.csv", sha256=""), "no recorded sha256"),
        (remote(http_url="https://files.example/x.csv", size_bytes=-1), "negative"),
        (engine_pb2.DatasetFileSource(size_bytes=1), "no location"),
    ],
)
def test_unusable_sources_are_refused_without_naming_them(
    data_root: Path, workspace: Path, source: engine_pb2.DatasetFileSource, message: str
) -> None:
    with pytest.raises(DataProvisioningError, match=message) as caught:
        configure(spec([datasets(source)]), workspace, data_root, sources())
    text = str(caught.value) + configuration_log(workspace)
    for part in ("files.example", "hunter2", "bucket-only", "Bad_Bucket", "x.csv"):
        assert part not in text


def test_the_nodes_limit_on_fetched_bytes_is_checked_first(
    http_source: HttpSource, data_root: Path, workspace: Path
) -> None:
    url = http_source.serve("f.csv", CONTENT)
    job = spec([datasets(remote(http_url=url), remote(http_url=url))])
    with pytest.raises(DataProvisioningError, match="exceed this node's limit"):
        configure(job, workspace, data_root, sources(max_bytes=len(CONTENT) + 1))
    assert http_source.seen == []


@needs_root
def test_files_that_do_not_fit_the_workspace_fail_before_any_fetch(
    http_source: HttpSource, tmp_path: Path, data_root: Path
) -> None:
    """A workspace on a small disk (as a quota'd one is): refused up front, not half way."""
    small = tmp_path / "small"
    small.mkdir()
    mount("c2d-test", small, "tmpfs", 0, "size=256k")
    try:
        url = http_source.serve("f.csv", CONTENT)
        job = spec([datasets(remote(http_url=url, size_bytes=1 << 20))])
        with pytest.raises(DataProvisioningError, match=r"do not fit the \d+ bytes left"):
            configure(job, small, data_root, sources())
        assert http_source.seen == []
    finally:
        unmount(small)


def test_a_stopped_job_stops_its_fetch(
    http_source: HttpSource, data_root: Path, workspace: Path
) -> None:
    http_source.serve("f.csv", CONTENT)
    job = spec([datasets(remote(http_url=http_source.url("/slow/f.csv")))])
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    with pytest.raises(ConfigureStopped):
        configure(job, workspace, data_root, sources(), stopped=stop.is_set)
    assert time.monotonic() - started < 2
    assert leftovers(workspace) == []
    assert "configure stopped" in configuration_log(workspace)


def test_no_message_or_log_names_a_source_or_a_secret(
    s3_server: S3Server,
    s3_bucket: str,
    http_source: HttpSource,
    silent_server: str,
    data_root: Path,
    workspace: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Successes and each kind of failure: the consumer's message, the configuration log, the
    structured log and the standard library's log (httpx logs URLs at INFO) hold no URL, host,
    bucket, key, token or secret."""
    s3_server.put_object(s3_bucket, KEY, CONTENT)
    url = http_source.serve("f.csv", CONTENT)
    s3_url = f"s3://{s3_bucket}/{KEY}"
    cases = [
        remote(s3_url=s3_url, credentials="store"),
        remote(http_url=http_source.url("/private/f.csv"), credentials="api"),
        remote(s3_url=s3_url, credentials="store", sha256="0" * 64),
        remote(s3_url=f"s3://{s3_bucket}/missing/{KEY}", credentials="store"),
        remote(http_url=url, size_bytes=3),
        remote(http_url=http_source.url("/private/f.csv")),
        remote(http_url=http_source.url("/hang")),
        remote(http_url=f"{silent_server}/f.csv"),
        remote(http_url="http://127.0.0.1:9/refused.csv"),
        remote(http_url=url, credentials="unknown-entry"),
    ]
    said: list[str] = []
    caplog.set_level(logging.INFO)
    with structlog.testing.capture_logs() as logs:
        for source in cases:
            try:
                configure(
                    spec([datasets(source)]),
                    workspace,
                    data_root,
                    sources(s3_server, read_timeout_s=0.5, timeout_s=2),
                )
            except DataProvisioningError as error:
                said.append(str(error))
                assert error.__cause__ is None and error.__context__ is None
            said.append(configuration_log(workspace))
    assert len([s for s in said if s.startswith("file 0 of dataset")]) == len(cases) - 2
    said.append(json.dumps(logs, default=str))
    # The standard library's records, but for the test's own S3 server (werkzeug's access log).
    said += [r.getMessage() for r in caplog.records if not r.name.startswith("werkzeug")]
    said.append(repr(sources(s3_server)))
    everything = "\n".join(said)
    host = http_source.base_url.removeprefix("http://")
    endpoint = s3_server.endpoint_url.removeprefix("http://")
    for secret in (s3_bucket, KEY, "sales-q3", host, endpoint, "127.0.0.1", "f.csv", "hang"):
        assert secret not in everything, secret
    for secret in (TOKEN, S3_SECRET, ACCESS_KEY_ID, silent_server, "refused.csv"):
        assert secret not in everything, secret


def test_the_program_form_reads_the_credentials_file_and_limits(
    tmp_path: Path, http_source: HttpSource, data_root: Path, workspace: Path
) -> None:
    http_source.serve("f.csv", CONTENT)
    credentials = tmp_path / "sources.json"
    credentials.write_text(
        json.dumps({"api": {"http": {"headers": {"Authorization": f"Bearer {TOKEN}"}}}})
    )
    credentials.chmod(0o600)
    spec_file = tmp_path / "spec.json"
    job = spec([datasets(remote(http_url=http_source.url("/private/f.csv"), credentials="api"))])
    spec_file.write_text(json_format.MessageToJson(job))
    args = ("--spec", str(spec_file), "--workspace", str(workspace), "--data-root", str(data_root))

    done = run_program(*args, env={"C2D_SOURCE_CREDENTIALS": str(credentials)})
    assert done.returncode == 0, done.stderr
    assert (workspace / "dataset-inputs" / DS1 / "0").read_bytes() == CONTENT
    assert TOKEN not in done.stdout + done.stderr
    assert http_source.url("/") not in done.stdout + done.stderr

    # The limits come from the environment too.
    small = run_program(
        *args, env={"C2D_SOURCE_CREDENTIALS": str(credentials), "C2D_SOURCE_MAX_BYTES": "10"}
    )
    assert small.returncode == 31
    assert "exceed this node's limit of 10 bytes" in json.loads(small.stdout)["message"]

    credentials.chmod(0o644)
    refused = run_program(*args, env={"C2D_SOURCE_CREDENTIALS": str(credentials)})
    assert refused.returncode == 2
    assert "readable or writable by others" in refused.stderr
    assert TOKEN not in refused.stderr
