"""Alert rules (promtool), and that the dashboard and the alerts query only metrics that exist."""

import json
import re
import subprocess
from pathlib import Path

from prometheus_client import REGISTRY

import ops.runtime.telemetry  # noqa: F401  (registers every metric)

OPS = Path(__file__).resolve().parent.parent / "ops"
NAME = re.compile(r"\b(tessera_[a-z0-9_]+)")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",), "info": ("_info",)}


def exported_names() -> set[str]:
    names = set()
    for family in REGISTRY.collect():
        if family.name.startswith("tessera_"):
            names.update(family.name + suffix for suffix in SUFFIXES[family.type])
    return names


def test_promtool_checks_and_unit_tests_the_alert_rules():
    check = subprocess.run(["promtool", "check", "rules", str(OPS / "prometheus" / "alerts.yml")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run(["promtool", "test", "rules", "alerts_test.yml"], cwd=OPS / "prometheus",
                          capture_output=True, text=True)
    assert test.returncode == 0, test.stdout + test.stderr
    assert "SUCCESS" in test.stdout


def test_dashboard_queries_only_exported_metrics():
    dashboard = json.loads((OPS / "grafana" / "tessera-dashboard.json").read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in NAME.findall(target["expr"])}
    assert len(queried) >= 15
    assert queried <= exported_names(), sorted(queried - exported_names())


def test_alerts_query_only_exported_metrics():
    queried = set(NAME.findall((OPS / "prometheus" / "alerts.yml").read_text()))
    assert queried and queried <= exported_names(), sorted(queried - exported_names())


def test_metric_names_follow_prometheus_conventions():
    units = ("_total", "_seconds", "_bytes", "_records", "_tasks", "_texts", "_candidates", "_paused", "_info")
    for family in REGISTRY.collect():
        if family.name.startswith("tessera_"):
            full = family.name + {"counter": "_total", "info": "_info"}.get(family.type, "")
            assert full.endswith(units), full
            assert family.documentation


def test_metrics_bind_where_the_deployment_says(monkeypatch):
    """In a container the probes and Prometheus come from outside: 127.0.0.1 would reach nothing."""
    import urllib.request

    from ops.runtime.telemetry import serve
    from ops.stack.local import free_port

    monkeypatch.setenv("TESSERA_METRICS_HOST", "0.0.0.0")
    port = free_port()
    server = serve(port)
    try:
        assert server.server_address[0] == "0.0.0.0"
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10).status == 200
    finally:
        server.shutdown()
        server.server_close()
