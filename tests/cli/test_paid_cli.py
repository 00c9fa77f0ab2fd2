"""The paid flow as the README gives it, through the `c2d` command: `c2d chain up` (a real
ganache with Ocean's contracts), `c2d up` on that chain, a dataset published with `--price`, a
consumer refused without an order, `c2d compute order`, and `c2d compute start --order`. The
chain keeps its state across a restart."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from pathlib import Path

import pytest

from cli.supervisor import free_address
from mesh import ganache
from tests.cli.test_cli import C2D, Node, run_until_ready
from tests.conftest import needs_root, new_key, write_key

pytestmark = [
    needs_root,
    pytest.mark.skipif(
        ganache.find_ganache() is None, reason="ganache is not installed (npm install)"
    ),
]

ALGORITHM = "open('/data/outputs/rows.txt', 'w').write(str(len(open('/data/inputs/' + "
ALGORITHM += (
    "__import__('json').loads(__import__('os').environ['DIDS'])[0] + '/0').readlines())))\n"
)


def _stop(process: subprocess.Popen[str]) -> int:
    process.send_signal(signal.SIGINT)
    try:
        return process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_paid_flow_from_the_cli(tmp_path: Path) -> None:
    node = Node(tmp_path / "home")
    consumer = str(tmp_path / "consumer.json")
    consumer_key = new_key()
    write_key(Path(consumer), consumer_key)

    chain_up = [*C2D, "chain", "up", "--port", free_address().rpartition(":")[2]]
    chain, banner = run_until_ready([*chain_up, "--fund", consumer_key.address], node.env, "Ctrl-C")
    up: subprocess.Popen[str] | None = None
    try:
        assert "local chain up: http://127.0.0.1:" in banner and "factory" in banner
        factory = next(line.split()[-1] for line in banner.splitlines() if "factory" in line)
        up, up_banner = run_until_ready([*C2D, "up"], node.env, "Ctrl-C")
        assert "chain          http://127.0.0.1:" in up_banner

        algo = tmp_path / "rows.py"
        algo.write_text(ALGORITHM)
        algorithm = ok(
            node.c2d(
                "algorithm", "publish", str(algo), "--entrypoint", "python3 $ALGO", key=consumer
            )
        )
        data = node.data_file("rows.csv", "".join(f"{i}\n" for i in range(7)))
        published = node.c2d(
            "dataset",
            "publish",
            str(data),
            "--price",
            "3",
            "--trust",
            algorithm,
            "--timeout",
            "3600",
        )
        dataset = ok(published)
        assert "sold through datatoken 0x" in published.stderr and "at 3 OCEAN" in published.stderr
        shown = json.loads(ok(node.c2d("dataset", "show", dataset)))
        assert shown["pricing"]["price"] == str(3 * 10**18)

        start = ["compute", "start", "--dataset", dataset, "--algorithm", algorithm]
        refused = node.c2d(*start, key=consumer)
        assert refused.returncode != 0 and "FAILED_PRECONDITION" in refused.stderr, refused.stderr
        assert "order it first" in refused.stderr

        ordered = json.loads(
            ok(
                node.c2d(
                    "compute", "order", dataset, "--algorithm", algorithm, "--json", key=consumer
                )
            )
        )
        [order] = ordered["orders"]
        job = node.c2d(*start, "--order", order, "-f", key=consumer)
        assert job.returncode == 0, job.stderr
        assert "succeeded" in job.stderr

        # Within its validity the order starts further jobs; `compute order` says so.
        again = json.loads(
            ok(
                node.c2d(
                    "compute", "order", dataset, "--algorithm", algorithm, "--json", key=consumer
                )
            )
        )
        assert again["orders"] == [order]
        assert ok(node.c2d(*start, "--order", order, key=consumer))
    finally:
        if up is not None:
            _stop(up)
        assert _stop(chain) == 0
        asyncio.run(node.sandbox.sweep())
    assert not (node.home / "chain" / "chain.json").exists()

    # The chain's state outlives it: the same contracts, no second deployment.
    chain, banner = run_until_ready(chain_up, node.env, "Ctrl-C")
    try:
        assert f"factory     {factory}" in banner
    finally:
        assert _stop(chain) == 0
