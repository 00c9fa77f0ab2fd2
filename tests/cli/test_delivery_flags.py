"""`c2d compute start --results/--deliver-to/--upload-urls` as a user runs them: usage errors
exit 2 before anything is sent, keys come only from C2D_DELIVERY_* variables and URLs only from
a file, the node's refusals come back as exit 2, and a job delivered to an S3 bucket shows its
selection and delivery in `c2d compute status`. No output ever echoes a key or an upload URL."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from pathlib import Path

import pytest

from cli import delivery as flags
from mesh import delivery
from sdk.client import Client
from tests.conftest import LocalMesh, needs_root, new_key, start_local_mesh, write_key
from tests.e2e.test_job import publish_pair
from tests.s3_server import S3Server

C2D = [sys.executable, "-m", "cli.main"]
SECRET = "cli-delivery-secret-" + uuid.uuid4().hex
URL_SIGNATURE = "X-Amz-Signature=" + uuid.uuid4().hex
KEYS = {flags.ACCESS_KEY_ENV: "AKIACONSUMER", flags.SECRET_KEY_ENV: SECRET}


class Cli:
    """Runs `c2d` in a subprocess as a user would, with a home and a key of its own."""

    def __init__(self, home: Path, provider: str = "127.0.0.1:9") -> None:
        home.mkdir(parents=True, exist_ok=True)
        self.home = home
        self.key = home / "consumer.json"
        write_key(self.key, new_key())
        env = {k: v for k, v in os.environ.items() if not k.startswith("C2D_DELIVERY_")}
        self.env = {**env, "C2D_HOME": str(home), "C2D_PROVIDER_ADDRESS": provider}

    async def run(self, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
        process = await asyncio.create_subprocess_exec(
            *C2D,
            *args,
            "--key-file",
            str(self.key),
            env={**self.env, **(env or {})},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode is not None
        out, err = stdout.decode(), stderr.decode()
        for secret in (SECRET, URL_SIGNATURE):
            assert secret not in out + err, f"c2d {args} printed a delivery secret"
        return process.returncode, out, err


def urls_file(folder: Path, content: object, name: str = "urls.json") -> str:
    path = folder / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


# -- usage errors: exit 2 before anything is sent ---------------------------------------------


async def test_bad_flags_exit_2_with_a_clear_message(tmp_path: Path) -> None:
    # The Provider named is nobody: each of these must stop before connecting.
    cli = Cli(tmp_path / "home")
    start = ["compute", "start", "--dataset", "d", "--algorithm", "a"]
    url = f"https://uploads.example.org/put?{URL_SIGNATURE}"
    cases: list[tuple[list[str], dict[str, str], str]] = [
        (["--results", "everything"], {}, "invalid choice: 'everything'"),
        (["--deliver-to", "s3://consumer-results/runs"], {}, flags.ACCESS_KEY_ENV),
        (
            ["--deliver-to", "s3://consumer-results/runs"],
            {flags.ACCESS_KEY_ENV: "AKIACONSUMER"},
            f"needs the bucket's keys in {flags.SECRET_KEY_ENV} (never on the command line",
        ),
        (["--deliver-to", "https://consumer-results/runs"], KEYS, "s3://BUCKET[/PREFIX]"),
        (["--deliver-to", "s3://Not_A_Bucket"], KEYS, "not a valid S3 bucket name"),
        (["--deliver-endpoint", "https://s3.example.org"], KEYS, "go with --deliver-to"),
        (
            ["--deliver-to", "s3://b-u-c", "--upload-urls", urls_file(tmp_path, {"a": url})],
            KEYS,
            "not both",
        ),
        (["--upload-urls", str(tmp_path / "missing.json")], {}, "cannot read"),
        (["--upload-urls", urls_file(tmp_path, f'{{"a": "{url}"', "bad.json")], {}, "not JSON"),
        (["--upload-urls", urls_file(tmp_path, [url], "list.json")], {}, "a JSON object"),
        (["--upload-urls", urls_file(tmp_path, {}, "empty.json")], {}, "a JSON object"),
        (["--upload-urls", urls_file(tmp_path, {"a": 5}, "number.json")], {}, "not a string"),
    ]
    results = await asyncio.gather(*(cli.run(*start, *args, env=env) for args, env, _ in cases))
    for (args, _, expected), (code, _, stderr) in zip(cases, results, strict=True):
        assert code == 2, (args, stderr)
        assert expected in stderr, (args, stderr)
        assert "UNAVAILABLE" not in stderr, f"{args} reached for the Provider"


async def test_help_documents_the_flags_and_no_flag_takes_a_secret(tmp_path: Path) -> None:
    code, out, _ = await Cli(tmp_path / "home").run("compute", "start", "--help")
    assert code == 0
    text = " ".join(out.split())
    for documented in (
        "--results {outputs,logs,both}",
        "--deliver-to s3://BUCKET[/PREFIX]",
        "--deliver-endpoint URL",
        "--deliver-region REGION",
        "--upload-urls FILE",
        flags.ACCESS_KEY_ENV,
        flags.SECRET_KEY_ENV,
        flags.SESSION_TOKEN_ENV,
        "never from the command line",
    ):
        assert documented in text, documented
    options = {word for word in out.split() if word.startswith("--")}
    assert not {o for o in options if "secret" in o or "key-id" in o or "token" in o}


# -- against a node ---------------------------------------------------------------------------


@needs_root
async def test_a_job_delivered_to_a_bucket_shows_its_choice_and_refusals_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3_server: S3Server, s3_bucket: str
) -> None:
    """Needs the engine's side too, for the delivery itself."""
    store = s3_server.endpoint_url.removeprefix("http://")
    monkeypatch.setenv(delivery.ALLOW_HOSTS_ENV, store)
    async with start_local_mesh(tmp_path / "node") as mesh:
        cli = Cli(tmp_path / "cli", mesh.provider_address)
        algorithm, dataset = await published(mesh)
        start = ["compute", "start", "--dataset", dataset, "--algorithm", algorithm]

        # Refusals by the node: exit 2 with the status, the secret never echoed.
        loopback = {"total.json": f"https://127.0.0.1:9/put?{URL_SIGNATURE}"}
        http_store = ["--deliver-endpoint", "http://s3.example.invalid"]
        refusals = [
            (
                ["--upload-urls", urls_file(tmp_path, loopback)],
                "PERMISSION_DENIED: the delivery destination is not a public address",
            ),
            (
                ["--deliver-to", f"s3://{s3_bucket}/runs", *http_store],
                "PERMISSION_DENIED: the delivery destination is plain http://",
            ),
            (["--deliver-to", f"s3://{s3_bucket}/a/../b"], "INVALID_ARGUMENT: the prefix"),
        ]
        for args, expected in refusals:
            code, _, stderr = await cli.run(*start, *args, env=KEYS)
            assert (code, expected in stderr) == (2, True), (args, stderr)

        code, out, stderr = await cli.run(
            *start,
            "--results",
            "outputs",
            "--deliver-to",
            f"s3://{s3_bucket}/runs",
            "--deliver-endpoint",
            s3_server.endpoint_url,
            "--follow",
            env={**KEYS, flags.SESSION_TOKEN_ENV: "session-" + SECRET},
        )
        assert code == 0, stderr
        job_id = stderr.split("job ", 1)[1].split()[0].rstrip(":")
        where = f"s3://{s3_bucket}/runs/{job_id}/ at {store}"
        assert f"delivery to {where}: delivered" in stderr

        code, out, _ = await cli.run("compute", "status", job_id)
        assert code == 0
        assert "keeps outputs only" in out
        assert f"delivery to {where}: delivered" in out
        code, out, _ = await cli.run("compute", "status", job_id, "--json")
        shown = json.loads(out)
        assert shown["resultSelection"] == "RESULT_SELECTION_OUTPUTS"
        assert shown["delivery"]["destination"] == where
        assert f"runs/{job_id}/total.json" in s3_server.objects(s3_bucket)

        # Both kept, and no delivery asked for: none shown.
        code, out, stderr = await cli.run(*start, "--results", "both", "--follow", "--json")
        assert code == 0, stderr
        plain = json.loads(out)
        assert plain["resultSelection"] == "RESULT_SELECTION_OUTPUTS_AND_LOGS"
        assert "delivery" not in plain


async def published(mesh: LocalMesh) -> tuple[str, str]:
    """An algorithm and a dataset that trusts it, published by the node's owner."""
    async with Client(mesh.provider_address, mesh.owner) as owner:
        algorithm, dataset = await publish_pair(mesh, owner)
    return algorithm.did, dataset.did
