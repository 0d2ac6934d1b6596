"""A throwaway PostgreSQL server on loopback, from Debian's packages: for tests, benchmarks and the local stack.

``initdb`` refuses to run as root, so under root the cluster belongs to the ``postgres`` system user
(created by the Debian package) and every server command runs through ``runuser``. The cluster
lives in a fresh directory under the system temp dir (a root-only pytest temp dir is not reachable
by that user) and is removed on ``stop``.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

USER = "tessera"


def _bin_dir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError("PostgreSQL server binaries not found under /usr/lib/postgresql (apt-get install postgresql;"
                           " make install does it)")
    return Path(found[-1]).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalPostgres:
    def __init__(self, durable: bool = False):
        """``durable=False`` turns fsync off: for tests, where a crash of the machine loses nothing of value."""
        self.bin = _bin_dir()
        self.root = Path(tempfile.mkdtemp(prefix="tessera-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.durable = durable
        self._as_root = os.geteuid() == 0

    def _run(self, *args: str) -> None:
        command = [str(a) for a in args]
        if self._as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)

    def start(self) -> "LocalPostgres":
        if self._as_root:
            shutil.chown(self.root, "postgres", "postgres")
        self._run(self.bin / "initdb", "-D", self.data, "-U", USER, "--auth=trust", "-E", "UTF8", "--no-sync")
        # Pools of many short-lived engines (the property tests open four per example) close faster than a
        # loaded machine reaps their backends: room for the stragglers instead of "too many clients".
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=500"
        if not self.durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run(self.bin / "pg_ctl", "-D", self.data, "-o", options, "-l", self.root / "server.log", "-w",
                  "-t", "120", "start")
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new empty database; returns its URL."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        try:
            self._run(self.bin / "pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")
        except subprocess.CalledProcessError:
            pass
        for _ in range(20):
            try:
                shutil.rmtree(self.root)
                return
            except OSError:
                time.sleep(0.1)
