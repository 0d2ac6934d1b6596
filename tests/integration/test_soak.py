"""The load and soak command, small: every event indexed, every query answered, a report written."""

from ops import soak


def test_a_short_soak_indexes_everything_and_answers_every_query(tmp_path, monkeypatch):
    monkeypatch.setenv("TESSERA_VECTOR_STORE", "sqlite")
    report = soak.run(events=400, query_seconds=5, query_rate=4, out=tmp_path / "soak", timeout_s=400)
    assert report["indexed"] == 400 and report["indexed_all_s"]
    assert report["dead_letters"] == 0
    assert report["queries_sent"] >= 20
    assert report["queries_answered"] == report["queries_sent"] and report["query_errors"] == 0
    assert {"consumer", "worker-0", "worker-1"} <= set(report["samples"][-1]["rss_mb"])
    assert (tmp_path / "soak" / "soak.png").stat().st_size > 0
    assert "sustained ingest" in (tmp_path / "soak" / "report.md").read_text()
