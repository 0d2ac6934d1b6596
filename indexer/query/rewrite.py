"""Conversational query rewriting (ReCQR): history plus the last utterance become one retrieval query.

A refining turn rarely repeats the subject of the turn it refines ("the photo of the glacier" ...
"no, the one from May"), so the last turn alone is a poor query. The deterministic default keeps the
user's recent turns, drops what carries no content (chat fillers, "no, not that one") and removes
what the user ruled out ("not the one with Bob"). Assistant turns are the system's own words and are
skipped, except that an answer to a clarifying question is read as an addition to the question it
answers. An optional sequence-to-sequence model from a local path (``TESSERA_REWRITE_MODEL``) can
replace the rule; it falls back to the rule when it produces nothing usable.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol, Sequence

from indexer.encoders import models
from schemas import HistoryTurn

#: How many earlier user turns are carried into the query.
MAX_CARRIED_TURNS = 2
#: Longest rewritten query a model may produce, in characters (the schema's query limit).
MAX_REWRITE_CHARS = 2_000

_FILLERS = re.compile(
    r"^\s*(?:(?:no|nope|nah|not that one|not this one|not quite|wrong one|actually|hmm+|well|ok(?:ay)?|yes|yeah|i mean)"
    r"\s*[,.!:;-]*\s*)*"
    r"(?:(?:(?:can|could|would) you )?(?:please )?(?:find|show|look up|search for|look for)(?: me)?\s+"
    r"|(?:i(?:'m| am) (?:looking|searching) for|i want|i need|do you remember)\s+)?"
    r"(?:(?:the|that|a) (?:conversation|chat|thread|discussion|messages?) (?:where|when|in which|about|with)\s+)?",
    re.IGNORECASE,
)
#: "not the one with Bob", "not about work": what follows is ruled out, not searched for.
_EXCLUSION = re.compile(r"\b(?:not|but not|except)\s+(?:the one\s+|that one\s+)?(?:with|about|from|by|in)\s+[^,.;!?]+",
                        re.IGNORECASE)


class Rewriter(Protocol):
    name: str

    def rewrite(self, query: str, history: Sequence[HistoryTurn] = ()) -> str: ...


def _clean(text: str) -> str:
    text = _EXCLUSION.sub(" ", text)
    text = _FILLERS.sub(" ", text, count=1)
    return " ".join(text.split()).strip(" ,.;:!-")


def rule_rewrite(query: str, history: Sequence[HistoryTurn] = ()) -> str:
    """The deterministic rewrite: recent user turns, cleaned, oldest first, repeated words once."""
    earlier = [_clean(t.text) for t in history if t.role == "user"]
    parts = [p for p in earlier[-MAX_CARRIED_TURNS:] if p] + [_clean(query)]
    seen: set[str] = set()
    kept: list[str] = []
    for part in reversed(parts):
        # The newest turn is kept whole; older turns lose the words the newer ones already say.
        words = part.split() if not kept else [w for w in part.split() if w.lower().strip(",.?!") not in seen]
        seen.update(w.lower().strip(",.?!") for w in part.split())
        if words:
            kept.append(" ".join(words))
    rewritten = " ".join(reversed(kept)).strip()
    return rewritten or query.strip()


class RuleRewriter:
    name = "rule"

    def rewrite(self, query: str, history: Sequence[HistoryTurn] = ()) -> str:
        return rule_rewrite(query, history)


class Seq2SeqRewriter:
    """A transformers sequence-to-sequence model (T5, BART, ...) from a local directory.

    Input: the history and the query in one line (``user: ... | assistant: ... | query: ...``);
    output: the rewritten query. Greedy decoding, so the same job always gets the same rewrite.
    """

    name = "seq2seq"

    def __init__(self, model_path: str | Path, max_new_tokens: int = 48, device: str = "cpu"):
        self.model_path = Path(model_path)
        if not (self.model_path / "config.json").exists():
            raise FileNotFoundError(f"TESSERA_REWRITE_MODEL: no transformers model at {self.model_path}")
        self.max_new_tokens = max_new_tokens
        self.device = device
        self._model = None
        self._tokenizer = None

    def warm_up(self) -> None:
        if self._model is None:
            self._tokenizer, self._model = models.load(("seq2seq", str(self.model_path), self.device), self._build)

    def _build(self):
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(self.model_path), local_files_only=True)
        model = AutoModelForSeq2SeqLM.from_pretrained(str(self.model_path), local_files_only=True)
        return tokenizer, model.to(self.device).eval()

    @staticmethod
    def prompt(query: str, history: Sequence[HistoryTurn]) -> str:
        turns = [f"{t.role}: {t.text}" for t in history[-2 * MAX_CARRIED_TURNS:]]
        return " | ".join(turns + [f"query: {query}"])

    def rewrite(self, query: str, history: Sequence[HistoryTurn] = ()) -> str:
        if not history:
            return query.strip()
        if self._model is None:
            self.warm_up()
        import torch

        inputs = self._tokenizer([self.prompt(query, history)], return_tensors="pt", truncation=True, max_length=512)
        with torch.no_grad():
            out = self._model.generate(**inputs.to(self.device), max_new_tokens=self.max_new_tokens, do_sample=False,
                                       num_beams=1)
        text = " ".join(self._tokenizer.decode(out[0], skip_special_tokens=True).split())[:MAX_REWRITE_CHARS]
        return text or rule_rewrite(query, history)


def open_rewriter(model_path: str | Path | None = None) -> Rewriter:
    """The model at ``model_path`` (``TESSERA_REWRITE_MODEL``), else the deterministic rule."""
    return Seq2SeqRewriter(model_path) if model_path else RuleRewriter()
