"""Run a benchmark child held to a memory budget: a memory cgroup, page cache included.

RSS counts every page of a mapped file that a process has touched, and the kernel keeps such pages while
memory is free: after a sustained query run at 1M fragments nearly every page of the store files is resident,
whether or not searches need it again. What a store *needs* is the memory it runs well in, so the bench can
hold a child to a budget and report its latency there. A cgroup charges a page of the page cache to the group
of the process that first read it, so the files of the data dir are first dropped from the page cache
(``evict``): otherwise pages read by an earlier process (the build) would be mapped free of charge.

cgroup v2 (``memory.max``) and v1 (``memory.limit_in_bytes``) hierarchies are both handled; creating a group
needs the right to write under the hierarchy (root, or a delegated subtree), and ``MemoryCapUnavailable`` says
so where it is missing.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

#: Where cgroup hierarchies are mounted.
CGROUP_ROOT = Path("/sys/fs/cgroup")


class MemoryCapUnavailable(RuntimeError):
    """No writable memory cgroup hierarchy on this machine."""


def _hierarchy() -> tuple[Path, str]:
    """The directory new groups are made in, and the hierarchy's version ("2" or "1")."""
    controllers = CGROUP_ROOT / "cgroup.controllers"
    if controllers.exists() and "memory" in controllers.read_text().split():
        base, version = CGROUP_ROOT, "2"
    elif (CGROUP_ROOT / "memory" / "memory.limit_in_bytes").exists():
        base, version = CGROUP_ROOT / "memory", "1"
    else:
        raise MemoryCapUnavailable(f"no memory cgroup controller under {CGROUP_ROOT}")
    if not os.access(base, os.W_OK):
        raise MemoryCapUnavailable(f"{base} is not writable by this user: run the capped bench as root")
    return base, version


def evict(directory: Path) -> int:
    """Drop the cached pages of every file under ``directory`` from the page cache, written back first (a dirty
    page cannot be dropped); returns the files advised. Pages another process has mapped stay."""
    advised = 0
    for path in directory.rglob("*"):
        if not path.is_file() or path.is_symlink():
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            advised += 1
        finally:
            os.close(fd)
    return advised


class MemoryCap:
    """A memory cgroup of ``limit_mb`` MiB that ``run`` starts children in; removed on ``close``."""

    def __init__(self, limit_mb: int, name: str = "tessera-bench"):
        base, self.version = _hierarchy()
        self.limit_mb = limit_mb
        self.path = base / f"{name}-{os.getpid()}-{time.monotonic_ns()}"
        try:
            self.path.mkdir()
        except OSError as e:
            raise MemoryCapUnavailable(f"cannot create {self.path}: {e}") from None
        limit = str(limit_mb << 20)
        if self.version == "2":
            (self.path / "memory.max").write_text(limit)
            if (self.path / "memory.swap.max").exists():
                (self.path / "memory.swap.max").write_text("0")
        else:
            (self.path / "memory.limit_in_bytes").write_text(limit)

    def run(self, cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
        """Run ``cmd`` inside the group: the child joins it before it executes, so all it maps is charged here."""
        procs = str(self.path / "cgroup.procs")

        def join() -> None:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        return subprocess.run(cmd, preexec_fn=join, **kwargs)

    def peak_mb(self) -> float | None:
        """The group's high-water usage (its processes' own memory and the page cache charged to them)."""
        name = "memory.peak" if self.version == "2" else "memory.max_usage_in_bytes"
        try:
            return int((self.path / name).read_text()) / 2**20
        except (OSError, ValueError):
            return None

    def close(self) -> None:
        """Remove the group; its children have exited, and what it still charges moves to the parent."""
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)

    def __enter__(self) -> "MemoryCap":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
