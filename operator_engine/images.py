"""The engine's container images: each fetched, verified by its digest and unpacked once, then
kept for the jobs whose algorithm runs in it (see ``SandboxSpec.image`` in the sandbox).

An algorithm names an image by its manifest digest (``c2d.common.v1.Container.checksum``);
its name says where to fetch it from and its tag what it is, neither chooses what runs.
``ImageCache.prepare`` returns the image's root file system, from the cache when the digest is
there, else:

1. finds the manifest: in the node's local image store first (an OCI image layout the operator
   fills, e.g. ``skopeo copy oci-archive:algo.tar oci:$C2D_HOME/images:algo-1``; its
   ``index.json`` names the digest, with a reference name skopeo can address), else in the
   registry (``skopeo inspect --raw docker://IMAGE@DIGEST``);
2. checks the manifest's sha256 against the digest before any layer is fetched, and that it is
   one image's manifest whose declared sizes fit the bound;
3. copies the image with skopeo into a ``dir:`` folder (the manifest's bytes as they are) and
   checks the manifest there again: the bytes unpacked are the bytes checked; skopeo then makes
   an OCI layout of it (converting a Docker manifest) and umoci, which verifies every blob
   against the manifest, unpacks it ``--rootless``: every file belongs to root, the engine;
4. makes the root file system a sandbox's: nothing writable by group or others, no set-id bit,
   root-owned, and each path the sandbox mounts on (``sandbox.IMAGE_MOUNT_DIRS`` and
   ``IMAGE_MOUNT_FILES``) a real directory or file, never a link out of the image.

Everything happens in a temporary folder renamed into place whole, so a crash never leaves
half an image; an engine removes the temporary folders it finds as it starts. Concurrent jobs on
one digest wait for one fetch; a fetch nobody waits for any more (its jobs were stopped) is
killed. Every skopeo and umoci run is bounded by the fetch timeout, and the disk it fills by the
image size bound (checked as it writes, every 50 ms, then exactly).

The cache, root-only (0700)::

    <cache>/<hex digest>/rootfs/      the image's root file system
    <cache>/<hex digest>/image.json   name, tag, environment, size; its mtime is the last use
    <cache>/.tmp-*/  <cache>/.trash-*/   an image being made, or removed

``trim`` removes the least recently used images not in use until the cache fits its budget.

Known limits:
- A digest that names an image index (several platforms) is refused: the algorithm names the
  manifest of the node's platform.
- The store's ``index.json`` is read at its top level only, and an entry needs a reference
  name (``org.opencontainers.image.ref.name``), which ``skopeo copy ... oci:STORE:NAME`` sets.
- One cache per engine: an engine starting removes the temporary folders of any other.
- The size bound counts the disk's free space, then the folder's allocated blocks: another
  program filling the same disk at that moment costs a walk of the folder, not a refusal.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import errno
import functools
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import stat
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from c2d.common.v1 import container_pb2

from mesh import containers
from mesh.errors import InvalidArgument
from mesh.jobs import is_sha256_hex
from operator_engine.sandbox import (
    IMAGE_MOUNT_DIRS,
    IMAGE_MOUNT_FILES,
    ImageRoot,
    is_env_variable,
)

_log = structlog.get_logger(__name__)

_DIGEST_RE = re.compile(r"sha256:([0-9a-f]{64})")
_INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
_REF_NAME = "org.opencontainers.image.ref.name"
_MAX_MANIFEST_BYTES = 4 << 20
_MAX_STORE_INDEX_BYTES = 16 << 20
# A fixed search path: the engine's own PATH must not choose what runs as root.
_TOOL_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
# What skopeo may need of the engine's environment: registry credentials and proxies.
_PASSED_ENV = (
    "HOME",
    "XDG_RUNTIME_DIR",
    "REGISTRY_AUTH_FILE",
    "HTTPS_PROXY",
    "HTTP_PROXY",
    "NO_PROXY",
    "https_proxy",
    "http_proxy",
    "no_proxy",
)
_LAYOUT_REF = "c2d"
_SIZE_CHECK_S = 0.05
_ABANDON_TIMEOUT_S = 10.0
_MESSAGE_CAP = 300
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
_IMAGE_FILE = "image.json"
_ROOTFS = "rootfs"
_PT_INTERP = 3
_LOGRUS_RE = re.compile(r'level=\w+ msg="((?:[^"\\]|\\.)*)"')
_REPEATED_RE = re.compile(r'^(?:Error parsing image name|initializing source) "[^"]*": ')
# Go's resolver names the node's DNS server in its errors: not the consumer's business.
_RESOLVER_RE = re.compile(r" on [0-9A-Fa-f.:\[\]]+:53\b")


class ImageError(Exception):
    """The job's image cannot be run. The message is fit for the consumer: it names the image
    and its digest (both public), never a host path."""


@dataclass(frozen=True)
class ImageRef:
    """A validated `Container`: where to fetch it from, and the digest that decides."""

    image: str
    tag: str
    digest: str

    @property
    def hex(self) -> str:
        return self.digest.removeprefix("sha256:")

    def __str__(self) -> str:
        return f"{self.image}@{self.digest}"


@dataclass(frozen=True)
class PreparedImage:
    """An image unpacked in the cache: what a job's sandbox runs in (`root`), what it is and
    how much disk it takes."""

    ref: ImageRef
    root: ImageRoot
    size_bytes: int


def parse_container(container: container_pb2.Container) -> ImageRef:
    """Checks the fields as the Provider does; raises ImageError saying which one is
    malformed."""
    try:
        containers.check_container(container, "container")
    except InvalidArgument as error:
        raise ImageError(error.message) from None
    if not containers.is_set(container):
        raise ImageError("container.image must be a registry reference")
    return ImageRef(container.image, container.tag, container.checksum)


@dataclass(frozen=True)
class _Tools:
    skopeo: str
    umoci: str
    busybox: str
    setpriv: str


class _TooLarge(Exception):
    """What a tool writes went past the image size bound."""


class ImageCache:
    """The engine's unpacked images, by digest; one per engine (see the module docstring)."""

    def __init__(
        self,
        *,
        store: Path,
        cache: Path,
        fetch_timeout_s: float,
        max_image_bytes: int,
        budget_bytes: int,
    ) -> None:
        self.store = store
        self.cache = cache
        self.fetch_timeout_s = fetch_timeout_s
        self.max_image_bytes = max_image_bytes
        self.budget_bytes = budget_bytes
        self.missing: list[str] = []  # tools not found by check()
        self.fetched = 0  # images this cache fetched and unpacked
        self._tools: _Tools | None = None
        self._images: dict[str, PreparedImage] = {}  # by hex digest
        self._in_use: collections.Counter[str] = collections.Counter()
        self._fetches: dict[str, asyncio.Future[PreparedImage]] = {}
        self._waiters: collections.Counter[str] = collections.Counter()

    # -- start-up ----------------------------------------------------------------------------

    def check(self) -> None:
        """Makes the cache folder, removes what a crashed engine left half made or half
        removed, and finds skopeo, umoci and a static busybox. Without them the engine still
        runs host-runtime jobs; a job naming an image then fails saying what is missing."""
        self.cache.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.cache, 0o700)
        for entry in self.cache.iterdir():
            if entry.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)):
                shutil.rmtree(entry, ignore_errors=True)
                _log.warning("images.leftover_removed", folder=entry.name)
        found: dict[str, str] = {}
        self.missing = []
        for name in ("skopeo", "umoci", "busybox", "setpriv"):
            path = shutil.which(name, path=_TOOL_PATH)
            if path is None:
                self.missing.append(name)
            elif name == "busybox" and not _is_static(path):
                # It runs inside images, which may have no C library at all.
                self.missing.append("busybox (static: Debian's busybox-static)")
            else:
                found[name] = os.path.abspath(path)
        if self.missing:
            _log.warning("images.unavailable", missing=self.missing)
            self._tools = None
        else:
            self._tools = _Tools(**found)

    # -- jobs --------------------------------------------------------------------------------

    async def prepare(self, container: container_pb2.Container) -> PreparedImage:
        """The image's root, ready for a sandbox; in use until release(). Raises ImageError
        when the job cannot run in it. Cancelled, it stops the fetch unless another job waits
        for the same image."""
        ref = parse_container(container)
        if self._tools is None:
            raise ImageError(
                f"image {ref}: this node cannot run container images "
                f"({', '.join(self.missing) or 'its tools are'} not installed)"
            )
        image = self._known(ref)
        if image is None:
            image = await self._wait_for_fetch(ref)
        else:
            _log.info("image.cached", image=ref.image, digest=ref.digest)
        if image.ref != ref:  # the same digest, named by another job as another image or tag
            image = dataclasses.replace(image, ref=ref)
        # With the waiters' count, in the same step: trim() never takes an image in between.
        self._in_use[ref.hex] += 1
        with contextlib.suppress(OSError):
            os.utime(self.cache / ref.hex / _IMAGE_FILE)  # its last use, for trim()
        return image

    def release(self, image: PreparedImage) -> None:
        """A job that prepare()d the image no longer runs in it."""
        self._in_use[image.ref.hex] -= 1
        if self._in_use[image.ref.hex] <= 0:
            del self._in_use[image.ref.hex]

    async def trim(self) -> None:
        """Removes the least recently used images that no job uses or waits for until the
        cache fits its budget."""
        entries = await asyncio.to_thread(self._list)
        total = sum(size for _, size, _ in entries)
        removed: list[Path] = []
        for hex_digest, size, last_used in sorted(entries, key=lambda e: e[2]):
            if total <= self.budget_bytes:
                break
            if self._busy(hex_digest):
                continue
            self._images.pop(hex_digest, None)
            trash = self.cache / f"{_TRASH_PREFIX}{hex_digest}-{secrets.token_hex(4)}"
            try:
                os.rename(self.cache / hex_digest, trash)  # at once: prepare() no longer sees it
            except OSError as error:
                _log.warning("image.remove_failed", digest=f"sha256:{hex_digest}", error=str(error))
                continue
            total -= size
            removed.append(trash)
            _log.info(
                "image.removed", digest=f"sha256:{hex_digest}", bytes=size, last_used=last_used
            )
        for trash in removed:
            await asyncio.to_thread(shutil.rmtree, trash, True)

    def _busy(self, hex_digest: str) -> bool:
        return (
            self._in_use[hex_digest] > 0
            or self._waiters[hex_digest] > 0
            or hex_digest in self._fetches
        )

    def _list(self) -> list[tuple[str, int, float]]:
        """(hex digest, size, last use) of each image in the cache."""
        found = []
        for entry in os.scandir(self.cache):
            if not is_sha256_hex(entry.name):
                continue
            try:
                info = os.stat(Path(entry.path) / _IMAGE_FILE)
                size = int(_read_json(Path(entry.path) / _IMAGE_FILE, 1 << 20)["size_bytes"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            found.append((entry.name, size, info.st_mtime))
        return found

    def _known(self, ref: ImageRef) -> PreparedImage | None:
        """The image when it is in the cache (read from disk once after a restart)."""
        image = self._images.get(ref.hex)
        folder = self.cache / ref.hex
        if image is None:
            try:
                record = _read_json(folder / _IMAGE_FILE, 1 << 20)
                image = self._image(ref, folder, record["env"], int(record["size_bytes"]))
            except (OSError, ValueError, KeyError, TypeError):
                return None
            self._images[ref.hex] = image
        elif not os.path.isdir(folder / _ROOTFS):  # removed by hand
            self._images.pop(ref.hex, None)
            return None
        return image

    def _image(self, ref: ImageRef, folder: Path, env: Any, size: int) -> PreparedImage:
        assert self._tools is not None  # checked by prepare()
        shell = Path(self._tools.busybox)
        variables = {str(k): str(v) for k, v in dict(env).items()}
        return PreparedImage(ref, ImageRoot(folder / _ROOTFS, variables, shell), size)

    async def _wait_for_fetch(self, ref: ImageRef) -> PreparedImage:
        fetch = self._fetches.get(ref.hex)
        if fetch is None:
            fetch = asyncio.ensure_future(self._fetch(ref))
            self._fetches[ref.hex] = fetch
            fetch.add_done_callback(functools.partial(self._fetch_done, ref.hex))
        self._waiters[ref.hex] += 1
        try:
            return await asyncio.shield(fetch)
        except asyncio.CancelledError:
            if self._waiters[ref.hex] == 1 and not fetch.done():
                _log.info("image.fetch_abandoned", image=ref.image, digest=ref.digest)
                fetch.cancel()
                # Its tool killed and its folder removed before the job's end is told.
                await asyncio.wait([fetch], timeout=_ABANDON_TIMEOUT_S)
            raise
        finally:
            self._waiters[ref.hex] -= 1
            if self._waiters[ref.hex] <= 0:
                del self._waiters[ref.hex]

    def _fetch_done(self, hex_digest: str, fetch: asyncio.Future[PreparedImage]) -> None:
        self._fetches.pop(hex_digest, None)
        if not fetch.cancelled():
            fetch.exception()  # retrieved: each waiter has it raised

    # -- one fetch ---------------------------------------------------------------------------

    async def _fetch(self, ref: ImageRef) -> PreparedImage:
        assert self._tools is not None  # checked by prepare()
        log = _log.bind(image=ref.image, digest=ref.digest)
        started = time.perf_counter()
        work = self.cache / f"{_TMP_PREFIX}{ref.hex}-{secrets.token_hex(4)}"
        try:
            work.mkdir(mode=0o700)
            image = await self._fetch_into(ref, self._tools, work, log)
        except (OSError, ValueError) as error:
            # The engine's own trouble (a full disk...), or a malformed file the checks let by.
            log.error("image.failed", error=str(error).replace(str(self.cache), "<cache>"))
            code = error.errno if isinstance(error, OSError) else None
            name = errno.errorcode.get(code or 0, type(error).__name__)
            raise ImageError(f"image {ref} could not be prepared on this node ({name})") from None
        finally:
            await asyncio.to_thread(shutil.rmtree, work, True)
        self.fetched += 1
        self._images[ref.hex] = image
        log.info(
            "image.ready",
            bytes=image.size_bytes,
            duration_ms=round((time.perf_counter() - started) * 1000, 1),
        )
        return image

    async def _fetch_into(
        self, ref: ImageRef, tools: _Tools, work: Path, log: Any
    ) -> PreparedImage:
        started = time.perf_counter()
        source, where, manifest = await self._locate(ref, tools, work, log)
        declared = _check_manifest(ref, manifest, self.max_image_bytes)
        log.info("image.verified", source=where, declared_bytes=declared)
        fetched = work / "fetched"
        copy = ["copy", "--quiet", "--remove-signatures", "--retry-times", "0"]
        await self._tool(
            tools,
            [tools.skopeo, "--insecure-policy", *copy, source, f"dir:{fetched}"],
            ref,
            work,
            f"fetching it from the {where}",
            watch=fetched,
        )
        got = _read_bounded(fetched / "manifest.json", _MAX_MANIFEST_BYTES)
        if hashlib.sha256(got).hexdigest() != ref.hex:
            raise ImageError(f"image {ref}: the {where} sent another manifest than it named")
        log.info(
            "image.fetched",
            source=where,
            bytes=_tree_bytes(fetched),
            duration_ms=round((time.perf_counter() - started) * 1000, 1),
        )
        env = _image_env(_read_config(fetched, got, ref))
        started = time.perf_counter()
        layout = work / "layout"
        await self._tool(
            tools,
            [
                tools.skopeo,
                "--insecure-policy",
                *copy,
                f"dir:{fetched}",
                f"oci:{layout}:{_LAYOUT_REF}",
            ],
            ref,
            work,
            "reading it",
        )
        await asyncio.to_thread(shutil.rmtree, fetched)
        bundle = work / "bundle"
        await self._tool(
            tools,
            [
                tools.umoci,
                "unpack",
                "--rootless",
                "--image",
                f"{layout}:{_LAYOUT_REF}",
                str(bundle),
            ],
            ref,
            work,
            "unpacking it",
            watch=bundle,
        )
        rootfs = bundle / _ROOTFS
        size = await asyncio.to_thread(make_sandbox_root, rootfs)
        if size > self.max_image_bytes:
            raise _too_large(ref, self.max_image_bytes)
        log.info(
            "image.unpacked",
            bytes=size,
            duration_ms=round((time.perf_counter() - started) * 1000, 1),
        )
        return await asyncio.to_thread(self._install, ref, work, rootfs, env, size)

    async def _locate(
        self, ref: ImageRef, tools: _Tools, work: Path, log: Any
    ) -> tuple[str, str, bytes]:
        """(skopeo's source, "image store" or "registry", the manifest's bytes)."""
        found = await asyncio.to_thread(_find_in_store, self.store, ref, log)
        if found is not None:
            name, manifest = found
            return f"oci:{self.store}:{name}", "image store", manifest
        source = f"docker://{ref.image}@{ref.digest}"
        inspect = [tools.skopeo, "--insecure-policy", "inspect", "--raw", "--retry-times", "0"]
        try:
            manifest = await self._tool(
                tools, [*inspect, source], ref, work, "looking it up in its registry"
            )
        except ImageError as error:
            raise ImageError(f"{error} (it is not in this node's image store either)") from None
        return source, "registry", manifest

    async def _tool(
        self,
        tools: _Tools,
        argv: Sequence[str],
        ref: ImageRef,
        work: Path,
        doing: str,
        *,
        watch: Path | None = None,
    ) -> bytes:
        """Runs skopeo or umoci to its end within the fetch timeout (and, with `watch`, the
        image size bound on what it writes there); returns its stdout. Raises ImageError
        saying what failed; cancelled, it kills the tool."""
        env = {name: os.environ[name] for name in _PASSED_ENV if name in os.environ}
        env.update(PATH=_TOOL_PATH, TMPDIR=str(work))
        # --pdeathsig: the tool dies with the engine (the event loop's thread forks it).
        process = await asyncio.create_subprocess_exec(
            tools.setpriv,
            "--pdeathsig=SIGKILL",
            "--",
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        running = asyncio.ensure_future(process.communicate())
        tasks: list[asyncio.Future[Any]] = [running]
        if watch is not None:
            tasks.append(asyncio.ensure_future(_watch_size(watch, self.max_image_bytes)))
        try:
            async with asyncio.timeout(self.fetch_timeout_s):
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in tasks[1:]:
                if task.done():
                    task.result()  # raises _TooLarge
            out, err = await running
        except TimeoutError:
            raise ImageError(
                f"image {ref}: {doing} took longer than {self.fetch_timeout_s:g} s"
            ) from None
        except _TooLarge:
            raise _too_large(ref, self.max_image_bytes) from None
        finally:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await process.wait()
        if process.returncode != 0:
            message = self._scrub(err.decode(errors="replace").strip(), work)
            _log.warning(
                "image.tool_failed",
                tool=os.path.basename(argv[0]),
                status=process.returncode,
                message=message[-2000:],
            )
            last = message.splitlines()[-1] if message else f"exit status {process.returncode}"
            raise ImageError(f"image {ref}: {doing} failed: {_short(_tool_message(last))}")
        return out

    def _scrub(self, text: str, work: Path) -> str:
        """Replaces the host paths tools name by placeholders."""
        for path, alias in ((work, "<work>"), (self.cache, "<cache>"), (self.store, "<store>")):
            text = text.replace(str(path), alias)
        return text

    def _install(
        self, ref: ImageRef, work: Path, rootfs: Path, env: Mapping[str, str], size: int
    ) -> PreparedImage:
        """Moves the prepared root into the cache whole (blocking)."""
        staged = work / "image"
        staged.mkdir(mode=0o700)
        os.rename(rootfs, staged / _ROOTFS)
        record: dict[str, Any] = {"image": ref.image, "tag": ref.tag, "digest": ref.digest}
        record.update(env=dict(env), size_bytes=size)
        (staged / _IMAGE_FILE).write_text(json.dumps(record, sort_keys=True))
        folder = self.cache / ref.hex
        try:
            os.rename(staged, folder)
        except OSError as error:
            if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            # Made meanwhile by another engine on this cache: the same bytes, by digest.
        return self._image(ref, folder, env, size)


# -- the image's files -----------------------------------------------------------------------


def make_sandbox_root(rootfs: Path) -> int:
    """Makes an unpacked root file system fit to be a sandbox's root (blocking): root-owned,
    nothing writable by group or others, no setuid or setgid bit, and every path the sandbox
    mounts on a real directory or file (a link or anything else there is replaced). Returns
    its size on disk in bytes."""
    os.chmod(rootfs, 0o755)  # noqa: S103 (the job uid's bwrap traverses it)
    size = _harden(rootfs)
    for path in IMAGE_MOUNT_DIRS:
        _make_point(rootfs, path, is_dir=True)
    for path in IMAGE_MOUNT_FILES:
        _make_point(rootfs, path, is_dir=False)
    return size


def _harden(top: Path) -> int:
    """Walks the tree without following links; returns its allocated bytes."""
    total = 0
    seen: set[tuple[int, int]] = set()
    pending = [str(top)]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                info = entry.stat(follow_symlinks=False)
                if info.st_nlink > 1 and not stat.S_ISDIR(info.st_mode):
                    if (info.st_dev, info.st_ino) in seen:
                        continue
                    seen.add((info.st_dev, info.st_ino))
                total += info.st_blocks * 512
                if info.st_uid != 0 or info.st_gid != 0:
                    os.lchown(entry.path, 0, 0)
                if stat.S_ISLNK(info.st_mode):
                    continue
                mode = stat.S_IMODE(info.st_mode)
                wanted = mode & ~(stat.S_IWGRP | stat.S_IWOTH | stat.S_ISUID | stat.S_ISGID)
                if wanted != mode:
                    os.chmod(entry.path, wanted)  # not a link: checked just above
                if stat.S_ISDIR(info.st_mode):
                    pending.append(entry.path)
    return total


def _make_point(rootfs: Path, path: str, *, is_dir: bool) -> None:
    """Makes `path` inside `rootfs` a directory (or an empty file) with real directories above
    it, component by component, never through a link."""
    current = rootfs
    parts = path.strip("/").split("/")
    for index, name in enumerate(parts):
        current = current / name
        want_dir = is_dir or index < len(parts) - 1
        try:
            info: os.stat_result | None = os.lstat(current)
        except FileNotFoundError:
            info = None
        if info is not None:
            right = stat.S_ISDIR(info.st_mode) if want_dir else stat.S_ISREG(info.st_mode)
            if right:
                continue
            if stat.S_ISDIR(info.st_mode):
                shutil.rmtree(current)
            else:
                current.unlink()  # a link (never followed), a device, a FIFO...
        if want_dir:
            current.mkdir(mode=0o755)
            os.chmod(current, 0o755)  # noqa: S103
        else:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            os.close(os.open(current, flags, 0o644))
            os.chmod(current, 0o644)


def _image_env(config: Mapping[str, Any]) -> dict[str, str]:
    """The image config's Env as a mapping, without names or values the sandbox would refuse.
    (Its WorkingDir is not honoured: a job's working directory is /, as the reference system's
    relative data/ paths need.)"""
    env: dict[str, str] = {}
    inner = config.get("config")
    items = inner.get("Env") if isinstance(inner, dict) else None
    for item in items if isinstance(items, list) else []:
        if isinstance(item, str) and "=" in item:
            name, _, value = item.partition("=")
            if is_env_variable(name, value):
                env[name] = value
    return env


def _read_config(fetched: Path, manifest: bytes, ref: ImageRef) -> dict[str, Any]:
    """The image's config, from a `dir:` copy, checked against the digest its manifest names."""
    descriptor = json.loads(manifest).get("config") or {}
    digest = descriptor.get("digest", "") if isinstance(descriptor, dict) else ""
    match = _DIGEST_RE.fullmatch(digest)
    if match is None:
        raise ImageError(f"image {ref}: its manifest names no sha256 config")
    data = _read_bounded(fetched / match.group(1), _MAX_MANIFEST_BYTES)
    if hashlib.sha256(data).hexdigest() != match.group(1):
        raise ImageError(f"image {ref}: its config does not match its digest")
    return _json_object(data, ref, "config")


def _json_object(data: bytes, ref: ImageRef, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise ImageError(f"image {ref}: its {what} is not a JSON object")
    return value


def _check_manifest(ref: ImageRef, manifest: bytes, limit: int) -> int:
    """Checks the manifest's digest and that it describes one image that fits `limit`
    compressed; returns the sizes it declares."""
    actual = hashlib.sha256(manifest).hexdigest()
    if actual != ref.hex:
        raise ImageError(
            f"image {ref.image}: its manifest's digest is sha256:{actual}, not the "
            f"{ref.digest} the algorithm names"
        )
    document = _json_object(manifest, ref, "manifest")
    if document.get("mediaType") in _INDEX_TYPES or "manifests" in document:
        raise ImageError(
            f"image {ref}: the digest names an image index (several platforms); name the "
            "digest of one platform's manifest"
        )
    layers = document.get("layers")
    config = document.get("config")
    if not isinstance(layers, list) or not isinstance(config, dict):
        raise ImageError(f"image {ref}: its manifest is not an image manifest")
    try:
        declared = int(config.get("size", 0)) + sum(int(layer["size"]) for layer in layers)
    except (KeyError, TypeError, ValueError):
        raise ImageError(f"image {ref}: its manifest's layer sizes are malformed") from None
    if declared > limit:
        raise _too_large(ref, limit)
    return declared


def _find_in_store(store: Path, ref: ImageRef, log: Any) -> tuple[str, bytes] | None:
    """(reference name, manifest bytes) of the digest in the local image store, or None."""
    if ":" in str(store):
        log.warning("images.store_unusable", reason="its path holds a colon")
        return None
    try:
        index = _read_json(store / "index.json", _MAX_STORE_INDEX_BYTES)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        log.warning("images.store_unreadable", error=type(error).__name__)
        return None
    entries = index.get("manifests")
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict) or entry.get("digest") != ref.digest:
            continue
        name = (entry.get("annotations") or {}).get(_REF_NAME)
        if not isinstance(name, str) or not name or "\0" in name:
            log.warning("images.store_entry_unnamed")
            continue
        try:
            return name, _read_bounded(store / "blobs" / "sha256" / ref.hex, _MAX_MANIFEST_BYTES)
        except OSError as error:
            log.warning("images.store_blob_unreadable", error=type(error).__name__)
    return None


async def _watch_size(folder: Path, limit: int) -> None:
    """Raises _TooLarge once `folder` holds more than `limit` bytes; never returns. Looks at
    the disk's free space (one statvfs) and walks the folder only when that dropped by more
    than the room left."""
    parent = folder.parent

    def free() -> int:
        info = os.statvfs(parent)
        return info.f_bavail * info.f_frsize

    start = free()
    threshold = limit
    while True:
        await asyncio.sleep(_SIZE_CHECK_S)
        used = start - free()
        if used > threshold:
            actual = await asyncio.to_thread(_tree_bytes, folder)
            if actual > limit:
                raise _TooLarge
            threshold = used + (limit - actual)


def _tree_bytes(top: Path) -> int:
    """Allocated bytes below `top`, links not followed (0 when it does not exist)."""
    total = 0
    for root, dirs, files in os.walk(top):
        for name in (*dirs, *files):
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def _too_large(ref: ImageRef, limit: int) -> ImageError:
    return ImageError(f"image {ref} is larger than this node allows ({limit >> 20} MiB unpacked)")


def _tool_message(line: str) -> str:
    """The message of a tool's last log line (skopeo's `time=... level=fatal msg="..."`),
    without the reference it repeats."""
    match = _LOGRUS_RE.search(line)
    if match is not None:
        line = match.group(1).replace('\\"', '"').replace("\\\\", "\\")
    return _RESOLVER_RE.sub("", _REPEATED_RE.sub("", line))


def _short(text: str) -> str:
    return text if len(text) <= _MESSAGE_CAP else text[: _MESSAGE_CAP - 3] + "..."


def _read_bounded(path: Path, cap: int) -> bytes:
    """A file's bytes, refused (ValueError) beyond `cap`, opened without following a link."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as file:
        data = file.read(cap + 1)
    if len(data) > cap:
        raise ValueError(f"larger than {cap} bytes")
    return data


def _read_json(path: Path, cap: int) -> dict[str, Any]:
    value = json.loads(_read_bounded(path, cap))
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def _is_static(path: str) -> bool:
    """Whether an ELF executable needs no dynamic loader (no PT_INTERP program header)."""
    try:
        with open(path, "rb") as file:
            header = file.read(64)
            if header[:4] != b"\x7fELF" or header[4] != 2:  # 64-bit only
                return False
            order = "<" if header[5] == 1 else ">"
            (phoff,) = struct.unpack_from(order + "Q", header, 32)
            phentsize, phnum = struct.unpack_from(order + "HH", header, 54)
            file.seek(phoff)
            table = file.read(phentsize * phnum)
    except (OSError, struct.error, IndexError):
        return False
    types = [struct.unpack_from(order + "I", table, i * phentsize)[0] for i in range(phnum)]
    return _PT_INTERP not in types
