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
