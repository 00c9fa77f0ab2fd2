"""A whole job driven by a Node.js client (grpc-js + proto-loader + ethers) that signs and
digests its requests from the proto documentation alone, against the real mesh."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import LocalMesh, needs_root
from tests.interop.commands import ROOT, run

SCRIPT = Path(__file__).with_name("node_client.mjs")
NODE = shutil.which("node")
NODE_DEPS = ("@grpc/grpc-js", "@grpc/proto-loader", "ethers")

pytestmark = [
    needs_root,
    pytest.mark.skipif(NODE is None, reason="node is not installed"),
    pytest.mark.skipif(
        not all((ROOT / "node_modules" / dep).is_dir() for dep in NODE_DEPS),
        reason="node_modules lacks grpc-js, proto-loader or ethers: run `npm ci`",
    ),
]

ALGORITHM = """\
import json, os, time
dataset_id = json.loads(os.environ["DIDS"])[0]
with open(f"/data/inputs/{dataset_id}/0") as f:
    text = f.read()
# A Struct number is a double on the wire; the Provider hands a whole one over as an int, and
# :g prints either form the same.
x = json.load(open("/data/inputs/algoCustomData.json"))["x"]
print(f"node-interop read {len(text)} bytes, x={x:g}", flush=True)
with open("/data/outputs/result.txt", "w") as f:
    f.write(f"{text.strip().upper()} x={x:g}\\n")
time.sleep(1)  # long enough for WatchJob to see the job change
"""

DATA = b"hello from node\n"


async def run_node(env: dict[str, str], timeout: float = 60) -> tuple[int, str, str]:
    return await run([NODE or "node", str(SCRIPT)], env=env, timeout=timeout)


async def test_a_node_client_runs_a_whole_job(local_mesh: LocalMesh) -> None:
    data = local_mesh.data_file("interop/greeting.txt", DATA)
    code, stdout, stderr = await run_node(
        {
            "C2D_PROVIDER": local_mesh.provider_address,
            "C2D_PRIVATE_KEY": "0x" + local_mesh.owner.private_key.hex(),
            "C2D_DATA_FILE": str(data),
            "C2D_ALGORITHM": ALGORITHM,
        }
    )
    assert code == 0, f"node client failed:\n{stderr}\n{stdout}"
    lines = stdout.strip().splitlines()
    assert len(lines) == 1, stdout
    result = json.loads(lines[0])

    checks = result["checks"]
    # UNAUTHENTICATED (16) for a signature over the text itself instead of its keccak256.
    assert checks["raw_text_signature"] == 16
    # That refused signature did not spend its nonce: the right signature with it works...
    assert checks["nonce_after_refused_signature"] == "OK"
    # ...once: the same nonce again, or a lower one, is UNAUTHENTICATED.
    assert checks["reused_nonce"] == 16
    assert checks["lower_nonce"] == 16
    assert checks["wrong_digest"] == 16
    # StartCompute's digest with a result selection and a delivery (S3, upload URLs) matched:
    # refused for the destination (PERMISSION_DENIED), not for the signature.
    assert checks["delivery_s3"] == 7
    assert checks["delivery_upload_urls"] == 7
    # A dataset of a local and a remote file, published with `files` and its digest: the
    # local file measured by the Provider, the remote one as declared.
    assert checks["files_published"] == [
        [0, str(len(DATA)), hashlib.sha256(DATA).hexdigest()],
        [1, "4096", "ab" * 32],
    ]

    assert result["address"] == local_mesh.owner.address
    assert result["owner"] == local_mesh.owner.address
    assert result["state"] == "STATE_SUCCEEDED", result["message"]
    # The stream began before the end and followed the job to its final state.
    assert len(result["states"]) >= 2, result["states"]
    assert result["states"][-1] == "STATE_SUCCEEDED"
    expected_log = f"node-interop read {len(DATA)} bytes, x=1\n"
    assert result["log"] == expected_log
    assert result["log_from_3"] == expected_log[3:]
    assert result["content"] == "HELLO FROM NODE x=1\n"
    assert result["sha256"] == "match"
    assert result["get_job_state"] == "STATE_SUCCEEDED"
