"""`tessera bench` builds a scale corpus only where its projected build fits in this machine's memory."""

import json

from ops.bench.report import MEMORY_SHARE, corpus_dir, markdown, projected_build_peak_mb, too_big


def _built(root, fragments, peak_mb, store="edge", encoder="onnx-int8"):
    data = corpus_dir(root, store, fragments, encoder)
    data.mkdir(parents=True)
    (data / "corpus.json").write_text(json.dumps({"fragments": fragments, "build_peak_rss_mb": peak_mb}))


def test_the_build_peak_is_projected_from_the_largest_smaller_corpus_of_the_same_store(tmp_path):
    assert projected_build_peak_mb(tmp_path, "edge", 1_000_000, "onnx-int8") is None
    _built(tmp_path, 10_000, 1_300)
    _built(tmp_path, 100_000, 7_600)
    _built(tmp_path, 100_000, 900, store="sqlite")
    assert projected_build_peak_mb(tmp_path, "edge", 1_000_000, "onnx-int8") == (76_000, 100_000)
    assert projected_build_peak_mb(tmp_path, "edge", 50_000, "onnx-int8") == (6_500, 10_000)


def test_a_corpus_too_big_for_the_machine_is_not_run_and_the_report_says_why(tmp_path):
    _built(tmp_path, 100_000, 7_600)
    total = 24_000
    reason = too_big(tmp_path, "edge", 1_000_000, "onnx-int8", total)
    assert reason and "76,000 MiB" in reason and "100,000-fragment" in reason
    assert too_big(tmp_path, "edge", 200_000, "onnx-int8", total) is None, "15,200 MiB fits"
    assert too_big(tmp_path, "edge", 100_000, "onnx-int8", 1_000) is None, "built already: measured, not rebuilt"
    assert 76_000 > MEMORY_SHARE * total
    report = {"machine": "x", "command": "tessera bench",
              "scale_not_run": [{"store": "edge", "fragments": 1_000_000, "reason": reason}]}
    assert f"Not run: edge at 1,000,000 fragments: {reason}." in markdown(report, [])
