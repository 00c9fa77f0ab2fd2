"""The configure stage's `stored` dataset files (copies of jobs' outputs in the node's results
storage): on local disk checked where they are (size, readable by the sandbox, sha256) and
bind-mounted, not copied; copied into the workspace when asked to (a Kubernetes configure pod)
or from S3 (moto's server on 127.0.0.1); anything that does not match its record fails the job
with a data provisioning failure naming the file by its position only. Also the program form
with --storage."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
from c2d.engine.v1 import engine_pb2
from google.protobuf import json_format

from mesh.storage import LocalStorage
from mesh.storage_s3 import S3Storage
from pods.configure import ConfigureStopped, DataProvisioningError, Mount, configure
from tests.pods.test_configure import DS1, mode_of, run_program, spec
from tests.pods.test_configure_sources import configuration_log
from tests.s3_server import S3Server

EARLIER_JOB = "fedcba9876543210fedcba9876543210"
CONTENT = b"1\n4\n9\n16\n"
TARGET = f"/data/inputs/{DS1}/0"


def stored(content: bytes = CONTENT, key: str = f"datasets/{DS1}/0000") -> engine_pb2.JobSpec:
    source = engine_pb2.DatasetFileSource(
        stored=key, size_bytes=len(content), sha256=hashlib.sha256(content).hexdigest()
    )
    return spec([engine_pb2.DatasetInput(id=DS1, files=[source], ddo_json="{}")])


async def exported(storage: LocalStorage | S3Storage, content: bytes = CONTENT) -> None:
    """File 0 of DS1 in the storage's dataset area, as ExportResults leaves it."""
    put = await storage.put(EARLIER_JOB, "0000", io.BytesIO(content))
    await storage.export_result(EARLIER_JOB, "0000", DS1, 0, size=put.size, sha256=put.sha256)


@pytest.fixture
def local(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "results")


async def test_a_local_stored_file_is_checked_and_mounted_where_it_is(
    tmp_path: Path, local: LocalStorage
) -> None:
    await exported(local)
    workspace = tmp_path / "ws"
    result = configure(stored(), workspace, tmp_path / "data", storage=local)
    assert Mount(local.dataset_file(DS1, 0), TARGET) in result.mounts
    assert not (workspace / "dataset-inputs").exists()
    assert (
        f"file 0 of dataset {DS1}: {len(CONTENT)} bytes in the node's storage"
        in configuration_log(workspace)
    )
    # The storage's settings never reach the algorithm's environment.
    assert set(result.env) == {"DIDS", "TRANSFORMATION_DID", "INPUTS", "OUTPUTS", "LOGS", "ALGO"}


async def test_asked_to_copy_it_the_stage_copies_it_into_the_workspace(
    tmp_path: Path, local: LocalStorage
) -> None:
    await exported(local)
    workspace = tmp_path / "ws"
    result = configure(stored(), workspace, tmp_path / "data", storage=local, copy_stored=True)
    copy = workspace / "dataset-inputs" / DS1 / "0"
    assert Mount(copy, TARGET) in result.mounts
    assert copy.read_bytes() == CONTENT
    assert mode_of(copy) == 0o444
    assert "copied from the node's storage" in configuration_log(workspace)


async def test_from_s3_it_is_copied_and_checked(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str
) -> None:
    storage = S3Storage(s3_server.settings, s3_bucket, "node-results")
    try:
        await exported(storage)
        workspace = tmp_path / "ws"
        result = configure(stored(), workspace, tmp_path / "data", storage=storage)
        copy = workspace / "dataset-inputs" / DS1 / "0"
        assert Mount(copy, TARGET) in result.mounts
        assert copy.read_bytes() == CONTENT
        with pytest.raises(DataProvisioningError, match="does not match"):
            configure(
                stored(b"1\n4\n9\n17\n"), tmp_path / "ws2", tmp_path / "data", storage=storage
            )
        assert not (tmp_path / "ws2" / "dataset-inputs" / DS1 / "0").exists()
        # A stop while copying ends the stage, leaving nothing half-made.
        with pytest.raises(ConfigureStopped):
            configure(
                stored(), tmp_path / "ws3", tmp_path / "data", storage=storage, stopped=lambda: True
            )
        assert list((tmp_path / "ws3" / "dataset-inputs" / DS1).iterdir()) == []
    finally:
        storage.close()


@pytest.mark.parametrize(
    ("problem", "message"),
    [
        ("no storage", "no results storage"),
        ("bad key", "not a file of this node's dataset area"),
        ("missing", "not stored on this node"),
        ("other size", "bytes stored, not its recorded"),
        ("unreadable", "not readable by the sandbox"),
        ("tampered", "does not match its recorded size and sha256"),
    ],
)
async def test_what_does_not_match_its_record_fails_the_job(
    tmp_path: Path, local: LocalStorage, problem: str, message: str
) -> None:
    await exported(local)
    copy = local.dataset_file(DS1, 0)
    job = stored()
    storage: LocalStorage | None = local
    if problem == "no storage":
        storage = None
    elif problem == "bad key":
        job = stored(key=f"{EARLIER_JOB}/0000")
    elif problem == "missing":
        copy.unlink()
    elif problem == "other size":
        job = stored(CONTENT + b"25\n")
    elif problem == "unreadable":
        copy.chmod(0o400)
    elif problem == "tampered":
        copy.unlink()
        copy.write_bytes(b"1\n4\n9\n17\n")
        copy.chmod(0o444)
    with pytest.raises(DataProvisioningError, match=message) as refused:
        configure(job, tmp_path / "ws", tmp_path / "data", storage=storage)
    assert str(refused.value).startswith(f"file 0 of dataset {DS1}: ")
    assert str(local.root) not in str(refused.value)
    assert str(local.root) not in configuration_log(tmp_path / "ws")


async def test_the_program_form_reads_the_storage_it_is_given(
    tmp_path: Path, local: LocalStorage
) -> None:
    await exported(local)
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json_format.MessageToJson(stored()))
    workspace = tmp_path / "ws"
    (tmp_path / "data").mkdir()
    common = ("--spec", str(spec_file), "--data-root", str(tmp_path / "data"))
    done = run_program(
        *common, "--workspace", str(workspace), "--storage", str(local.root), "--copy-stored"
    )
    assert done.returncode == 0, done.stderr
    mounts = json.loads(done.stdout)["mounts"]
    assert {
        "host_path": str(workspace / "dataset-inputs" / DS1 / "0"),
        "sandbox_path": TARGET,
        "writable": False,
    } in mounts
    # Without --storage there is nothing to read it from: a data provisioning failure (31).
    done = run_program(*common, "--workspace", str(tmp_path / "ws2"))
    assert done.returncode == 31, done.stderr
    assert "no results storage" in json.loads(done.stdout)["message"]
