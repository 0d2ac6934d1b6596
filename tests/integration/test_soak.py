"""The load and soak command, small: every event indexed, every query answered, a report written,
with the faults of ``tessera soak`` (hostile images, records that are not events, a Redis outage, a
killed ingest worker) injected during the load."""

import os

from ops.bench import soak
from tests.integration.conftest import TEST_VISIBILITY_TIMEOUT


def test_a_short_soak_with_faults_indexes_everything_and_answers_every_query(tmp_path, monkeypatch):
    monkeypatch.setenv("TESSERA_VECTOR_STORE", "sqlite")
    monkeypatch.setenv("TESSERA_VISIBILITY_TIMEOUT", TEST_VISIBILITY_TIMEOUT)
    report = soak.run(events=400, query_seconds=5, query_rate=4, out=tmp_path / "soak", timeout_s=600, faults=True)
    assert [f["fault"] for f in report["faults"]] == ["redis", "worker"]
    assert report["indexed"] == 400 and report["indexed_all_s"]
    assert report["dead_letters"] == report["dead_letters_expected"] == len(soak.NOT_EVENTS)
    assert report["parked"] == []
    assert report["queries_sent"] >= 20
    assert report["queries_answered"] == report["queries_sent"] and report["query_errors"] == 0
    assert {"consumer", "worker-0", "worker-1"} <= set(report["samples"][-1]["rss_mb"])
    assert (tmp_path / "soak" / "soak.png").stat().st_size > 0
    text = (tmp_path / "soak" / "report.md").read_text()
    assert "sustained ingest" in text and "Faults injected" in text
    assert "TESSERA_IMAGE_MODEL" not in os.environ, "the soak's settings stay with its stack"
