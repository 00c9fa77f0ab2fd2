"""`--storage` and `--s3-*` for `c2d up` and `c2d demo`: where a node keeps job results, checked
before any service starts so that a wrong bucket or endpoint is one clear line, not a failed
publish at the end of the first job."""

from __future__ import annotations

import argparse
import asyncio
import os

from mesh.s3 import S3Settings, error_code, parse_s3_url

# The longest the check may take: a dead endpoint must not hang `c2d up`.
_CHECK_TIMEOUT_S = 15.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage",
        metavar="URL",
        help="where results go: a folder (default $C2D_HOME/results) or s3://BUCKET/PREFIX "
        "(credentials from C2D_S3_ACCESS_KEY_ID/C2D_S3_SECRET_ACCESS_KEY or the standard AWS "
        "variables)",
    )
    parser.add_argument(
        "--s3-endpoint",
        metavar="URL",
        help="an S3-compatible server (MinIO, Ceph, moto), addressed path-style; default AWS",
    )
    parser.add_argument("--s3-region", metavar="NAME", help="the bucket's region")
    parser.add_argument(
        "--create-bucket",
        action="store_true",
        help="create the s3:// bucket when it does not exist",
    )


async def storage_env(args: argparse.Namespace) -> dict[str, str]:
    """The services' storage settings from the flags (empty when none is given), after checking
    that an s3:// location is reachable. Raises ValueError with a one-line reason."""
    env: dict[str, str] = {}
    if args.s3_endpoint:
        env["C2D_S3_ENDPOINT"] = args.s3_endpoint
    if args.s3_region:
        env["C2D_S3_REGION"] = args.s3_region
    if not args.storage:
        if env or args.create_bucket:
            raise ValueError("--s3-endpoint, --s3-region and --create-bucket need --storage s3://")
        return env
    env["C2D_STORAGE"] = args.storage
    if not args.storage.startswith("s3://"):
        if env or args.create_bucket:
            raise ValueError("--s3-endpoint, --s3-region and --create-bucket need an s3:// URL")
        return env
    bucket, _ = parse_s3_url(args.storage)
    settings = S3Settings.from_env({**os.environ, **env})
    await _check_bucket(settings, bucket, create=args.create_bucket)
    return env


async def _check_bucket(settings: S3Settings, bucket: str, *, create: bool) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    where = settings.endpoint_url or "AWS"
    try:
        async with asyncio.timeout(_CHECK_TIMEOUT_S), settings.client(attempts=1) as s3:
            try:
                await s3.head_bucket(Bucket=bucket)
            except ClientError as error:
                code = error_code(error)
                if code not in ("404", "NoSuchBucket") or not create:
                    raise
                await s3.create_bucket(Bucket=bucket)
    except TimeoutError:
        raise ValueError(
            f"the S3 endpoint {where} did not answer in {_CHECK_TIMEOUT_S:g} s"
        ) from None
    except ClientError as error:
        code = error_code(error)
        if code in ("404", "NoSuchBucket"):
            raise ValueError(
                f"bucket {bucket} does not exist at {where} (create it, or pass --create-bucket)"
            ) from None
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise ValueError(
                f"bucket {bucket} at {where} refuses these credentials ({code}); set "
                "C2D_S3_ACCESS_KEY_ID and C2D_S3_SECRET_ACCESS_KEY or the AWS variables"
            ) from None
        raise ValueError(f"bucket {bucket} at {where}: {code or error}") from None
    except BotoCoreError as error:
        # Unreachable endpoint, no credentials at all, ...: botocore's text names no secret.
        raise ValueError(f"cannot reach bucket {bucket} at {where}: {error}") from None
