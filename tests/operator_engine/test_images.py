"""Algorithms that run in a container image, through the real engine: images built here with
umoci into a local image store (no registry is reachable: the registry path is driven against
refused or silent ports on loopback), fetched with skopeo, checked by digest, unpacked once
into the engine's cache, and run under bubblewrap with the image's root file system as /."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from c2d.common.v1 import container_pb2, job_pb2
from c2d.engine.v1 import engine_pb2
from google.protobuf import duration_pb2

from operator_engine.config import EnvironmentSpec
from operator_engine.images import ImageCache, ImageError, parse_container
from operator_engine.sandbox import IMAGE_MOUNT_DIRS, IMAGE_MOUNT_FILES
from tests.conftest import needs_root, new_key
from tests.operator_engine.oci_images import (
    Dir,
    File,
    Symlink,
    build_busybox_image,
    build_image,
    build_python_image,
    have_tools,
    manifest_bytes,
)
from tests.operator_service.node import Node, running_node

pytestmark = [
    needs_root,
    pytest.mark.skipif(not have_tools(), reason="needs umoci, skopeo and busybox-static"),
]
State = job_pb2.Job.State
MIB = 1 << 20
ENVIRONMENT = EnvironmentSpec(
    memory_bytes=256 * MIB, disk_bytes=64 * MIB, max_processes=32, max_duration_s=30
)
ABSENT = "sha256:" + "0" * 64
# The files of a job's dataset are "1\n2\n3\n" (tests.operator_service.node.job_spec).
SUMMING = b"""import json, os
dataset = json.loads(os.environ["DIDS"])[0]
numbers = open(f"/data/inputs/{dataset}/0").read().split()
open("/data/outputs/sum.txt", "w").write(str(sum(int(n) for n in numbers)))
host_only = ("/usr/bin/bwrap", "/usr/bin/skopeo", "/usr/lib/python3/dist-packages", "/work")
print(json.dumps({
    "os_release": open("/etc/os-release").read(),
    "shell": os.path.exists("/bin/sh"),
    "host_only": [p for p in host_only if os.path.exists(p)],
    "path": os.environ["PATH"],
    "home": os.environ["HOME"],
    "flavour": os.environ.get("IMAGE_FLAVOUR"),
    "uid": os.getuid(),
    "cwd": os.getcwd(),
    "root_writable": os.access("/", os.W_OK),
}), flush=True)
"""


@dataclass(frozen=True)
class Store:
    """A local image store (an OCI layout) and the digests of the images in it."""

    layout: Path
    busybox: str
    python: str
    hostile: str


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """Built once per session (about 2 s)."""
    layout = tmp_path_factory.mktemp("image-store") / "store"
    busybox = build_busybox_image(
        layout, "busybox", {"/etc/os-release": "ID=c2d-busybox\n"}, env=("PATH=/bin",)
    )
    python = build_python_image(
        layout,
        "python",
        {"/etc/os-release": "ID=c2d-python\n"},
        env=("PATH=/usr/local/bin:/usr/bin", "IMAGE_FLAVOUR=python", "HOME=/root"),
    )
    hostile = build_busybox_image(
        layout,
        "hostile",
        {
            # Mount points that lead out of the image, or are not what the sandbox needs.
            "/data": Symlink("/etc"),
            "/tmp": Symlink("../../../../../../../../tmp"),
            "/etc/passwd": Symlink("/etc/shadow"),
            "/etc/resolv.conf": Symlink("/run/systemd/resolve/stub-resolv.conf"),
            "/proc": File(b"not a folder"),
            "/.c2d": Symlink("/bin"),
            # Set-id programs and what others may write.
            "/bin/su-like": File(b"#!/bin/sh\nid\n", 0o6755),
            "/srv/open": File(b"anyone writes here\n", 0o666),
            "/srv/shared": Dir(0o1777),
        },
    )
    return Store(layout, busybox, python, hostile)


def container(image: str, digest: str, tag: str = "test") -> container_pb2.Container:
    return container_pb2.Container(image=image, tag=tag, checksum=digest)


def image_spec(
    node: Node,
    owner: str,
    code: bytes,
    image: container_pb2.Container,
    entrypoint: str = "python3 $ALGO",
    **options: object,
) -> engine_pb2.JobSpec:
    spec = node.spec(owner, code, **options)
    spec.algorithm.entrypoint = entrypoint
    spec.algorithm.container.CopyFrom(image)
    return spec


async def run_to_end(node: Node, spec: engine_pb2.JobSpec, owner: str) -> job_pb2.Job:
    await node.create(spec)
    return (await node.watch_to_end(spec.job_id, owner))[-1]


async def result_of(node: Node, job: job_pb2.Job, owner: str, kind: int, name: str = "") -> str:
    (found,) = [r for r in job.results if r.kind == kind and (not name or r.name == name)]
    job_id = job.name.removeprefix("jobs/")
    return (await node.result(job_id, owner, found.index)).decode()


def last_json(log: str) -> dict[str, object]:
    value = json.loads([line for line in log.splitlines() if line.startswith("{")][-1])
    assert isinstance(value, dict)
    return value


def cache_of(node: Node) -> Path:
    return node.runner.images.cache


def leftovers(cache: Path) -> list[str]:
    return [p.name for p in cache.iterdir()] if cache.exists() else []


def assert_sandbox_root(rootfs: Path) -> None:
    """Root-owned, nothing writable by others, no set-id bit, every mount point real."""
    for root, dirs, files in os.walk(rootfs):
        for name in (*dirs, *files):
            info = os.lstat(os.path.join(root, name))
            assert info.st_uid == 0 and info.st_gid == 0, name
            if not stat.S_ISLNK(info.st_mode):
                assert not info.st_mode & (stat.S_ISUID | stat.S_ISGID), name
                assert not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH), name
    for path in IMAGE_MOUNT_DIRS:
        assert stat.S_ISDIR(os.lstat(rootfs / path.lstrip("/")).st_mode), path
    for path in IMAGE_MOUNT_FILES:
        assert stat.S_ISREG(os.lstat(rootfs / path.lstrip("/")).st_mode), path


# -- running in an image ---------------------------------------------------------------------


async def test_an_algorithm_runs_in_its_image_and_a_second_job_takes_it_from_the_cache(
    tmp_path: Path, store: Store
) -> None:
    owner = new_key().address
    python = container("local/python", store.python)
    async with running_node(tmp_path, (ENVIRONMENT,), image_store=store.layout) as node:
        first = await run_to_end(node, image_spec(node, owner, SUMMING, python), owner)
        assert first.state == State.STATE_SUCCEEDED, first.message
        seen = last_json(await node.algorithm_log(first, owner))
        assert seen == {
            "os_release": "ID=c2d-python\n",  # the image's, not the host's
            "shell": False,  # no shell in the image: the host's busybox waited for the script
            "host_only": [],  # neither the host's /usr nor anything else of it
            "path": "/usr/local/bin:/usr/bin",
            "home": "/tmp",  # the image's HOME is not writable: the sandbox's stays
            "flavour": "python",
            "uid": seen["uid"],
            "cwd": "/",
            "root_writable": False,
        }
        assert seen["uid"] != 0
        assert await result_of(node, first, owner, job_pb2.ResultFile.KIND_OUTPUT, "sum.txt") == "6"
        configuration = await result_of(
            node, first, owner, job_pb2.ResultFile.KIND_CONFIGURATION_LOG
        )
        assert f"image: local/python@{store.python} (" in configuration
        assert "tag test) ready" in configuration

        second = await run_to_end(node, image_spec(node, owner, SUMMING, python), owner)
        assert second.state == State.STATE_SUCCEEDED, second.message
        assert node.runner.images.fetched == 1  # the first job's fetch only
        hex_digest = store.python.removeprefix("sha256:")
        assert leftovers(cache_of(node)) == [hex_digest]
        assert_sandbox_root(cache_of(node) / hex_digest / "rootfs")

        # A shell algorithm in the busybox image, on the same engine.
        script = (
            b"set -e\nn=0\nfor x in $(cat /data/inputs/*/0); do n=$((n + x)); done\n"
            b'echo "$n" > /data/outputs/sum.txt\n. /etc/os-release\necho "id=$ID path=$PATH"\n'
            b'[ ! -e /usr ] && echo "no /usr"\n'
        )
        busybox = container("local/busybox", store.busybox, tag="")
        shell = await run_to_end(node, image_spec(node, owner, script, busybox, "sh $ALGO"), owner)
        assert shell.state == State.STATE_SUCCEEDED, shell.message
        log = await node.algorithm_log(shell, owner)
        assert "id=c2d-busybox path=/bin" in log and "no /usr" in log
        assert await result_of(node, shell, owner, job_pb2.ResultFile.KIND_OUTPUT) == "6\n"


async def test_the_limits_hold_inside_an_image(
    tmp_path: Path, store: Store, silent_server: str
) -> None:
    owner = new_key().address
    python = container("local/python", store.python)
    port = int(silent_server.rsplit(":", 1)[1])
    network = f"""import socket
for address in [("127.0.0.1", {port}), ("10.0.2.2", {port}), ("1.1.1.1", 53)]:
    try:
        socket.create_connection(address, timeout=2).close()
        print("reached", address, flush=True)
    except OSError as error:
        print("refused", address, error.errno, flush=True)
print("interfaces", [name for _, name in socket.if_nameindex()], flush=True)
""".encode()
    cases = [
        (
            b"import time\ntime.sleep(30)\n",
            job_pb2.Resources(max_duration=_seconds(1)),
            job_pb2.FAILURE_REASON_TIMED_OUT,
            "timed out after 1 s",
        ),
        (
            b"block = bytearray(120 << 20)\nblock[::4096] = b'x' * len(block[::4096])\n",
            job_pb2.Resources(memory_bytes=48 * MIB),
            job_pb2.FAILURE_REASON_OUT_OF_MEMORY,
            "limit 48 MiB",
        ),
        (
            b"import os, time\nfor _ in range(100):\n"
            b"    if os.fork() == 0:\n        time.sleep(60)\n        os._exit(0)\n",
            None,
            job_pb2.FAILURE_REASON_TOO_MANY_PROCESSES,
            "limit 32",
        ),
        (
            b"with open('/data/outputs/big', 'wb') as f:\n"
            b"    for _ in range(16):\n        f.write(b'x' * (1 << 20))\n",
            job_pb2.Resources(disk_bytes=8 * MIB),
            job_pb2.FAILURE_REASON_DISK_FULL,
            "",
        ),
        (b"raise SystemExit(3)\n", None, job_pb2.FAILURE_REASON_ALGORITHM_EXIT_NONZERO, "code 3"),
    ]
    async with running_node(tmp_path, (ENVIRONMENT,), image_store=store.layout) as node:
        for code, resources, reason, detail in cases:
            spec = image_spec(node, owner, code, python, resources=resources)
            started = time.monotonic()
            final = await run_to_end(node, spec, owner)
            assert final.state == State.STATE_FAILED, final.message
            assert final.failure_reason == reason, final.message
            assert detail in final.message
            assert time.monotonic() - started < 20
        # No network unless allowed: nothing is reached, not even the host's loopback.
        final = await run_to_end(node, image_spec(node, owner, network, python), owner)
        assert final.state == State.STATE_SUCCEEDED, final.message
        log = await node.algorithm_log(final, owner)
        assert "reached" not in log and log.count("refused") == 3, log
        assert "interfaces ['lo']" in log
        assert node.runner.images.fetched == 1


# -- refused images --------------------------------------------------------------------------


async def test_a_manifest_that_is_not_the_digest_fails_provisioning_and_unpacks_nothing(
    tmp_path: Path, store: Store
) -> None:
    """A store whose entry for the busybox digest holds another image's manifest: the engine
    computes the digest itself and refuses it before fetching a layer."""
    tampered = tmp_path / "tampered"
    shutil.copytree(store.layout, tampered)
    blob = tampered / "blobs" / "sha256" / store.busybox.removeprefix("sha256:")
    blob.write_bytes(manifest_bytes(store.layout, store.python))
    owner = new_key().address
    busybox = container("local/busybox", store.busybox)
    async with running_node(tmp_path / "node", (ENVIRONMENT,), image_store=tampered) as node:
        spec = image_spec(node, owner, b"echo never\n", busybox, "sh $ALGO")
        final = await run_to_end(node, spec, owner)
        assert final.state == State.STATE_FAILED
        assert final.failure_reason == job_pb2.FAILURE_REASON_ALGORITHM_PROVISIONING_FAILED
        assert final.message == (
            f"image local/busybox: its manifest's digest is {store.python}, not the "
            f"{store.busybox} the algorithm names"
        )
        assert str(tmp_path) not in final.message
        assert node.runner.images.fetched == 0
        assert leftovers(cache_of(node)) == []
        kinds = {r.kind for r in final.results}
        assert job_pb2.ResultFile.KIND_ALGORITHM_LOG not in kinds  # it never ran
        configuration = await result_of(
            node, final, owner, job_pb2.ResultFile.KIND_CONFIGURATION_LOG
        )
        assert "image failed: image local/busybox: its manifest's digest is" in configuration


async def test_an_image_in_no_store_and_no_reachable_registry_fails_promptly(
    tmp_path: Path, store: Store, silent_server: str
) -> None:
    owner = new_key().address
    silent = silent_server.removeprefix("http://")
    async with running_node(
        tmp_path, (ENVIRONMENT,), image_store=store.layout, image_fetch_timeout_s=1.0
    ) as node:
        cases = [
            # Refused at once: nothing listens there.
            (
                container("127.0.0.1:9/c2d/absent", ABSENT),
                "looking it up in its registry failed: pinging container registry 127.0.0.1:9",
            ),
            # A registry that never answers: cut off by the fetch timeout.
            (container(f"{silent}/c2d/slow", ABSENT), "took longer than 1 s"),
            (container("local/busybox", "sha256:ABC"), "container.checksum must be"),
            (container("-rm /", store.busybox), "container.image must be"),
        ]
        for image, expected in cases:
            started = time.monotonic()
            final = await run_to_end(node, image_spec(node, owner, b"x\n", image), owner)
            assert time.monotonic() - started < 10
            assert final.state == State.STATE_FAILED
            assert final.failure_reason == job_pb2.FAILURE_REASON_ALGORITHM_PROVISIONING_FAILED
            assert expected in final.message, final.message
            assert str(tmp_path) not in final.message
            if "registry" in expected:
                assert final.message.endswith("(it is not in this node's image store either)")
        assert leftovers(cache_of(node)) == []


async def test_a_job_stopped_while_its_image_is_fetched_ends_cancelled_promptly(
    tmp_path: Path, store: Store, silent_server: str
) -> None:
    owner = new_key().address
    slow = container(f"{silent_server.removeprefix('http://')}/c2d/slow", ABSENT)
    async with running_node(
        tmp_path, (ENVIRONMENT,), image_store=store.layout, image_fetch_timeout_s=120.0
    ) as node:
        spec = image_spec(node, owner, b"x\n", slow)
        await node.create(spec)
        cache = cache_of(node)
        async with asyncio.timeout(10):
            while not any(name.startswith(".tmp-") for name in leftovers(cache)):
                await asyncio.sleep(0.02)
        started = time.monotonic()
        await node.engine.StopJob(engine_pb2.StopJobRequest(job_id=spec.job_id))
        final = (await node.watch_to_end(spec.job_id, owner))[-1]
        assert final.state == State.STATE_CANCELLED, final.message
        assert time.monotonic() - started < 3
        # The fetch was killed and its folder removed.
        assert leftovers(cache) == []
        assert not [pid for pid in _pids() if str(cache).encode() in _cmdline(pid)]


async def test_a_hostile_image_is_neutralised(tmp_path: Path, store: Store) -> None:
    owner = new_key().address
    script = (
        b"echo probe > /tmp/probe && cat /tmp/probe\n"
        b"cat /data/inputs/*/0 > /data/outputs/copy.txt\n"
        b"ls -l /bin/su-like\n"
        b"echo tamper > /srv/open 2>/dev/null || echo 'open: read-only'\n"
        b"grep -c c2d /etc/passwd\n"
    )
    hostile = container("local/hostile", store.hostile)
    async with running_node(tmp_path, (ENVIRONMENT,), image_store=store.layout) as node:
        final = await run_to_end(node, image_spec(node, owner, script, hostile, "sh $ALGO"), owner)
        assert final.state == State.STATE_SUCCEEDED, final.message
        log = await node.algorithm_log(final, owner)
        assert "probe\n" in log and "open: read-only" in log
        assert "-rwxr-xr-x" in log  # no s bits left
        assert await result_of(node, final, owner, job_pb2.ResultFile.KIND_OUTPUT) == "1\n2\n3\n"
        rootfs = cache_of(node) / store.hostile.removeprefix("sha256:") / "rootfs"
        assert_sandbox_root(rootfs)
        assert (rootfs / "srv" / "open").read_text() == "anyone writes here\n"
        assert not os.path.exists("/tmp/probe")


async def test_an_engine_without_skopeo_runs_host_jobs_and_refuses_image_jobs(
    tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    which = shutil.which

    def without_skopeo(name: str, path: str | None = None) -> str | None:
        return None if name == "skopeo" else which(name, path=path)

    monkeypatch.setattr(shutil, "which", without_skopeo)
    owner = new_key().address
    async with running_node(tmp_path, (ENVIRONMENT,), image_store=store.layout) as node:
        host = await run_to_end(node, node.spec(owner), owner)
        assert host.state == State.STATE_SUCCEEDED, host.message
        image = image_spec(node, owner, b"x\n", container("local/python", store.python))
        final = await run_to_end(node, image, owner)
        assert final.state == State.STATE_FAILED
        assert final.failure_reason == job_pb2.FAILURE_REASON_ALGORITHM_PROVISIONING_FAILED
        assert "cannot run container images (skopeo not installed)" in final.message


# -- the cache on its own --------------------------------------------------------------------


@pytest.fixture
def cache(tmp_path: Path, store: Store) -> Iterator[ImageCache]:
    images = ImageCache(
        store=store.layout,
        cache=tmp_path / "cache",
        fetch_timeout_s=30,
        max_image_bytes=256 * MIB,
        budget_bytes=1 << 40,
    )
    images.check()
    assert images.missing == []
    yield images


async def test_jobs_waiting_for_one_image_share_one_fetch(cache: ImageCache, store: Store) -> None:
    busybox = container("local/busybox", store.busybox)
    images = await asyncio.gather(*(cache.prepare(busybox) for _ in range(3)))
    assert cache.fetched == 1
    assert len({image.root.rootfs for image in images}) == 1
    assert_sandbox_root(images[0].root.rootfs)
    # A new cache on the same folder (an engine restarted) finds it without fetching.
    again = ImageCache(
        store=store.layout, cache=cache.cache, fetch_timeout_s=30, max_image_bytes=1, budget_bytes=1
    )
    again.check()
    assert (await again.prepare(busybox)).root == images[0].root
    assert again.fetched == 0


async def test_the_least_recently_used_images_go_when_the_cache_is_over_its_budget(
    cache: ImageCache, store: Store
) -> None:
    busybox = await cache.prepare(container("local/busybox", store.busybox))
    hostile = await cache.prepare(container("local/hostile", store.hostile))
    python = await cache.prepare(container("local/python", store.python))
    cache.budget_bytes = python.size_bytes + hostile.size_bytes
    cache.release(busybox)
    cache.release(python)
    os.utime(cache.cache / python.ref.hex / "image.json", (time.time() + 5,) * 2)
    await cache.trim()  # busybox, the oldest not in use, goes; hostile is in use
    assert sorted(leftovers(cache.cache)) == sorted([hostile.ref.hex, python.ref.hex])
    cache.budget_bytes = 0
    await cache.trim()  # everything not in use
    assert leftovers(cache.cache) == [hostile.ref.hex]
    cache.release(hostile)
    again = await cache.prepare(container("local/busybox", store.busybox))
    assert cache.fetched == 4 and again.root.rootfs.is_dir()


async def test_an_image_larger_than_the_bound_unpacked_is_refused(
    tmp_path: Path, store: Store
) -> None:
    """64 MiB of zeros compress to almost nothing: the layer's declared size passes, the
    unpacked size does not."""
    layout = tmp_path / "store"
    digest = build_image(layout, "bomb", {"/zeros": File(bytes(64 * MIB))})
    images = ImageCache(
        store=layout,
        cache=tmp_path / "cache",
        fetch_timeout_s=30,
        max_image_bytes=8 * MIB,
        budget_bytes=1 << 40,
    )
    images.check()
    with pytest.raises(ImageError) as refused:
        await images.prepare(container("local/bomb", digest))
    assert str(refused.value) == (
        f"image local/bomb@{digest} is larger than this node allows (8 MiB unpacked)"
    )
    assert leftovers(images.cache) == [] and images.fetched == 0


@pytest.mark.parametrize(
    ("image", "tag", "checksum", "field"),
    [
        ("", "", ABSENT, "container.image"),
        ("a/../b", "", ABSENT, "container.image"),
        ("x" * 256, "", ABSENT, "container.image"),
        ("ok/name", "bad tag", ABSENT, "container.tag"),
        ("ok/name", "", "sha256:" + "A" * 64, "container.checksum"),
        ("ok/name", "", "sha512:" + "0" * 64, "container.checksum"),
        ("ok/name", "", "0" * 64, "container.checksum"),
    ],
)
def test_malformed_container_fields_are_refused_naming_the_field(
    image: str, tag: str, checksum: str, field: str
) -> None:
    with pytest.raises(ImageError) as refused:
        parse_container(container_pb2.Container(image=image, tag=tag, checksum=checksum))
    assert str(refused.value).startswith(field)


def _seconds(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(round(value * 1e9))
    return duration


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return file.read()
    except OSError:
        return b""
