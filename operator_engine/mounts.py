"""mount(2) and umount2(2) for the engine's own process, by ctypes: a job's mounts are made
while it starts, where a `mount` command per mount point would cost a fork and exec each."""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_PRIVATE = 1 << 18
MS_SHARED = 1 << 20
MNT_DETACH = 0x2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def mount(
    source: str | Path | None,
    target: str | Path,
    fstype: str | None = None,
    flags: int = 0,
    data: str | None = None,
) -> None:
    """mount(2); raises OSError naming the target (never the source: it may be a dataset's
    location)."""
    result = _libc.mount(
        None if source is None else os.fsencode(source),
        os.fsencode(target),
        None if fstype is None else fstype.encode(),
        flags,
        None if data is None else data.encode(),
    )
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(target))


def unmount(target: str | Path) -> bool:
    """Detaches the mount at `target` and everything below it (lazily: a process still using
    it keeps it until it lets go); False when nothing is mounted there."""
    if _libc.umount2(os.fsencode(target), MNT_DETACH) != 0:
        code = ctypes.get_errno()
        if code in (errno.EINVAL, errno.ENOENT):  # not a mount point, or gone
            return False
        raise OSError(code, os.strerror(code), str(target))
    return True


def mounted_under(root: Path) -> list[Path]:
    """Mount points at or below `root`, from this process's mount table, in mount order."""
    base = str(root.resolve())
    found = []
    with open("/proc/self/mountinfo") as table:
        for line in table:
            # The fifth field is the mount point, with spaces escaped as \040.
            point = line.split(" ")[4].replace("\\040", " ")
            if point == base or point.startswith(base + "/"):
                found.append(Path(point))
    return found
