"""A disk of its own for each job's outputs: a sparse file formatted as ext4 and loop-mounted on
the workspace's outputs/ folder, as large as the environment's disk limit.

The kernel then enforces the limit, on bytes and on files (inodes) alike, however the algorithm
writes; a file-size rlimit alone would let many files fill the node's disk. The image is
deleted after the outputs are published, so nothing the algorithm wrote outlives the job."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import structlog

log = structlog.get_logger()

# Below this much free space, or with no free inode, the job's disk counts as full.
FULL_MARGIN_BYTES = 256 * 1024


class DisksUnavailable(Exception):
    """The node cannot give jobs a disk of their own (no loop devices, no mkfs, not root)."""


async def _run(*argv: str) -> None:
    process = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, stderr = await process.communicate()
    if process.returncode != 0:
        raise OSError(f"{argv[0]} failed: {stderr.decode(errors='replace').strip()[:300]}")


def mounted_under(root: Path) -> list[Path]:
    """Mount points at or below `root`, from this process's mount table."""
    found = []
    prefix = str(root.resolve())
    with open("/proc/self/mountinfo") as table:
        for line in table:
            # The fifth field is the mount point, with spaces escaped as \040.
            point = line.split(" ")[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(Path(point))
    return found


class JobDisks:
    def __init__(self, images: Path) -> None:
        self.images = images

    def check(self) -> None:
        """Raises DisksUnavailable, saying why, unless a disk can be made and mounted."""
        for tool in ("mkfs.ext4", "mount", "umount"):
            if shutil.which(tool) is None:
                raise DisksUnavailable(f"{tool} is missing (Debian package e2fsprogs/mount)")
        if os.geteuid() != 0:
            raise DisksUnavailable("mounting a job's disk needs root")
        self.images.mkdir(parents=True, exist_ok=True, mode=0o700)
        probe = self.images / "probe"
        probe.mkdir(exist_ok=True)
        try:
            image = self.images / "probe.img"
            with open(image, "wb") as f:
                f.truncate(8 << 20)
            subprocess.run(_mkfs(image), check=True, capture_output=True)
            subprocess.run(_mount(image, probe), check=True, capture_output=True)
            subprocess.run(["umount", str(probe)], check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError) as error:
            detail = getattr(error, "stderr", b"") or b""
            raise DisksUnavailable(
                "cannot loop-mount a job disk (are loop devices available?): "
                + detail.decode(errors="replace").strip()[:300]
            ) from None
        finally:
            with contextlib.suppress(OSError):
                (self.images / "probe.img").unlink()
            with contextlib.suppress(OSError):
                probe.rmdir()

    async def attach(self, job_id: str, mountpoint: Path, size: int) -> None:
        """Makes the job's disk and mounts it on `mountpoint` (an existing, empty folder)."""
        image = self.images / f"{job_id}.img"
        await asyncio.to_thread(_make_image, image, size)
        await _run(*_mkfs(image))
        await _run(*_mount(image, mountpoint))
        # ext4's lost+found would otherwise sit among the outputs.
        await asyncio.to_thread(_remove_lost_found, mountpoint)

    async def detach(self, job_id: str, mountpoint: Path) -> None:
        """Unmounts the job's disk and deletes it; a no-op for a job without one."""
        if mountpoint in await asyncio.to_thread(mounted_under, mountpoint):
            try:
                await _run("umount", str(mountpoint))
            except OSError:
                # Busy (something still looks at it): detach it now, the kernel frees it later.
                await _run("umount", "--lazy", str(mountpoint))
        with contextlib.suppress(FileNotFoundError):
            (self.images / f"{job_id}.img").unlink()

    async def sweep(self, workspace_root: Path, keep: set[str]) -> None:
        """Removes disks of jobs this engine does not know (left by a crash)."""
        for point in await asyncio.to_thread(mounted_under, workspace_root):
            job_id = point.parent.name
            if job_id not in keep:
                await self.detach(job_id, point)
                log.warning("removed a leftover job disk", job_id=job_id)
        if self.images.is_dir():
            for image in self.images.glob("*.img"):
                if image.stem not in keep:
                    image.unlink(missing_ok=True)


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


def _remove_lost_found(mountpoint: Path) -> None:
    with contextlib.suppress(OSError):
        (mountpoint / "lost+found").rmdir()
