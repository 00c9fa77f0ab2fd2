"""A disk of its own for each job's outputs: a sparse file formatted as ext4, as large as the
environment's disk limit, loop-mounted under `disks/mounts` and mounted into the job's sandbox
as /data/outputs in place of the workspace's outputs/ folder.

The kernel then enforces the limit, on bytes and on files (inodes) alike, however the algorithm
writes; a file-size rlimit alone would let many files fill the node's disk. The disk is wiped
or deleted after the outputs are published, so nothing the algorithm wrote outlives the job."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import stat
import subprocess
import uuid
from pathlib import Path

import structlog

from operator_engine.mounts import mounted_under

log = structlog.get_logger()

# Below this much free space, or with no free inode, the job's disk counts as full.
FULL_MARGIN_BYTES = 256 * 1024


class DisksUnavailable(Exception):
    """The node cannot give jobs a disk of their own (no loop devices, no mkfs, not root)."""


async def _run(*argv: str) -> None:
    process = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        _, stderr = await process.communicate()
    except asyncio.CancelledError:
        # Let mkfs or mount finish, so that a sweep after the cancel sees what they did.
        await asyncio.shield(process.wait())
        raise
    if process.returncode != 0:
        raise OSError(f"{argv[0]} failed: {stderr.decode(errors='replace').strip()[:300]}")


class JobDisks:
    """Job disks, kept ready in a pool so that making one (mkfs, mount) is not on a job's path.

    After a job's outputs are published its disk is wiped (everything on it deleted, the root
    handed back to root) and goes back to the pool; one the pool does not need, or one that
    cannot be wiped, is unmounted and deleted. Disks in use count towards the pool's size, so
    a job taking one does not start the making of another that its release then destroys."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.images = root / "images"
        self.mounts = root / "mounts"
        self._ready: dict[int, list[Path]] = {}
        self._wanted: dict[int, int] = {}
        self._sizes: dict[Path, int] = {}
        # Per size: disks held by jobs, and disks being wiped on their way back to the pool.
        self._in_use: dict[int, int] = {}
        self._wiping: dict[int, int] = {}
        self._wiped = asyncio.Condition()
        self._refill: asyncio.Task[None] | None = None

    def check(self) -> None:
        """Raises DisksUnavailable, saying why, unless a disk can be made and mounted."""
        for tool in ("mkfs.ext4", "mount", "umount"):
            if shutil.which(tool) is None:
                raise DisksUnavailable(f"{tool} is missing (Debian packages e2fsprogs, mount)")
        if os.geteuid() != 0:
            raise DisksUnavailable("mounting a job's disk needs root")
        for folder in (self.root, self.images, self.mounts):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        image, point = self.images / "probe.img", self.mounts / "probe"
        point.mkdir(exist_ok=True)
        try:
            _make_image(image, 8 << 20)
            subprocess.run(_mkfs(image), check=True, capture_output=True)
            subprocess.run(_mount(image, point), check=True, capture_output=True)
            subprocess.run(["umount", str(point)], check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError) as error:
            detail = getattr(error, "stderr", b"") or b""
            raise DisksUnavailable(
                "cannot loop-mount a job disk (are loop devices available?): "
                + detail.decode(errors="replace").strip()[:300]
            ) from None
        finally:
            image.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                point.rmdir()

    def want(self, size: int, count: int) -> None:
        """Keeps `count` disks of `size` bytes ready (one per job that can run at once)."""
        self._wanted[size] = self._wanted.get(size, 0) + count
        self._start_refill()

    async def take(self, size: int) -> Path:
        """A mounted, empty disk of `size` bytes for one job."""
        ready = self._ready.setdefault(size, [])
        if not ready and self._wiping.get(size, 0):
            # The last job's disk is on its way back (a wipe takes about a millisecond):
            # cheaper to wait for it than to make one.
            async with self._wiped:
                await self._wiped.wait_for(lambda: bool(ready) or not self._wiping.get(size, 0))
        disk = ready.pop(0) if ready else await self._make(size)
        self._in_use[size] = self._in_use.get(size, 0) + 1
        self._start_refill()
        return disk

    async def release(self, disk: Path) -> None:
        """Takes a disk back after its job: wiped and back in the pool when the pool wants it,
        else unmounted and deleted. A no-op for a disk already gone."""
        size = self._sizes.get(disk)
        if size is None:  # not one of this pool's (a previous engine's), or already gone
            await self._destroy(disk)
            return
        self._in_use[size] = max(0, self._in_use.get(size, 0) - 1)
        if self._pooled(size) < self._wanted.get(size, 0):
            self._wiping[size] = self._wiping.get(size, 0) + 1
            try:
                await asyncio.to_thread(_wipe, disk)
            except OSError as error:
                log.warning("could not wipe a job disk; replacing it", error=str(error))
            else:
                self._ready.setdefault(size, []).append(disk)
                return
            finally:
                self._wiping[size] -= 1
                async with self._wiped:
                    self._wiped.notify_all()
        await self._destroy(disk)
        self._start_refill()  # when the pool is now short of a disk

    def _pooled(self, size: int) -> int:
        """Disks of `size` ready, held by jobs, or on their way back to the pool."""
        return (
            len(self._ready.get(size, ())) + self._in_use.get(size, 0) + self._wiping.get(size, 0)
        )

    async def _destroy(self, disk: Path) -> None:
        self._sizes.pop(disk, None)
        if disk in await asyncio.to_thread(mounted_under, disk):
            try:
                await _run("umount", str(disk))
            except OSError:
                # Busy (something still looks at it): detach it now, the kernel frees it later.
                await _run("umount", "--lazy", str(disk))
        await asyncio.to_thread(self._remove, disk)

    def _remove(self, disk: Path) -> None:
        (self.images / f"{disk.name}.img").unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            disk.rmdir()

    async def sweep(self, keep: set[Path]) -> None:
        """Removes every disk but those in `keep` (jobs still to be published, left by a crash).
        Made for before any job takes a disk, or for the end: a disk being made is not spared."""
        for point in await asyncio.to_thread(mounted_under, self.mounts):
            if point not in keep:
                await self._destroy(point)
        if self.images.is_dir():
            for image in self.images.glob("*.img"):
                if self.mounts / image.stem not in keep:
                    image.unlink(missing_ok=True)

    async def close(self, keep: set[Path]) -> None:
        """Stops refilling and removes every disk but those in `keep` (jobs cut off by the
        stop, whose outputs the next engine publishes)."""
        if self._refill is not None:
            self._refill.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refill
        self._ready.clear()
        # A sweep rather than the ready list: a disk being made when the refill was cancelled
        # is mounted but in no list.
        await self.sweep(keep)

    def _start_refill(self) -> None:
        if self._refill is None or self._refill.done():
            self._refill = asyncio.get_running_loop().create_task(self._fill())

    async def _fill(self) -> None:
        for size, count in self._wanted.items():
            ready = self._ready.setdefault(size, [])
            while self._pooled(size) < count:
                try:
                    ready.append(await self._make(size))
                except OSError as error:
                    log.error("could not make a job disk ahead of time", error=str(error))
                    return

    async def _make(self, size: int) -> Path:
        name = f"disk-{uuid.uuid4().hex}"
        image, point = self.images / f"{name}.img", self.mounts / name
        await asyncio.to_thread(point.mkdir, 0o700)
        try:
            await asyncio.to_thread(_make_image, image, size)
            await _run(*_mkfs(image))
            await _run(*_mount(image, point))
        except OSError:
            image.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                point.rmdir()
            raise
        # ext4's lost+found would otherwise sit among the outputs.
        await asyncio.to_thread(_remove_lost_found, point)
        self._sizes[point] = size
        return point


def is_full(mountpoint: Path) -> bool:
    """True when the job's disk has (nearly) no space or no inode left."""
    try:
        info = os.statvfs(mountpoint)
    except OSError:
        return False
    return info.f_bavail * info.f_frsize < FULL_MARGIN_BYTES or info.f_favail == 0


def _make_image(image: Path, size: int) -> None:
    fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, size)  # sparse: only what the job writes takes room
    finally:
        os.close(fd)


def _mkfs(image: Path) -> list[str]:
    # No journal and lazy init: made in a few milliseconds, and the disk lives for one job.
    return [
        "mkfs.ext4",
        "-q",
        "-F",
        "-m",
        "0",
        "-O",
        "^has_journal",
        "-E",
        "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
        str(image),
    ]


def _mount(image: Path, mountpoint: Path) -> list[str]:
    return ["mount", "-o", "loop,nosuid,nodev", str(image), str(mountpoint)]


def _wipe(disk: Path) -> None:
    """Deletes everything a job left on its disk. rmtree works with directory descriptors and
    never follows links, whatever the job planted; the job's processes are all gone by now."""
    fd = os.open(disk, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for name in os.listdir(fd):
            info = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISDIR(info.st_mode):
                shutil.rmtree(name, dir_fd=fd)
            else:
                os.unlink(name, dir_fd=fd)
        os.fchown(fd, 0, 0)
        os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def _remove_lost_found(mountpoint: Path) -> None:
    with contextlib.suppress(OSError):
        (mountpoint / "lost+found").rmdir()
