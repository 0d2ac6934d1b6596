"""Words read off shared images: screenshots of errors, receipts, tickets, signs.

People search for what a picture said ("the screenshot with the 504 error") and a platform rarely sends a caption
for it, so the words an image shows become part of its turn's indexed text (``render_turn``). RapidOCR's PP-OCR
models ship inside its PyPI package and run on ONNX Runtime, on the CPU: no model is fetched at run time. It costs
about 1.4 s an image on two cores (``make eval-ocr``'s 640-pixel screenshots of two to six lines), so it is off
unless ``TESSERA_OCR`` is set.

The recogniser it ships reads Chinese and English and often drops the space between English words ("went toaLGBTQ
support groupyesterday"); BM25 would see one unknown word. A run of letters that is no word of the text model's
vocabulary is split into words of it that spell it exactly, the likeliest split by the words' frequency rank (the
vocabulary lists them most frequent first: Zipf's law), words of one or two letters only if common ("was so
powerful", not "wa sso powerful"); a run no such split spells (a name, "Trattoria") is left as read.
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path

import numpy as np

#: Most characters kept of an image's words: a caption's limit (``schemas.ImageRef``).
MAX_CHARS = 2_000
#: Lines the recogniser is less sure of are dropped: a photo's texture read as letters is noise for BM25.
MIN_CONFIDENCE = 0.6
#: Shortest run of letters tried for a split; shorter unknown words are names and abbreviations.
MIN_SPLIT = 6
_LETTERS = re.compile(r"[A-Za-z]+")
#: Sentence punctuation glued to the next word ("been?I").
_GLUED = re.compile(r"([?!.,;:])(?=[A-Za-z])")
#: The only words of one or two letters a split may use: elsewhere short pieces are mostly fragments ("tr at").
SHORT_WORDS = frozenset("a i am an as at be by do go he if in is it me my no of on or so to up us we".split())


@functools.lru_cache(maxsize=1)
def vocabulary(path: Path | None = None) -> dict[str, int]:
    """Whole words of the default text model's WordPiece vocabulary (no ``##`` pieces, no ``[SPECIAL]`` tokens), by
    their rank in it, most frequent first."""
    if path is None:
        from indexer.encoders.text import default_model_path

        path = default_model_path() / "vocab.txt"
    words = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    known = [w for w in words if w.isalpha() and w.islower() and (len(w) > 2 or w in SHORT_WORDS)]
    return {w: rank for rank, w in enumerate(dict.fromkeys(known), start=1)}


def split_glued(word: str, known: dict[str, int]) -> str:
    """``word`` as the likeliest known words that spell it (case kept), or as it is when it is known or none do."""
    lower = word.lower()
    if len(word) < MIN_SPLIT or lower in known:
        return word
    cost: list[float] = [0.0] + [math.inf] * len(lower)
    start_of = [0] * (len(lower) + 1)
    for end in range(1, len(lower) + 1):
        for start in range(max(0, end - 24), end):
            rank = known.get(lower[start:end])
            if rank is not None and cost[start] + math.log(rank + 1) < cost[end]:
                cost[end], start_of[end] = cost[start] + math.log(rank + 1), start
    if math.isinf(cost[-1]):
        return word
    parts, end = [], len(lower)
    while end:
        parts.append(word[start_of[end]:end])
        end = start_of[end]
    return " ".join(reversed(parts))


def spaced(text: str, known: dict[str, int]) -> str:
    """The recogniser's text with the spaces it dropped put back where the words say so."""
    text = _GLUED.sub(r"\1 ", text)
    return _LETTERS.sub(lambda m: split_glued(m.group(0), known), text)


class ImageReader:
    """Text lines of an image, in reading order, joined by spaces; empty when it shows none."""

    def __init__(self, min_confidence: float = MIN_CONFIDENCE, max_chars: int = MAX_CHARS):
        from rapidocr_onnxruntime import RapidOCR

        self._engine = RapidOCR()
        self.min_confidence = min_confidence
        self.max_chars = max_chars
        self.known = vocabulary()

    def read(self, image) -> str:
        lines, _ = self._engine(np.asarray(image.convert("RGB")))
        text = " ".join(line for _, line, confidence in lines or () if float(confidence) >= self.min_confidence)
        return " ".join(spaced(text, self.known).split())[:self.max_chars]
