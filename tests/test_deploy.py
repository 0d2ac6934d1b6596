"""The deployment files parse and name exactly the settings the code reads."""

import re
from pathlib import Path

import yaml

from ops.runtime.config import ENVIRONMENT

DEPLOY = Path(__file__).resolve().parent.parent / "ops" / "deploy"
SETTING = re.compile(r"\b((?:TESSERA|PROMETHEUS)_[A-Z_]+)\b")
#: What every deployment must set: where the services are.
CORE = {"TESSERA_KAFKA_BOOTSTRAP", "TESSERA_REDIS_URL", "TESSERA_STATE_URL", "TESSERA_QDRANT_URL",
        "TESSERA_ES_URL", "TESSERA_METRICS_HOST", "TESSERA_METRICS_PORT"}


def test_files_parse():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert {"kafka", "redis", "qdrant", "elasticsearch", "prometheus", "grafana", "consumer", "worker-cpu",
            "worker-gpu"} <= set(compose["services"])
    assert compose["services"]["worker-gpu"]["command"][:3] == ["worker", "--queues", "reason"]
    assert "postgres" in compose["services"]
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "tessera.yaml").read_text()))
    kinds = [doc["kind"] for doc in docs]
    assert kinds.count("Deployment") == 3 and "ConfigMap" in kinds and "Secret" in kinds
    for doc in docs:
        if doc["kind"] == "Deployment":
            volumes = doc["spec"]["template"]["spec"].get("volumes", [])
            assert all(v["name"] != "data" for v in volumes), "no pod keeps the state on its own disk"
    for name in ("consumer", "worker-cpu"):
        assert not compose["services"][name].get("volumes"), f"{name} keeps nothing on its own disk"
    yaml.safe_load((DEPLOY / "prometheus.yml").read_text())


def test_deployments_name_only_settings_the_code_reads():
    for path in [DEPLOY / "compose.yaml", DEPLOY / "k8s" / "tessera.yaml"]:
        named = set(SETTING.findall(path.read_text()))
        assert named <= set(ENVIRONMENT), f"{path.name}: {sorted(named - set(ENVIRONMENT))} unknown to the code"
        assert CORE <= named, f"{path.name} misses {sorted(CORE - named)}"


def test_every_documented_setting_is_read_by_the_code():
    """The runtime config is the one reader: every documented name appears in it past the documentation."""
    sources = (DEPLOY.parent / "runtime" / "config.py").read_text().split("ENVIRONMENT = {")[1].split("}\n", 1)[1]
    for name in ENVIRONMENT:
        assert name in sources, f"{name} is documented but nothing reads it"
