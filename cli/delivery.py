"""`c2d compute start`'s choice of results and delivery to the consumer's own storage: the
flags, and the ResultDelivery they make.

Secrets never come from the command line, which every local user can read (`ps`): S3 keys
from C2D_DELIVERY_* variables, presigned upload URLs (bearer credentials) from a file."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import NoReturn

from c2d.common.v1 import job_pb2

from mesh.delivery import SELECTION_BY_WORD
from mesh.s3 import parse_s3_url
from sdk.client import s3_delivery, upload_urls

ACCESS_KEY_ENV = "C2D_DELIVERY_ACCESS_KEY_ID"
# Names of variables, not secrets.
SECRET_KEY_ENV = "C2D_DELIVERY_SECRET_ACCESS_KEY"  # noqa: S105
SESSION_TOKEN_ENV = "C2D_DELIVERY_SESSION_TOKEN"  # noqa: S105
# A presigned URL is a few hundred bytes; a file far larger than 1000 of them is a mistake.
MAX_URLS_FILE_BYTES = 16 << 20

RESULTS_CHOICES = tuple(SELECTION_BY_WORD)


def add_flags(parser: argparse.ArgumentParser) -> None:
    """The result selection and delivery flags of `c2d compute start`."""
    parser.add_argument(
        "--results",
        choices=RESULTS_CHOICES,
        help="which results the job keeps: its outputs, its logs, or both (default); the "
        "publish log is always kept",
    )
    group = parser.add_argument_group(
        "delivery to your own storage",
        "Also write the kept results there once the job has stored them; they stay "
        "downloadable from the Provider. The node holds the keys or URLs for the job only: "
        "never stored, returned or logged.",
    )
    group.add_argument(
        "--deliver-to",
        metavar="s3://BUCKET[/PREFIX]",
        help=f"an S3 bucket: each result goes to PREFIX/JOB_ID/NAME. The keys are read from "
        f"${ACCESS_KEY_ENV} and ${SECRET_KEY_ENV} (and ${SESSION_TOKEN_ENV} for temporary "
        "credentials), never from the command line",
    )
    group.add_argument(
        "--deliver-endpoint",
        metavar="URL",
        help="the S3-compatible store's endpoint, e.g. https://s3.example.org (default: AWS); "
        "https:// to a public address unless the node allows the host",
    )
    group.add_argument(
        "--deliver-region", metavar="REGION", help="the bucket's region (default us-east-1)"
    )
    group.add_argument(
        "--upload-urls",
        metavar="FILE",
        help="presigned upload (PUT) URLs, by result name, as a JSON object in a file, e.g. "
        '{"out.csv": "https://..."}; a result without a URL is not delivered',
    )


def usage_error(message: str) -> NoReturn:
    """Stops the command as argparse does for a bad flag: the message and exit status 2."""
    print(f"c2d: {message}", file=sys.stderr)
    raise SystemExit(2)


def from_args(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> job_pb2.ResultDelivery | None:
    """The delivery the flags ask for; None for none. Exits with status 2 for flags that do
    not fit together, a missing key, or an upload URL file that is not a JSON object of
    name to URL."""
    env = os.environ if environ is None else environ
    if args.deliver_to and args.upload_urls:
        usage_error("give --deliver-to or --upload-urls, not both")
    if not args.deliver_to and (args.deliver_endpoint or args.deliver_region):
        usage_error("--deliver-endpoint and --deliver-region go with --deliver-to s3://BUCKET")
    if args.deliver_to:
        return _s3(args, env)
    if args.upload_urls:
        return upload_urls(read_upload_urls(Path(args.upload_urls)))
    return None


def _s3(args: argparse.Namespace, env: Mapping[str, str]) -> job_pb2.ResultDelivery:
    try:
        bucket, prefix = parse_s3_url(args.deliver_to)
    except ValueError as error:
        usage_error(f"--deliver-to takes s3://BUCKET[/PREFIX]: {error}")
    # The prefix names a folder: results go to PREFIX/JOB_ID/NAME, not PREFIXJOB_ID/NAME.
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    access_key_id = env.get(ACCESS_KEY_ENV, "")
    secret_access_key = env.get(SECRET_KEY_ENV, "")
    missing = [
        name
        for name, value in ((ACCESS_KEY_ENV, access_key_id), (SECRET_KEY_ENV, secret_access_key))
        if not value
    ]
    if missing:
        usage_error(
            f"--deliver-to needs the bucket's keys in {' and '.join(missing)} (never on the "
            "command line, where other users can read them)"
        )
    return s3_delivery(
        bucket,
        prefix,
        endpoint=args.deliver_endpoint or "",
        region=args.deliver_region or "",
        access_key_id=access_key_id,
        secret_access_key=secret_access_key,
        session_token=env.get(SESSION_TOKEN_ENV, ""),
    )


def read_upload_urls(path: Path) -> dict[str, str]:
    """The JSON object of result name to upload URL in `path`; exits with status 2 for a
    missing, oversized or malformed file (the message never quotes a URL)."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_URLS_FILE_BYTES + 1)
    except OSError as error:
        usage_error(f"--upload-urls: cannot read {path}: {error.strerror}")
    if len(data) > MAX_URLS_FILE_BYTES:
        usage_error(f"--upload-urls: {path} is larger than {MAX_URLS_FILE_BYTES >> 20} MiB")
    try:
        urls = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        usage_error(f"--upload-urls: {path} is not JSON (line {_line(error)})")
    if not isinstance(urls, dict) or not urls:
        usage_error(
            f"--upload-urls: {path} must hold a JSON object of result name to URL, e.g. "
            '{"out.csv": "https://..."}'
        )
    for name, url in urls.items():
        if not isinstance(url, str):
            usage_error(f"--upload-urls: the URL for {name!r} in {path} is not a string")
    return urls


def _line(error: ValueError) -> int:
    return error.lineno if isinstance(error, json.JSONDecodeError) else 1
