"""The publish stage keeps what the consumer chose (ResultSelection): outputs only leaves the
algorithm's and the configuration log out, logs only never even looks at the outputs;
publish.log is stored in every case and says what was left out. In-process and as the
program the Kubernetes publish pod runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from c2d.common.v1 import job_pb2

from mesh.storage import LocalStorage, RewindableSource, Source, StoredObject
from pods.publish import PublishError, PublishResult, publish, publish_blocking
from tests.pods.test_publish import JOB, Kind, check_consistent, run_program

OUTPUTS_ONLY = "not stored, the consumer asked for outputs only"
LOGS_ONLY = "outputs: not stored, the consumer asked for logs only"


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    (ws / "outputs" / "sub").mkdir(parents=True)
    (ws / "outputs" / "answer.txt").write_bytes(b"42\n")
    (ws / "outputs" / "sub" / "model.bin").write_bytes(b"\x00" * 5000)
    (ws / "logs").mkdir()
    (ws / "logs" / "algorithm.log").write_bytes(b"computing\n")
    (ws / "logs" / "configuration.log").write_bytes(b"configure succeeded\n")
    return ws


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "store")


def listed(result: PublishResult) -> list[tuple[str, int]]:
    return [(r.name, r.kind) for r in result.results]


def stored_keys(root: Path) -> list[str]:
    return sorted(p.name for p in (root / JOB).iterdir() if not p.name.startswith("."))


@pytest.mark.parametrize(
    "selection", [job_pb2.RESULT_SELECTION_UNSPECIFIED, job_pb2.RESULT_SELECTION_OUTPUTS_AND_LOGS]
)
async def test_unset_or_both_keeps_outputs_and_logs(
    workspace: Path, storage: LocalStorage, selection: int
) -> None:
    result = await publish(workspace, storage, JOB, max_total_bytes=1 << 20, results=selection)
    assert listed(result) == [
        ("answer.txt", Kind.KIND_OUTPUT),
        ("sub/model.bin", Kind.KIND_OUTPUT),
        ("algorithm.log", Kind.KIND_ALGORITHM_LOG),
        ("configuration.log", Kind.KIND_CONFIGURATION_LOG),
        ("publish.log", Kind.KIND_PUBLISH_LOG),
    ]
    await check_consistent(storage, result)
    assert "consumer asked" not in (workspace / "logs" / "publish.log").read_text()


async def test_outputs_only_leaves_the_logs_out_but_publish_log(
    tmp_path: Path, workspace: Path, storage: LocalStorage
) -> None:
    result = await publish(
        workspace, storage, JOB, max_total_bytes=1 << 20, results=job_pb2.RESULT_SELECTION_OUTPUTS
    )
    assert listed(result) == [
        ("answer.txt", Kind.KIND_OUTPUT),
        ("sub/model.bin", Kind.KIND_OUTPUT),
        ("publish.log", Kind.KIND_PUBLISH_LOG),
    ]
    await check_consistent(storage, result)
    # Nothing else reached the storage: the logs were never read.
    assert stored_keys(tmp_path / "store") == ["0000", "0001", "0002"]
    text = (workspace / "logs" / "publish.log").read_text()
    assert f"algorithm.log: {OUTPUTS_ONLY}" in text
    assert f"configuration.log: {OUTPUTS_ONLY}" in text
    assert "this log is result 2" in text


async def test_logs_only_never_looks_at_the_outputs(
    tmp_path: Path, workspace: Path, storage: LocalStorage
) -> None:
    outputs = workspace / "outputs"
    # What a walk would report (a link) or count against the caps (a file far too large).
    (outputs / "passwd").symlink_to("/etc/passwd")
    (outputs / "huge.bin").write_bytes(b"x" * 4096)
    result = publish_blocking(
        workspace, storage, JOB, max_total_bytes=10, results=job_pb2.RESULT_SELECTION_LOGS
    )
    assert listed(result) == [
        ("algorithm.log", Kind.KIND_ALGORITHM_LOG),
        ("configuration.log", Kind.KIND_CONFIGURATION_LOG),
        ("publish.log", Kind.KIND_PUBLISH_LOG),
    ]
    assert not result.too_large
    assert result.skipped == []
    await check_consistent(storage, result)
    assert stored_keys(tmp_path / "store") == ["0000", "0001", "0002"]
    text = (workspace / "logs" / "publish.log").read_text()
    assert LOGS_ONLY in text
    assert "passwd" not in text and "huge.bin" not in text


async def test_outputs_only_with_the_engine_holding_the_algorithm_log(
    workspace: Path, storage: LocalStorage
) -> None:
    # The Kubernetes engine stores the algorithm log itself; outputs only says it is left out.
    result = publish_blocking(
        workspace,
        storage,
        JOB,
        max_total_bytes=1 << 20,
        algorithm_log=False,
        results=job_pb2.RESULT_SELECTION_OUTPUTS,
    )
    assert [r.name for r in result.results] == ["answer.txt", "sub/model.bin", "publish.log"]
    text = (workspace / "logs" / "publish.log").read_text()
    assert f"algorithm.log: {OUTPUTS_ONLY}" in text
    assert "stored by the engine" not in text


class OutputsRefused(LocalStorage):
    """A store that takes logs but refuses outputs (as one that fills up would)."""

    def put_blocking(self, job_id: str, key: str, source: Source) -> StoredObject:
        raise OSError("no room")

    def put_log_blocking(
        self, job_id: str, key: str, source: RewindableSource, *, store_down: bool = False
    ) -> StoredObject:
        return LocalStorage.put_blocking(self, job_id, key, source)


async def test_a_failed_publish_still_stores_publish_log_whatever_the_choice(
    tmp_path: Path, workspace: Path
) -> None:
    storage = OutputsRefused(tmp_path / "store")
    with pytest.raises(PublishError) as caught:
        publish_blocking(
            workspace,
            storage,
            JOB,
            max_total_bytes=1 << 20,
            results=job_pb2.RESULT_SELECTION_OUTPUTS,
        )
    assert [r.name for r in caught.value.results] == ["publish.log"]
    text = (workspace / "logs" / "publish.log").read_text()
    assert "publish failed" in text and f"algorithm.log: {OUTPUTS_ONLY}" in text


def test_an_unknown_selection_is_refused(workspace: Path, storage: LocalStorage) -> None:
    with pytest.raises(ValueError, match="result selection"):
        publish_blocking(workspace, storage, JOB, max_total_bytes=1 << 20, results=7)
    assert not (workspace / "logs" / "publish.log").exists()


@pytest.mark.parametrize(
    ("flag", "names"),
    [
        ("outputs", ["answer.txt", "sub/model.bin", "publish.log"]),
        ("logs", ["algorithm.log", "configuration.log", "publish.log"]),
        (
            "both",
            ["answer.txt", "sub/model.bin", "algorithm.log", "configuration.log", "publish.log"],
        ),
    ],
)
def test_the_program_takes_the_choice_as_a_flag(
    tmp_path: Path, workspace: Path, flag: str, names: list[str]
) -> None:
    store = tmp_path / "program-store"
    done = run_program(
        "--workspace",
        str(workspace),
        "--storage",
        str(store),
        "--job-id",
        JOB,
        "--max-total-bytes",
        "100000",
        "--results",
        flag,
    )
    assert done.returncode == 0, done.stderr
    assert [r["name"] for r in json.loads(done.stdout)["results"]] == names
    assert len(stored_keys(store)) == len(names)


def test_the_program_refuses_an_unknown_choice(tmp_path: Path, workspace: Path) -> None:
    done = run_program(
        "--workspace",
        str(workspace),
        "--storage",
        str(tmp_path / "store"),
        "--job-id",
        JOB,
        "--max-total-bytes",
        "1000",
        "--results",
        "everything",
    )
    assert done.returncode == 2
    assert "--results" in done.stderr
