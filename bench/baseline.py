"""The baseline every benchmark compares against: a bare bubblewrap run of the same script,
with the isolation a job's sandbox starts from (no network, read-only /usr), nothing more."""

from __future__ import annotations

BARE_BWRAP = [
    "bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--clearenv",
    "--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib",
    "--symlink", "usr/lib64", "/lib64", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
    "--dir", "/data/outputs", "--chdir", "/",
]  # fmt: skip
PYTHON = "/usr/bin/python3"


def percentile(values: list[float], p: float) -> float:
    """The value below which `p` percent of `values` lie (nearest rank)."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]
