"""The node's source credentials file (C2D_SOURCE_CREDENTIALS): loaded and checked at engine
start, refused when others may read it, looked up by name at job time, and never printed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mesh.s3 import S3Settings
from operator_engine.config import EngineConfig
from operator_engine.sources import (
    HttpCredential,
    S3Credential,
    SourceSettings,
    UnknownCredentials,
    load_credentials,
)

SECRET = "wJalrXUtnFEMI-never-printed"
TOKEN = "Bearer tok-never-printed"
GOOD: dict[str, Any] = {
    "warehouse": {
        "s3": {
            "endpoint_url": "https://s3.example",
            "region": "eu-west-1",
            "access_key_id": "AKIDEXAMPLE",
            "secret_access_key": SECRET,
            "session_token": "session-never-printed",
            "path_style": False,
        }
    },
    "partner": {"http": {"headers": {"Authorization": TOKEN, "X-Tenant": "t1"}}},
}


def write(tmp_path: Path, document: Any, mode: int = 0o600) -> Path:
    path = tmp_path / "sources.json"
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    path.chmod(mode)
    return path


def test_a_good_file_is_loaded_and_looked_up_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("C2D_SOURCE_CREDENTIALS", str(write(tmp_path, GOOD)))
    monkeypatch.setenv("C2D_SOURCE_MAX_BYTES", "1000")
    monkeypatch.setenv("C2D_SOURCE_TIMEOUT_S", "30")
    settings = SourceSettings.from_env()
    assert (settings.max_bytes, settings.timeout_s) == (1000, 30.0)

    s3 = settings.s3_settings("warehouse")
    assert (s3.endpoint_url, s3.region, s3.secret_access_key) == (
        "https://s3.example",
        "eu-west-1",
        SECRET,
    )
    assert s3.path_style is False
    # The node's fetch timeouts, never above the time per file.
    assert (s3.connect_timeout_s, s3.read_timeout_s) == (10.0, 30.0)
    assert settings.http_headers("partner") == {"Authorization": TOKEN, "X-Tenant": "t1"}
    assert settings.http_headers("") == {}
    with pytest.raises(UnknownCredentials, match=r"^unknown source credentials$"):
        settings.http_headers("nobody")
    with pytest.raises(UnknownCredentials, match="for HTTP, not"):
        settings.s3_settings("partner")
    with pytest.raises(UnknownCredentials, match="for S3, not"):
        settings.http_headers("warehouse")
    # What the configure pod is told: limits, no secret.
    assert settings.limits_env() == {"C2D_SOURCE_MAX_BYTES": "1000", "C2D_SOURCE_TIMEOUT_S": "30.0"}
    for shown in (repr(settings), str(settings), repr(settings.credentials)):
        assert SECRET not in shown and TOKEN not in shown and "session-never" not in shown


def test_no_name_means_the_nodes_default_s3_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("C2D_S3_ENDPOINT", "http://127.0.0.1:9000")
    monkeypatch.setenv("C2D_S3_REGION", "us-east-1")
    settings = SourceSettings(credentials={"x": HttpCredential({"A": "b"})})
    s3 = settings.s3_settings("")
    assert (s3.endpoint_url, s3.region) == ("http://127.0.0.1:9000", "us-east-1")


def test_the_engine_config_holds_the_loaded_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, GOOD)
    monkeypatch.setenv("C2D_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("C2D_SOURCE_CREDENTIALS", str(path))
    config = EngineConfig.from_env()
    assert config.sources.credentials_file == path
    assert isinstance(config.sources.credentials["warehouse"], S3Credential)
    assert SECRET not in repr(config) and TOKEN not in repr(config)
    monkeypatch.delenv("C2D_SOURCE_CREDENTIALS")
    assert EngineConfig.from_env().sources.credentials == {}


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ("{not json", "not JSON (Expecting property name enclosed in double quotes at line 1)"),
        ([1, 2], "must be a JSON object of named entries"),
        ({"bad name!": {"http": {"headers": {"A": "b"}}}}, "an entry name must be"),
        ({"w": {"ftp": {}}}, "entry 'w': must be an object with one key"),
        ({"w": {"s3": {"secret_access_key": SECRET}}}, "entry 'w': an S3 access key id needs"),
        ({"w": {"s3": {"endpoint_url": "s3.example"}}}, "entry 'w': an S3 endpoint is an"),
        ({"w": {"s3": {"password": SECRET}}}, "entry 'w': unknown S3 settings ['password']"),
        ({"w": {"s3": {"region": 5}}}, "entry 'w': S3 setting 'region' must be a string"),
        ({"w": {"http": {"headers": {}}}}, "entry 'w': \"headers\" must be a non-empty object"),
        ({"w": {"http": {"headers": {"Host": "x"}}}}, "entry 'w': header 'Host' is not"),
        (
            {"w": {"http": {"headers": {"Authorization": f"{SECRET}\r\nX: y"}}}},
            "entry 'w': the value of header 'Authorization' must be one line of text",
        ),
    ],
)
def test_a_bad_file_is_named_with_its_entry_and_no_secret(
    tmp_path: Path, document: Any, expected: str
) -> None:
    path = write(tmp_path, document)
    with pytest.raises(ValueError) as caught:
        load_credentials(path)
    message = str(caught.value)
    assert message.startswith(f"C2D_SOURCE_CREDENTIALS {path}: {expected}")
    assert SECRET not in message and "\n" not in message
    assert caught.value.__cause__ is None


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o602])
def test_a_file_others_may_read_or_change_is_refused(tmp_path: Path, mode: int) -> None:
    path = write(tmp_path, GOOD, mode)
    with pytest.raises(ValueError) as caught:
        load_credentials(path)
    assert str(caught.value) == (
        f"C2D_SOURCE_CREDENTIALS {path} is readable or writable by others (mode {mode:04o}) "
        "and holds secrets: refused, as ssh refuses such a key; chmod o-rw it"
    )
    # Owner and group only is fine: a Kubernetes Secret mounted for the pod's group is 0440.
    path.chmod(0o640)
    assert set(load_credentials(path)) == {"warehouse", "partner"}


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"sources\.json cannot be read \(No such file"):
        load_credentials(tmp_path / "sources.json")


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="C2D_SOURCE_MAX_BYTES"):
        SourceSettings(max_bytes=0)
    with pytest.raises(ValueError, match="C2D_SOURCE_TIMEOUT_S"):
        SourceSettings(timeout_s=0)


def test_the_engine_refuses_to_start_with_a_bad_file_in_one_line(tmp_path: Path) -> None:
    """Through mesh.config.load, before anything else starts: exit 2, one line, the file and
    the entry named, no secret printed."""
    path = write(tmp_path, {"ok": GOOD["partner"], "broken": {"s3": {"secret_access_key": SECRET}}})

    def start(**env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "operator_engine"],
            env={**os.environ, "C2D_HOME": str(tmp_path / "home"), "C2D_LOG_FORMAT": "json", **env},
            capture_output=True,
            text=True,
            timeout=30,
        )

    run = start(C2D_SOURCE_CREDENTIALS=str(path))
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"operator_engine: bad configuration: C2D_SOURCE_CREDENTIALS {path}: entry 'broken': "
        "an S3 access key id needs its secret access key, and the reverse"
    ]
    assert SECRET not in run.stderr + run.stdout

    path.chmod(0o644)
    run = start(C2D_SOURCE_CREDENTIALS=str(path))
    assert run.returncode == 2
    assert "readable or writable by others" in run.stderr
    assert SECRET not in run.stderr + run.stdout


def test_s3_entries_are_plain_s3_settings() -> None:
    credential = S3Credential(S3Settings(endpoint_url="http://127.0.0.1:1"))
    assert SourceSettings(credentials={"a": credential}).s3_settings("a").endpoint_url == (
        "http://127.0.0.1:1"
    )
