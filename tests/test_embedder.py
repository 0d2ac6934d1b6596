"""The ONNX encoders run the package's MiniLM weights and give the vectors the torch encoder gives."""

import numpy as np
import pytest

from indexer.encoders.text import OnnxEmbedder, open_embedder

TEXTS = [
    "Caroline: I went to the LGBTQ support group yesterday and it was so powerful.",
    "Melanie: That's great! What did you take away from it?",
    "ok",
    "Jon: [image: a red bicycle leaning on a fence] look what I found at the market " * 3,
]


@pytest.mark.parametrize("quantize, floor, mean", [(False, 0.9999, 0.9999), (True, 0.95, 0.98)])
def test_onnx_vectors_match_the_torch_encoder(embedder, tmp_path, quantize, floor, mean):
    onnx = OnnxEmbedder(quantize=quantize, cache_dir=tmp_path, batch_size=2)
    got = onnx.encode(TEXTS)
    want = embedder.encode(TEXTS)
    assert got.shape == want.shape == (len(TEXTS), 384)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    cosines = np.sum(got * want, axis=1)
    assert cosines.min() >= floor and cosines.mean() >= mean
    # The export is made once and reused by the next process.
    assert len(list(tmp_path.glob("*.onnx"))) == 1
    assert OnnxEmbedder(quantize=quantize, cache_dir=tmp_path).encode(TEXTS[:1]).shape == (1, 384)
    assert len(list(tmp_path.glob("*.onnx"))) == 1


def test_an_unknown_encoder_is_named():
    with pytest.raises(ValueError, match="TESSERA_ENCODER: unknown encoder 'tensorrt'"):
        open_embedder("tensorrt")


@pytest.mark.parametrize("encoder", ["torch", "onnx-int8"])
def test_an_encoder_of_another_size_indexes_and_answers(tmp_path, monkeypatch, encoder):
    """TESSERA_EMBED_MODEL may name a model whose vectors are not 384 wide: the stores take its size."""
    from ops.bench import random_models
    from ops.runtime.assemble import open_engine
    from ops.runtime.config import Config
    from tests.conftest import dialogue, query

    model = random_models.sentence_encoder(tmp_path / "model", dim=48)
    monkeypatch.setenv("TESSERA_EMBED_MODEL", str(model))
    monkeypatch.setenv("TESSERA_ENCODER", encoder)
    monkeypatch.setenv("TESSERA_MODEL_CACHE", str(tmp_path / "cache"))
    engine = open_engine(Config.from_env(tmp_path / "data"))
    try:
        report = engine.ingest(dialogue(participants=["u1", "u2"]))
        assert report.index_failures == 0 and report.fragments_written > 0
        result = engine.query(query("support group"))
        assert result.status in ("ok", "clarify") and result.fragments
    finally:
        engine.close()
