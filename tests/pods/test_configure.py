"""The configure stage: workspace layout, argv/env/mounts, and every refusal (without ever
naming a dataset's location)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
from c2d.common.v1 import job_pb2
from c2d.engine.v1 import engine_pb2
from google.protobuf import json_format

from pods.configure import (
    AlgorithmProvisioningError,
    DataProvisioningError,
    Mount,
    ProvisioningError,
    configure,
)

REPO = Path(__file__).resolve().parents[2]
JOB = "0123456789abcdef0123456789abcdef"
DS1 = "a1" * 32
DS2 = "b2" * 32
ALG = "c3" * 32
CODE = b"import os\nprint(os.listdir('/data/inputs'))\n"
# A directory name that must never show up in an error message or a log.
ROOT_NAME = "owner-secret-root"


def algorithm(**overrides: object) -> engine_pb2.AlgorithmInput:
    fields: dict[str, object] = {
        "id": ALG,
        "code": CODE,
        "code_sha256": hashlib.sha256(CODE).hexdigest(),
        "entrypoint": "python3 $ALGO --verbose",
    }
    fields.update(overrides)
    return engine_pb2.AlgorithmInput(**fields)  # type: ignore[arg-type]


def spec(
    datasets: list[engine_pb2.DatasetInput],
    alg: engine_pb2.AlgorithmInput | None = None,
    parameters_json: str = "",
    job_id: str = JOB,
) -> engine_pb2.JobSpec:
    return engine_pb2.JobSpec(
        job_id=job_id,
        owner="0x0000000000000000000000000000000000000001",
        datasets=datasets,
        algorithm=alg if alg is not None else algorithm(),
        parameters_json=parameters_json,
        environment="default",
    )


def dataset(
    dataset_id: str, *paths: Path | str, ddo: str = '{"name": "ds"}'
) -> engine_pb2.DatasetInput:
    return engine_pb2.DatasetInput(
        id=dataset_id,
        files=[engine_pb2.DatasetFileSource(path=str(path)) for path in paths],
        ddo_json=ddo,
    )


def make_file(path: Path, content: bytes = b"a,b\n1,2\n", mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    os.chmod(path, mode)
    return path


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / ROOT_NAME
    root.mkdir()
    return root


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir(mode=0o700)
    return ws


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path, follow_symlinks=False).st_mode)


def test_files_made_ahead_are_filled_and_anything_else_is_left_alone(
    tmp_path: Path, data_root: Path, workspace: Path
) -> None:
    """The engine's ready files (pods.workspace) are used before new ones are made; one that is
    a link, or has a second name, is not written through."""
    host = make_file(tmp_path / "host-file", b"host")
    (workspace / ".ready-0").symlink_to(host)
    os.link(host, workspace / ".ready-1")
    (workspace / ".ready-2").write_bytes(b"")
    made_ahead = os.stat(workspace / ".ready-2").st_ino
    job = spec([dataset(DS1, make_file(data_root / "d.csv"))])

    configure(job, workspace, data_root)

    assert host.read_bytes() == b"host"
    assert os.stat(host).st_nlink == 1
    written = [
        workspace / "transformations" / "algorithm",
        workspace / "ddos" / DS1,
        workspace / "logs" / "configuration.log",
    ]
    assert written[0].read_bytes() == CODE
    assert [mode_of(path) for path in written] == [0o444, 0o444, 0o644]
    assert made_ahead in {os.stat(path).st_ino for path in written}
    assert not [name for name in os.listdir(workspace) if name.startswith(".")]


def test_happy_path_lays_out_the_workspace(data_root: Path, workspace: Path) -> None:
    f0 = make_file(data_root / "sales" / "2024.csv", b"x" * 100)
    f1 = make_file(data_root / "sales" / "2025.csv", b"y" * 7)
    f2 = make_file(data_root / "weather.json", b"{}")
    job = spec(
        [dataset(DS1, f0, f1), dataset(DS2, f2, ddo='{"id": "two"}')],
        parameters_json='{"threshold": 3, "mode": "fast"}',
    )

    result = configure(job, workspace, data_root)

    assert result.argv == ["python3", "/data/transformations/algorithm", "--verbose"]
    assert result.env == {
        "DIDS": json.dumps([DS1, DS2]),
        "TRANSFORMATION_DID": f"did:c2d:{ALG}",
        "INPUTS": "/data/inputs",
        "OUTPUTS": "/data/outputs",
        "LOGS": "/data/logs",
        "ALGO": "/data/transformations/algorithm",
    }
    assert json.loads(result.env["DIDS"]) == [DS1, DS2]
    assert result.mounts == [
        Mount(f0.resolve(), f"/data/inputs/{DS1}/0", False),
        Mount(f1.resolve(), f"/data/inputs/{DS1}/1", False),
        Mount(f2.resolve(), f"/data/inputs/{DS2}/0", False),
        Mount(workspace / "algoCustomData.json", "/data/inputs/algoCustomData.json", False),
        Mount(workspace / "ddos", "/data/ddos", False),
        Mount(workspace / "transformations", "/data/transformations", False),
        Mount(workspace / "outputs", "/data/outputs", True),
        Mount(workspace / "logs", "/data/logs", False),
    ]
    # Only the outputs are writable.
    assert [m.sandbox_path for m in result.mounts if m.writable] == ["/data/outputs"]

    code = workspace / "transformations" / "algorithm"
    assert code.read_bytes() == CODE
    assert mode_of(code) == 0o444
    assert (workspace / "ddos" / DS1).read_text() == '{"name": "ds"}'
    assert (workspace / "ddos" / DS2).read_text() == '{"id": "two"}'
    assert mode_of(workspace / "ddos" / DS1) == 0o444
    params = workspace / "algoCustomData.json"
    assert json.loads(params.read_text()) == {"threshold": 3, "mode": "fast"}
    assert mode_of(params) == 0o444
    assert (workspace / "outputs").is_dir()
    assert (workspace / "logs").is_dir()
    # Dataset files are mounted, never copied into the workspace.
    assert not (workspace / "inputs").exists()
    assert sorted(p.name for p in workspace.iterdir()) == [
        "algoCustomData.json",
        "ddos",
        "logs",
        "outputs",
        "transformations",
    ]

    log = (workspace / "logs" / "configuration.log").read_text()
    assert hashlib.sha256(CODE).hexdigest() in log
    assert "verified" in log
    assert f"file 0 of dataset {DS1}: 100 bytes" in log
    assert "configure succeeded" in log
    assert ROOT_NAME not in log and str(data_root) not in log and "2024.csv" not in log
    # No temporary files left behind.
    assert not [p for p in workspace.rglob(".*")]


def test_raw_code_without_parameters(data_root: Path, workspace: Path) -> None:
    f0 = make_file(data_root / "d.csv")
    result = configure(
        spec([dataset(DS1, f0)], alg=algorithm(id="", entrypoint="""node "$ALGO" 'two words'""")),
        workspace,
        data_root,
    )
    assert result.env["TRANSFORMATION_DID"] == ""
    assert result.argv == ["node", "/data/transformations/algorithm", "two words"]
    assert not (workspace / "algoCustomData.json").exists()
    assert "/data/inputs/algoCustomData.json" not in [m.sandbox_path for m in result.mounts]


def test_rerun_replaces_read_only_files(data_root: Path, workspace: Path) -> None:
    f0 = make_file(data_root / "d.csv")
    job = spec([dataset(DS1, f0)], parameters_json="{}")
    configure(job, workspace, data_root)
    first = configure(job, workspace, data_root)
    assert (workspace / "transformations" / "algorithm").read_bytes() == CODE
    assert first.argv[1] == "/data/transformations/algorithm"


def test_symlink_inside_the_root_to_a_file_inside_is_resolved(
    data_root: Path, workspace: Path
) -> None:
    target = make_file(data_root / "real" / "data.csv")
    link = data_root / "alias.csv"
    link.symlink_to(target)
    result = configure(spec([dataset(DS1, link)]), workspace, data_root)
    # The mount names where the bytes are, not the link.
    assert result.mounts[0] == Mount(target.resolve(), f"/data/inputs/{DS1}/0", False)


def test_checksum_mismatch_is_an_algorithm_error(data_root: Path, workspace: Path) -> None:
    f0 = make_file(data_root / "d.csv")
    job = spec([dataset(DS1, f0)], alg=algorithm(code_sha256="0" * 64))
    with pytest.raises(AlgorithmProvisioningError) as caught:
        configure(job, workspace, data_root)
    assert caught.value.reason == job_pb2.FAILURE_REASON_ALGORITHM_PROVISIONING_FAILED
    assert caught.value.status_code == 32
    assert "checksum" in str(caught.value)
    assert not (workspace / "transformations" / "algorithm").exists()
    log = (workspace / "logs" / "configuration.log").read_text()
    assert "configure failed" in log and "checksum" in log


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"code": b"", "code_sha256": hashlib.sha256(b"").hexdigest()}, "no code"),
        ({"entrypoint": "python3 main.py"}, "does not mention"),
        ({"entrypoint": ""}, "does not mention"),
        ({"entrypoint": "python3 '$ALGO"}, "cannot be split"),
        ({"id": "C3" * 32}, "algorithm id"),
        ({"id": "../../etc"}, "algorithm id"),
    ],
)
def test_unusable_algorithms_are_refused(
    data_root: Path, workspace: Path, overrides: dict[str, object], message: str
) -> None:
    f0 = make_file(data_root / "d.csv")
    with pytest.raises(AlgorithmProvisioningError, match=message):
        configure(spec([dataset(DS1, f0)], alg=algorithm(**overrides)), workspace, data_root)


@pytest.mark.parametrize("parameters", ["[1, 2]", "42", "not json", '{"a": NaN}', '"text"'])
def test_parameters_must_be_a_json_object(
    data_root: Path, workspace: Path, parameters: str
) -> None:
    f0 = make_file(data_root / "d.csv")
    with pytest.raises(AlgorithmProvisioningError, match="JSON object"):
        configure(spec([dataset(DS1, f0)], parameters_json=parameters), workspace, data_root)
    assert not (workspace / "algoCustomData.json").exists()


def _outside_root(tmp_path: Path, root: Path) -> str:
    return str(make_file(tmp_path / "elsewhere-private" / "leak.csv"))


def _symlink_out(tmp_path: Path, root: Path) -> str:
    target = make_file(tmp_path / "elsewhere-private" / "leak.csv")
    link = root / "innocent-link.csv"
    link.symlink_to(target)
    return str(link)


def _dotdot(tmp_path: Path, root: Path) -> str:
    make_file(tmp_path / "elsewhere-private" / "leak.csv")
    return str(root / ".." / "elsewhere-private" / "leak.csv")


def _directory(tmp_path: Path, root: Path) -> str:
    (root / "a-directory").mkdir()
    return str(root / "a-directory")


def _missing(tmp_path: Path, root: Path) -> str:
    return str(root / "no-such-file.csv")


def _not_world_readable(tmp_path: Path, root: Path) -> str:
    return str(make_file(root / "private-mode.csv", mode=0o640))


def _fifo(tmp_path: Path, root: Path) -> str:
    os.mkfifo(root / "a-fifo")
    return str(root / "a-fifo")


def _relative(tmp_path: Path, root: Path) -> str:
    make_file(root / "rel.csv")
    return "owner-secret-root/rel.csv"


def _the_root_itself(tmp_path: Path, root: Path) -> str:
    return str(root)


def _symlink_loop(tmp_path: Path, root: Path) -> str:
    (root / "loop-a").symlink_to(root / "loop-b")
    (root / "loop-b").symlink_to(root / "loop-a")
    return str(root / "loop-a")


@pytest.mark.parametrize(
    ("make_path", "message"),
    [
        (_outside_root, "not under the data root"),
        (_symlink_out, "not under the data root"),
        (_dotdot, "not under the data root"),
        (_directory, "not a regular file"),
        (_fifo, "not a regular file"),
        (_missing, "not found"),
        (_symlink_loop, "not found"),
        (_not_world_readable, "not readable by the sandbox (grant read to others)"),
        (_relative, "not an absolute path under the data root"),
        (_the_root_itself, "not under the data root"),
    ],
)
def test_bad_dataset_files_are_refused_without_naming_them(
    tmp_path: Path,
    data_root: Path,
    workspace: Path,
    make_path: object,
    message: str,
) -> None:
    good = make_file(data_root / "good.csv")
    bad = make_path(tmp_path, data_root)  # type: ignore[operator]
    job = spec([dataset(DS2, good), dataset(DS1, good, bad)])
    with pytest.raises(DataProvisioningError) as caught:
        configure(job, workspace, data_root)
    text = str(caught.value)
    assert text == f"file 1 of dataset {DS1}: {message}"
    assert caught.value.reason == job_pb2.FAILURE_REASON_DATA_PROVISIONING_FAILED
    assert caught.value.status_code == 31
    # Nothing of the path leaks: not the message, not the exception chain, not the log.
    log = (workspace / "logs" / "configuration.log").read_text()
    secrets = [str(tmp_path), ROOT_NAME, "elsewhere-private", "leak.csv", "innocent-link"]
    secrets += ["a-directory", "no-such-file", "private-mode", "a-fifo", "rel.csv", "loop-"]
    for secret in secrets:
        assert secret not in text
        assert secret not in log
    assert caught.value.__cause__ is None
    assert caught.value.__context__ is None


def test_missing_data_root_is_a_data_error(tmp_path: Path, workspace: Path) -> None:
    root = tmp_path / ROOT_NAME
    with pytest.raises(DataProvisioningError, match="data root is not available") as caught:
        configure(spec([dataset(DS1, root / "x.csv")]), workspace, root)
    assert ROOT_NAME not in str(caught.value)


@pytest.mark.parametrize("bad_id", ["A1" * 32, "a1" * 31, "../" + "a" * 61, "", "g" * 64])
def test_bad_dataset_ids_are_refused(data_root: Path, workspace: Path, bad_id: str) -> None:
    f0 = make_file(data_root / "d.csv")
    with pytest.raises(DataProvisioningError, match="dataset id"):
        configure(spec([dataset(bad_id, f0)]), workspace, data_root)
    assert list((workspace / "ddos").iterdir()) == []


def test_duplicate_dataset_ids_are_refused(data_root: Path, workspace: Path) -> None:
    f0 = make_file(data_root / "d.csv")
    with pytest.raises(DataProvisioningError, match="listed twice"):
        configure(spec([dataset(DS1, f0), dataset(DS1, f0)]), workspace, data_root)


@pytest.mark.parametrize("bad_job", ["", "0123", "0123456789ABCDEF0123456789ABCDEF", "../" * 11])
def test_bad_job_ids_are_refused(data_root: Path, workspace: Path, bad_job: str) -> None:
    f0 = make_file(data_root / "d.csv")
    with pytest.raises(ValueError, match="job id"):
        configure(spec([dataset(DS1, f0)], job_id=bad_job), workspace, data_root)
    assert not isinstance(ValueError(), ProvisioningError)


def run_program(
    *args: str, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m pods.configure ARGS`, with `env` added to this process's environment."""
    return subprocess.run(
        [sys.executable, "-m", "pods.configure", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "C2D_LOG_FORMAT": "json", **(env or {})},
    )


def test_program_form(tmp_path: Path, data_root: Path, workspace: Path) -> None:
    f0 = make_file(data_root / "d.csv")
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json_format.MessageToJson(spec([dataset(DS1, f0)])))
    done = run_program(
        "--spec", str(spec_file), "--workspace", str(workspace), "--data-root", str(data_root)
    )
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed["argv"] == ["python3", "/data/transformations/algorithm", "--verbose"]
    assert printed["env"]["DIDS"] == json.dumps([DS1])
    assert {
        "host_path": str(f0.resolve()),
        "sandbox_path": f"/data/inputs/{DS1}/0",
        "writable": False,
    } in printed["mounts"]

    os.chmod(f0, 0o600)
    failed = run_program(
        "--spec", str(spec_file), "--workspace", str(workspace), "--data-root", str(data_root)
    )
    assert failed.returncode == 31
    assert json.loads(failed.stdout) == {
        "reason": "FAILURE_REASON_DATA_PROVISIONING_FAILED",
        "message": f"file 0 of dataset {DS1}: not readable by the sandbox (grant read to others)",
    }
    assert ROOT_NAME not in failed.stdout + failed.stderr
