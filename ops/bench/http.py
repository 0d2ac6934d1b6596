"""What the HTTP layer costs: ``POST /v1/search`` next to ``Tessera.query`` on the same synthetic corpus.

Three runs on one corpus, each query sampled as in ``tessera bench``: the engine called in a process
of its own (sequential), then ``tessera serve`` in a child process asked by one client, then by
``--clients`` concurrent clients on keep-alive connections for ``--seconds`` (latency under load and
requests per second on this machine's cores). What HTTP adds is measured per request, as the round
trip minus the engine's own ``timings_ms.total`` of that request: comparing the p50s of two separate
runs mixes in run-to-run noise of several milliseconds on a shared 2-core machine.
The clients share the machine with the server, as a load balancer's health checks would not.

    python -m ops.bench.http --fragments 100000 --store edge --clients 8 --out results/bench
"""

from __future__ import annotations

import argparse
import http.client
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from ops.bench.report import _pcts, corpus_dir
from ops.runtime.config import child_environment


def _jobs(fragments: int, count: int, encoder: str, root: Path) -> list[tuple[str, str, str]]:
    from indexer.encoders.text import open_embedder
    from ops.bench.synthetic import Layout, load_pool, sample_queries

    pool = load_pool(open_embedder(encoder), None, cache=root / "cache")
    return sample_queries(pool, Layout(fragments), count)


def in_process(data: Path, store: str, encoder: str, asks: list[tuple[str, str, str]]) -> dict:
    from ops.runtime.assemble import open_engine, warm_up
    from ops.runtime.config import Config
    from schemas import QUERY_SCHEMA, QueryJob

    engine = open_engine(Config(data_dir=data, vector_store=store, encoder=encoder))
    warm_up(engine)
    jobs = [QueryJob.model_validate({"schema": QUERY_SCHEMA, "job_id": f"p{i}", "tenant_id": tenant, "user_id": user,
                                     "query": text, "top_k": 5, "reasoning": "fast"})
            for i, (tenant, user, text) in enumerate(asks)]
    for job in jobs[:20]:
        engine.query(job)
    latency = []
    for job in jobs[20:]:
        t = time.perf_counter()
        engine.query(job)
        latency.append((time.perf_counter() - t) * 1000)
    engine.close()
    return _pcts(latency)


class Client:
    """One keep-alive connection; each tenant's requests carry that tenant's key."""

    def __init__(self, port: int, keys: dict[str, str]):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        self.keys = keys

    def search(self, tenant: str, user: str, text: str) -> int:
        body = json.dumps({"query": text, "top_k": 5, "reasoning": "fast"})
        self.connection.request("POST", "/v1/search", body, {"Authorization": f"Bearer {self.keys[tenant]}",
                                                              "X-Tessera-User": user, "Content-Type": "application/json"})
        response = self.connection.getresponse()
        payload = response.read()
        #: The engine's own time for this request (its ``timings_ms.total``): the rest is the HTTP layer.
        self.engine_ms = json.loads(payload)["timings_ms"].get("total", 0.0) if response.status == 200 else 0.0
        return response.status


def over_http(data: Path, store: str, encoder: str, asks: list[tuple[str, str, str]], clients: int,
              seconds: float) -> dict:
    from ops.serve.keys import KeyStore
    from ops.stack.local import free_port, wait_port

    keys = KeyStore(None, data)
    tenant_keys = {tenant: keys.create(tenant, "bench")[1] for tenant in {a[0] for a in asks}}
    keys.close()
    port = free_port()
    env = child_environment({"TESSERA_VECTOR_STORE": store, "TESSERA_ENCODER": encoder,
                             "TESSERA_API_RATE": "100000", "TESSERA_API_BURST": "100000"})
    server = subprocess.Popen([sys.executable, "-m", "ops.cli.main", "--data-dir", str(data), "serve", "--port",
                               str(port)], env=env, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, timeout_s=300)
        probe = Client(port, tenant_keys)
        deadline = time.monotonic() + 600
        while probe.search(*asks[0]) != 200 or _ready(port) != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("tessera serve did not get ready")
            time.sleep(0.5)
        for ask in asks[:20]:
            probe.search(*ask)
        single, layer = [], []
        for ask in asks[20:]:
            t = time.perf_counter()
            assert probe.search(*ask) == 200
            single.append((time.perf_counter() - t) * 1000)
            layer.append(single[-1] - probe.engine_ms)
        loaded: list[float] = []
        errors = []
        stop = time.monotonic() + seconds

        def run(offset: int) -> None:
            client = Client(port, tenant_keys)
            i = offset
            while time.monotonic() < stop:
                ask = asks[i % len(asks)]
                t = time.perf_counter()
                status = client.search(*ask)
                loaded.append((time.perf_counter() - t) * 1000)
                if status != 200:
                    errors.append(status)
                i += clients

        threads = [threading.Thread(target=run, args=(n,)) for n in range(clients)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
        return {"one_client_ms": _pcts(single), "http_layer_ms": _pcts(layer), "loaded_ms": _pcts(loaded), "clients": clients,
                "requests": len(loaded), "errors": len(errors), "requests_per_s": len(loaded) / elapsed}
    finally:
        server.terminate()
        server.wait(60)


def _ready(port: int) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("GET", "/readyz")
    return connection.getresponse().status


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fragments", type=int, default=100_000)
    parser.add_argument("--store", default="edge")
    parser.add_argument("--encoder", default="onnx-int8")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--root", default="results/bench-scale", help="where corpora are built and kept")
    parser.add_argument("--out", default="results/bench")
    args = parser.parse_args(argv)
    root = Path(args.root)
    data = corpus_dir(root, args.store, args.fragments, args.encoder)
    if not (data / "corpus.json").exists():
        subprocess.run([sys.executable, "-m", "ops.bench.report", "build", str(root), "--store", args.store,
                        "--fragments", str(args.fragments), "--encoder", args.encoder], check=True)
    asks = _jobs(args.fragments, args.queries + 20, args.encoder, root)
    report = {"fragments": args.fragments, "store": args.store, "encoder": args.encoder,
              "in_process_ms": in_process(data, args.store, args.encoder, asks)}
    report |= over_http(data, args.store, args.encoder, asks, args.clients, args.seconds)
    report["http_adds_p50_ms"] = report["one_client_ms"]["p50"] - report["in_process_ms"]["p50"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "http.json").write_text(json.dumps(report, indent=2))
    (out / "http.md").write_text(markdown(report))
    print(markdown(report))
    return report


def markdown(r: dict) -> str:
    rows = [("in process (`Tessera.query`), sequential", r["in_process_ms"]),
            ("`POST /v1/search`, 1 client", r["one_client_ms"]),
            (f"`POST /v1/search`, {r['clients']} concurrent clients", r["loaded_ms"])]
    lines = [f"## Search over HTTP ({r['fragments']:,} fragments, {r['store']} store, {r['encoder']} encoder)", "",
             "| path | p50 ms | p95 ms | p99 ms |", "|---|---|---|---|"]
    lines += [f"| {name} | {p['p50']:.1f} | {p['p95']:.1f} | {p['p99']:.1f} |" for name, p in rows]
    layer = r["http_layer_ms"]
    lines += ["", f"The HTTP layer (round trip minus the engine's own time, per request, 1 client) adds "
              f"{layer['p50']:.1f} ms at p50, {layer['p99']:.1f} ms at p99; the two separate runs differ by "
              f"{r['http_adds_p50_ms']:.1f} ms at p50 (run-to-run noise included). {r['requests_per_s']:.1f} requests/s "
              f"with {r['clients']} clients ({r['requests']} requests, {r['errors']} errors): one engine per process "
              "answers one query at a time."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
