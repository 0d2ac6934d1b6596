"""Image embeddings: a CLIP or SigLIP model from a local path, and guarded fetching of message images.

Images and texts land in the model's shared space, so an image vector is searchable both by a query
image and by the query's words. Every fetch goes through ``indexer.images`` (scheme, address, size,
format and pixel limits); fetches run on a small thread pool with the policy's short timeouts, so
one unreachable host never holds up a batch. A failed image is left out (its caption still indexes
the turn) and reported by code.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from indexer.encoders import models
from indexer.images import ImageError, ImagePolicy, load

#: Concurrent image fetches per process: network-bound, so more than the cores.
FETCH_THREADS = 8
#: Images per model forward pass.
IMAGE_BATCH = 16


class ImageEmbedder:
    """``AutoModel`` + ``AutoProcessor`` of a CLIP-family model (``get_image_features``/``get_text_features``)."""

    def __init__(self, model_path: str | Path, device: str = "cpu", batch_size: int = IMAGE_BATCH):
        self.model_path = Path(model_path)
        if not (self.model_path / "config.json").exists():
            raise FileNotFoundError(f"TESSERA_IMAGE_MODEL: no transformers model at {self.model_path}")
        self.device = device
        self.batch_size = batch_size
        self.name = self.model_path.name
        self._model = None
        self._processor = None
        self.dim = self._config_dim()

    def _config_dim(self) -> int:
        import json

        config = json.loads((self.model_path / "config.json").read_text())
        dim = config.get("projection_dim") or config.get("text_config", {}).get("projection_size") \
            or config.get("vision_config", {}).get("hidden_size")
        if not dim:
            raise ValueError(f"{self.model_path}: config names no projection_dim")
        return int(dim)

    def warm_up(self) -> None:
        if self._model is not None:
            return
        self._processor, model = models.load(("clip", str(self.model_path), self.device), self._build)
        self._siglip = "siglip" in model.config.model_type
        self._model = model

    def _build(self):
        from transformers import AutoModel, AutoProcessor

        processor = AutoProcessor.from_pretrained(str(self.model_path), local_files_only=True)
        model = AutoModel.from_pretrained(str(self.model_path), local_files_only=True)
        if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
            raise ValueError(f"{self.model_path}: {type(model).__name__} is not a CLIP-family model")
        return processor, model.to(self.device).eval()

    @staticmethod
    def _features(output) -> "torch.Tensor":  # noqa: F821
        """transformers 5 returns a model output whose pooler holds the projected embedding."""
        return output if hasattr(output, "ndim") else output.pooler_output

    def _normalised(self, tensor) -> np.ndarray:
        v = tensor.float().cpu().numpy()
        return (v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    def encode_images(self, images: Sequence) -> np.ndarray:
        """PIL images (RGB) to L2-normalised vectors."""
        if self._model is None:
            self.warm_up()
        import torch

        out = np.zeros((len(images), self.dim), dtype=np.float32)
        for start in range(0, len(images), self.batch_size):
            batch = list(images[start:start + self.batch_size])
            inputs = self._processor(images=batch, return_tensors="pt").to(self.device)
            with torch.no_grad():
                out[start:start + len(batch)] = self._normalised(self._features(
                    self._model.get_image_features(pixel_values=inputs["pixel_values"])))
        return out

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts into the same space (text-to-image search)."""
        if self._model is None:
            self.warm_up()
        import torch

        padding = "max_length" if self._siglip else True
        # Cut at the model's own text positions: a tokenizer saved without ``model_max_length`` does not cut at all.
        positions = self._model.config.text_config.max_position_embeddings
        inputs = self._processor(text=list(texts), return_tensors="pt", padding=padding, truncation=True,
                                 max_length=positions)
        inputs = {k: v.to(self.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            return self._normalised(self._features(self._model.get_text_features(**inputs)))


@dataclass
class ImageBatch:
    """Vectors of the URIs that could be fetched and embedded, the refusal code of the others, and the words read
    off them where the indexer has a reader (``encoders.ocr``) and they show any."""

    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)

    def merged(self, other: "ImageBatch") -> "ImageBatch":
        return ImageBatch({**self.vectors, **other.vectors}, {**self.failures, **other.failures},
                          {**self.texts, **other.texts})


class ImageIndexer:
    """Fetches (guarded, concurrent) and embeds images with ``embedder``, and reads their words with ``reader``;
    either may be None (no image vectors, or no words read). Owns the fetch pool."""

    def __init__(self, embedder: ImageEmbedder | None, policy: ImagePolicy | None = None,
                 threads: int = FETCH_THREADS, reader=None):
        self.embedder = embedder
        self.policy = policy or ImagePolicy()
        self.reader = reader
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="image-fetch")

    @property
    def dim(self) -> int | None:
        """Width of the image vectors; None when images are only read (no image model)."""
        return self.embedder.dim if self.embedder is not None else None

    def warm_up(self) -> None:
        if self.embedder is not None:
            self.embedder.warm_up()

    def _load(self, uri: str):
        try:
            return load(uri, self.policy).image
        except ImageError as exc:
            return exc

    def embed_uris(self, uris: Sequence[str]) -> ImageBatch:
        batch = ImageBatch()
        unique = list(dict.fromkeys(uris))
        loaded = list(self._pool.map(self._load, unique))
        good = [(uri, image) for uri, image in zip(unique, loaded) if not isinstance(image, ImageError)]
        for uri, image in zip(unique, loaded):
            if isinstance(image, ImageError):
                batch.failures[uri] = image.code
        if good and self.embedder is not None:
            vectors = self.embedder.encode_images([image for _, image in good])
            batch.vectors.update({uri: v for (uri, _), v in zip(good, vectors)})
        if good and self.reader is not None:
            texts = ((uri, self.reader.read(image)) for uri, image in good)
            batch.texts.update({uri: text for uri, text in texts if text})
        return batch

    def embed_query_image(self, uri: str) -> np.ndarray:
        """The vector of a query's image; raises ``ImageError`` (the job is answered with its code)."""
        image = load(uri, self.policy).image
        return self.embedder.encode_images([image])[0]

    def embed_query_text(self, text: str) -> np.ndarray:
        return self.embedder.encode_texts([text])[0]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def turn_image_vector(uris: Sequence[str], vectors: dict[str, np.ndarray]) -> np.ndarray | None:
    """One vector per turn: the normalised mean of its images that could be embedded."""
    found = [vectors[u] for u in uris if u in vectors]
    if not found:
        return None
    v = np.mean(np.stack(found), axis=0).astype(np.float32)
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v
