"""A private algorithm's code never reaches its job's log: not through a traceback, not through
a SyntaxError, neither in the live stream nor in the published log; what the algorithm prints
otherwise stays, live, within the log's cap. A public algorithm's log is left as it is."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
from c2d.common.v1 import job_pb2
from c2d.operator.v1 import operator_pb2

from operator_engine.private_log import NOTICE, CodeRedactor
from tests.conftest import needs_root, new_key
from tests.operator_service.node import Node, running_node

State = job_pb2.Job.State
WITHHELD = NOTICE.decode()

CRASHING = b'''import sys

SECRET_WEIGHTS = [0.1932, 0.4471, 0.3597]


def score_the_cohort(rows):
    """Our secret sauce: cohort scoring."""
    total = sum(w * r for w, r in zip(SECRET_WEIGHTS, rows))
    print("partial score computed", flush=True)
    if total > 0:
        raise ValueError("boom")  # distinctive-line-7f3a
    return total


print("starting the analysis", flush=True)
score_the_cohort([1, 2, 3])
'''

BROKEN = b"""print("never printed")
weights = [0.25, 0.75]
def secret_kernel(x:   # distinctive-syntax-9c1e
    return x * weights[0]
"""


def code_lines(code: bytes) -> list[str]:
    return [line.strip() for line in code.decode().splitlines() if line.strip()]


def assert_no_code(log: str, code: bytes) -> None:
    for line in log.splitlines():
        assert line.strip() not in code_lines(code), f"a line of the code in the log: {line!r}"


def redact(code: bytes, chunks: list[bytes]) -> bytes:
    redactor = CodeRedactor.for_code(code)
    assert redactor is not None
    return b"".join(redactor.feed(chunk) for chunk in chunks) + redactor.finish()


# -- the filter alone --------------------------------------------------------------------------


def test_lines_of_the_code_are_withheld_however_the_output_is_cut() -> None:
    code = "x = compute('héllo')\n    if  x:\n\tsecret()\r\n".encode()
    output = (
        "start\n"
        "    x = compute('héllo')\n"  # as a traceback prints it
        "x = compute('héllo') and more\n"  # not a line of the code
        "if  x:\r\n"
        "  secret()   \n"
        "  \n"
        "done, no newline at the end: secret()"
    ).encode()
    expected = (
        f"start\n{WITHHELD}\nx = compute('héllo') and more\n{WITHHELD}\r\n{WITHHELD}\n  \n"
        "done, no newline at the end: secret()"
    ).encode()
    assert redact(code, [output]) == expected
    # Cut anywhere, a multi-byte character too, the output is filtered alike.
    for size in (1, 2, 3, 7):
        assert redact(code, [output[i : i + size] for i in range(0, len(output), size)]) == (
            expected
        )
    generator = random.Random(7)
    for _ in range(50):
        cuts = sorted(generator.sample(range(1, len(output)), 6))
        chunks = [output[a:b] for a, b in zip([0, *cuts], [*cuts, len(output)], strict=True)]
        assert redact(code, chunks) == expected


def test_a_line_that_cannot_be_code_streams_at_once_and_one_that_may_waits() -> None:
    redactor = CodeRedactor.for_code(b"secret_call(1)\n")
    assert redactor is not None
    assert redactor.feed(b"progress: 10%") == b"progress: 10%"
    assert redactor.feed(b" 20%") == b" 20%"
    assert redactor.feed(b"\n  secret_") == b"\n"  # may become a line of the code: held
    assert redactor.feed(b"call(1)  ") == b""
    assert redactor.feed(b"\n") == NOTICE + b"\n"
    assert redactor.feed(b"secret_call(2)") == b"secret_call(2)"  # no longer can be
    assert redactor.feed(b"secret_call(1)") == b"secret_call(1)"  # the same line goes on
    assert redactor.finish() == b""
    assert redactor.feed(b"secret_call(1)") == b""
    assert redactor.finish() == NOTICE  # the last line, unfinished


def test_what_is_held_is_bounded() -> None:
    redactor = CodeRedactor.for_code(b"secret_call(1)\n")
    assert redactor is not None
    out = redactor.feed(b" " * (200 * 1024))  # whitespace: it shows nothing, so it goes
    assert out == b" " * (200 * 1024)
    out = redactor.feed(b"secret_call(1)")
    assert out == b""
    out = redactor.feed(b" " * (200 * 1024))  # decided there and then
    assert out.startswith(NOTICE) and len(out) == len(NOTICE) + 200 * 1024
    assert redactor.feed(b"more\n") == b"more\n"


def test_code_without_a_line_to_withhold_needs_no_filter() -> None:
    assert CodeRedactor.for_code(b"") is None
    assert CodeRedactor.for_code(b"\n   \n\t\n") is None


def test_a_coding_cookie_is_honoured() -> None:
    code = "# -*- coding: latin-1 -*-\nprint('café')\n".encode("latin-1")
    assert redact(code, ["    print('café')\n".encode()]) == NOTICE + b"\n"


# -- jobs --------------------------------------------------------------------------------------


async def run_private(node: Node, code: bytes, *, private: bool = True) -> tuple[str, str]:
    """Runs a job to its end while following its live log; returns the live log and the
    published one."""
    owner = new_key().address
    spec = node.spec(owner, code, private=private)
    await node.create(spec)
    live = asyncio.ensure_future(node.log(spec.job_id, owner))
    final = (await node.watch_to_end(spec.job_id, owner))[-1]
    assert final.state == State.STATE_FAILED
    assert final.failure_reason == job_pb2.FAILURE_REASON_ALGORITHM_EXIT_NONZERO
    return await live, await node.algorithm_log(final, owner)


@needs_root
async def test_a_private_algorithms_traceback_shows_the_error_but_not_the_code(
    tmp_path: Path,
) -> None:
    async with running_node(tmp_path) as node:
        live, published = await run_private(node, CRASHING)
        assert live == published
        assert "starting the analysis\n" in published
        assert "partial score computed\n" in published
        assert "Traceback (most recent call last):" in published
        assert "line 11, in score_the_cohort" in published
        assert "ValueError: boom" in published
        assert published.count(WITHHELD) == 2  # the call, and the raise
        assert "distinctive-line-7f3a" not in published
        assert "score_the_cohort([1, 2, 3])" not in published
        assert_no_code(published, CRASHING)

        # The same code, public: its traceback is left as Python prints it.
        live, published = await run_private(node, CRASHING, private=False)
        assert 'raise ValueError("boom")  # distinctive-line-7f3a' in published
        assert WITHHELD not in published


@needs_root
async def test_a_private_algorithms_syntax_error_shows_the_error_but_not_the_line(
    tmp_path: Path,
) -> None:
    async with running_node(tmp_path) as node:
        live, published = await run_private(node, BROKEN)
        assert live == published
        assert "SyntaxError" in published
        assert WITHHELD in published
        assert "distinctive-syntax-9c1e" not in published
        assert "secret_kernel" not in published
        assert_no_code(published, BROKEN)


@needs_root
async def test_a_private_algorithms_output_streams_live(tmp_path: Path) -> None:
    code = (
        b"import time\n"
        b"print('progress', end='', flush=True)\n"
        b"print(' 50%', end='', flush=True)\n"
        b"time.sleep(600)\n"
    )
    owner = new_key().address
    async with running_node(tmp_path) as node:
        spec = node.spec(owner, code, private=True)
        await node.create(spec)
        seen = ""
        request = operator_pb2.StreamJobLogsRequest(job_id=spec.job_id, owner=owner)
        async with asyncio.timeout(30):
            async for response in node.operator.StreamJobLogs(request):
                seen += response.chunk.text
                if seen == "progress 50%":
                    break
        # The algorithm sleeps until it is stopped: what arrived came while it ran.
        assert (await node.get(spec.job_id, owner)).state == State.STATE_RUNNING
        stop = operator_pb2.StopJobRequest(job_id=spec.job_id, owner=owner)
        stopped = (await node.operator.StopJob(stop)).job
        assert stopped.state == State.STATE_CANCELLED
        assert await node.algorithm_log(stopped, owner) == "progress 50%"


@needs_root
@pytest.mark.parametrize("newlines", [True, False])
async def test_a_flood_from_a_private_algorithm_is_capped_and_never_blocks(
    tmp_path: Path, newlines: bool
) -> None:
    end = "'\\n'" if newlines else "''"
    code = (
        "import sys\n"
        "print('line = \\'x\\' * 99')\n"  # prints the next line of the code
        "line = 'x' * 99\n"
        "for _ in range(100_000):\n"
        f"    sys.stdout.write(line + {end})\n"
    ).encode()
    cap = 1 << 20
    owner = new_key().address
    async with running_node(tmp_path, log_cap_bytes=cap) as node:
        spec = node.spec(owner, code, private=True)
        await node.create(spec)
        final = (await node.watch_to_end(spec.job_id, owner))[-1]
        assert final.state == State.STATE_SUCCEEDED, final.message
        published = await node.algorithm_log(final, owner)
        assert len(published.encode()) == cap
        assert published.startswith(WITHHELD + "\nxxx")
        assert set(published.removeprefix(WITHHELD + "\n")) <= {"x", "\n"}
