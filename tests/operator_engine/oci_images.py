"""Small OCI images built on this machine, without a registry or a container engine: umoci makes
an image in an OCI layout (the folder an engine's local image store is), from files given here
and from the host's own static busybox or Debian python3.

    digest = build_busybox_image(layout, "tools", files={"/etc/os-release": b"ID=c2d-test\\n"})
    digest = build_python_image(layout, "python")   # python3 and its stdlib, and no shell

Each builder returns the image's manifest digest (``sha256:<hex>``, what
``Container.checksum`` names) and tags it in the layout. ``files`` maps absolute paths in the
image to their content: ``bytes`` or ``str`` (a 0644 file), ``File`` (with a mode),
``Symlink`` or ``Dir``. A busybox image takes about 0.2 s to build, a Python image about 2 s."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

BUSYBOX = "/usr/bin/busybox"
HOST_PYTHON = "/usr/bin/python3.11"
HOST_STDLIB = Path("/usr/lib/python3.11")
# Left out of the Python image: test suites and what an algorithm never imports.
STDLIB_LEFT_OUT = (
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "lib2to3",
    "pydoc_data",
    "distutils",
    "site-packages",
    "unittest/test",
    "sitecustomize.py",
)
STDLIB_LEFT_OUT_PREFIX = "config-"


@dataclass(frozen=True)
class File:
    data: bytes | str
    mode: int = 0o644
    # Kept for Python sources: a compiled module is used only while its source's mtime matches.
    mtime: float | None = None


@dataclass(frozen=True)
class Symlink:
    target: str


@dataclass(frozen=True)
class Dir:
    mode: int = 0o755


Entry = bytes | str | File | Symlink | Dir


def build_image(
    layout: Path, tag: str, files: Mapping[str, Entry], *, env: Sequence[str] = ()
) -> str:
    """An image of exactly `files` (one layer) with `env` (``NAME=value``) in its config,
    tagged `tag` in the OCI layout `layout` (made when missing); returns its manifest digest."""
    if not (layout / "index.json").exists():
        _umoci("init", "--layout", str(layout))
    image = f"{layout}:{tag}"
    _umoci("new", "--image", image)
    with tempfile.TemporaryDirectory(prefix="c2d-oci-") as scratch:
        bundle = Path(scratch) / "bundle"
        _umoci("unpack", "--rootless", "--image", image, str(bundle))
        write_files(bundle / "rootfs", files)
        _umoci("repack", "--image", image, str(bundle))
    if env:
        _umoci("config", "--image", image, *(f"--config.env={item}" for item in env))
    return manifest_digest(layout, tag)


def build_busybox_image(
    layout: Path,
    tag: str,
    files: Mapping[str, Entry] | None = None,
    *,
    env: Sequence[str] = ("PATH=/bin",),
) -> str:
    """The host's static busybox as /bin/busybox with a link for each of its programs
    (/bin/sh among them), and `files`."""
    tree: dict[str, Entry] = {"/bin/busybox": File(Path(BUSYBOX).read_bytes(), 0o755)}
    for applet in subprocess.run(
        [BUSYBOX, "--list"], capture_output=True, check=True
    ).stdout.split():
        if applet != b"busybox":
            tree[f"/bin/{applet.decode()}"] = Symlink("busybox")
    tree.update(files or {})
    return build_image(layout, tag, tree, env=env)


def build_python_image(
    layout: Path,
    tag: str,
    files: Mapping[str, Entry] | None = None,
    *,
    env: Sequence[str] = ("PATH=/usr/local/bin:/usr/bin",),
) -> str:
    """The host's Debian python3 (the interpreter, its standard library without test suites,
    the shared libraries the interpreter and its extension modules link), no shell, and
    `files`: ``python3 $ALGO`` runs in it."""
    tree: dict[str, Entry] = {
        "/usr/bin/python3.11": File(Path(HOST_PYTHON).read_bytes(), 0o755),
        "/usr/bin/python3": Symlink("python3.11"),
    }
    extensions = []
    for path in HOST_STDLIB.rglob("*"):
        relative = path.relative_to(HOST_STDLIB)
        text = relative.as_posix()
        if text.startswith(STDLIB_LEFT_OUT_PREFIX) or any(
            text == out or text.startswith(out + "/") for out in STDLIB_LEFT_OUT
        ):
            continue
        target = f"/usr/lib/python3.11/{text}"
        if path.is_symlink():
            continue  # Debian's links point into /etc or /usr/share: not needed
        if path.is_dir():
            tree[target] = Dir()
        else:
            tree[target] = File(path.read_bytes(), 0o644, path.stat().st_mtime)
            if path.suffix == ".so":
                extensions.append(str(path))
    for library in _shared_libraries([HOST_PYTHON, *extensions]):
        tree[library] = File(Path(library).resolve().read_bytes(), 0o755)
    tree.update(files or {})
    return build_image(layout, tag, tree, env=env)


def manifest_digest(layout: Path, tag: str) -> str:
    """The digest of the manifest `tag` names in the layout, checked against its bytes."""
    index = json.loads((layout / "index.json").read_text())
    for entry in index["manifests"]:
        if entry.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            digest: str = entry["digest"]
            data = (layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()
            assert "sha256:" + hashlib.sha256(data).hexdigest() == digest
            return digest
    raise KeyError(tag)


def manifest_bytes(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()


def write_files(root: Path, files: Mapping[str, Entry]) -> None:
    """Writes `files` below `root` (parents made as 0755 folders), in order."""
    for name, entry in files.items():
        path = root / name.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(entry, Symlink):
            os.symlink(entry.target, path)
        elif isinstance(entry, Dir):
            path.mkdir(exist_ok=True)
            os.chmod(path, entry.mode)
        else:
            file = entry if isinstance(entry, File) else File(entry)
            data = file.data.encode() if isinstance(file.data, str) else file.data
            path.write_bytes(data)
            os.chmod(path, file.mode)
            if file.mtime is not None:
                os.utime(path, (file.mtime, file.mtime))


def _shared_libraries(binaries: Sequence[str]) -> list[str]:
    """The shared libraries (and the dynamic loader) that ldd names for `binaries`."""
    found: set[str] = set()
    for chunk in range(0, len(binaries), 64):
        run = subprocess.run(
            ["ldd", *binaries[chunk : chunk + 64]], capture_output=True, text=True, check=False
        )
        for line in run.stdout.splitlines():
            for word in line.split():
                if word.startswith("/") and ".so" in word and os.path.exists(word):
                    found.add(word)
    return sorted(found)


def _umoci(*args: str) -> None:
    run = subprocess.run(["umoci", *args], capture_output=True, text=True, check=False)
    if run.returncode != 0:
        raise RuntimeError(f"umoci {args[0]} failed: {run.stderr.strip()}")


def have_tools() -> bool:
    """Whether this machine can build images (and an engine run them)."""
    return all(shutil.which(tool) for tool in ("umoci", "skopeo", "busybox"))
