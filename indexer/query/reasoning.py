"""The fine-grained reasoning stage (after F2RVLM and Mario): a vision-language model reads each
candidate fragment, its turns numbered and its images inline, and names the turns that answer the
query.

Decoding is constrained to valid answers (the idea of Mario's trie over valid outputs): ``0`` for
"none" or strictly increasing turn numbers of the fragment joined by commas, then end of sequence.
A logits processor masks every token that would leave that grammar, so the output always parses
into turns of the fragment, whatever the weights. A candidate's relevance is the model's probability
of not answering ``0`` at the first step; candidates are batched, and the answer's turns replace the
CPU span. Loaded from a local path with ``AutoProcessor`` and ``AutoModelForImageTextToText``
(bf16 on CUDA, float32 on CPU); tests build tiny random LLaVA models of the real classes.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from indexer.encoders import models
from indexer.images import ImageError, ImagePolicy, load
from indexer.model import ImageInfo, Turn
from indexer.text import render_turn, snippet
from schemas import ReasonCandidate, ReasonRequest, Result, ResultFragment, ResultImage

#: Candidates per forward pass: best of 1-20 for a top-20 rerank of LLaVA-7B shapes on an H100 (ops.bench.reasoning).
DEFAULT_BATCH_SIZE = 10
#: Images shown to the model per candidate (span images first); the rest go by caption.
MAX_IMAGES_PER_CANDIDATE = 4
#: Turns named in one answer at most (a fine-grained answer is short).
MAX_ANSWER_TURNS = 4
_ANSWER_CHARS = frozenset("0123456789,")

INSTRUCTION = ("Which numbered turns of this conversation answer the search? Reply with their numbers separated by "
               "commas, or 0 if none does.")


class ReasoningUnavailable(RuntimeError):
    """The model cannot be loaded or its tokenizer cannot spell turn numbers."""


def answer_state(text: str, n_turns: int, max_numbers: int = MAX_ANSWER_TURNS) -> tuple[bool, bool]:
    """(is a prefix of a valid answer, is a complete valid answer) for fragment of ``n_turns`` turns.

    Valid: ``0``, or 1 to ``max_numbers`` strictly increasing integers in 1..n_turns joined by ``,``
    without spaces or leading zeros.
    """
    if text == "":
        return True, False
    if text[0] == "0":
        return text == "0", text == "0"
    parts = text.split(",")
    if len(parts) > max_numbers:
        return False, False
    previous = 0
    for part in parts[:-1]:
        if not part.isdigit() or part[0] == "0" or not previous < int(part) <= n_turns:
            return False, False
        previous = int(part)
    last = parts[-1]
    if last == "":
        # After a comma another, larger turn number must still exist.
        return previous < n_turns, False
    if not last.isdigit() or last[0] == "0":
        return False, False
    reachable = any(str(m).startswith(last) for m in range(previous + 1, n_turns + 1))
    return reachable, previous < int(last) <= n_turns


def parse_answer(text: str) -> list[int]:
    """The turn numbers of a (complete or cut-off) answer; ``0`` is no turn."""
    return [int(p) for p in text.split(",") if p.isdigit() and int(p) > 0]


class AnswerVocabulary:
    """The tokens that can spell an answer, and per (text so far, turns) the ones that may come next."""

    def __init__(self, tokenizer):
        self.eos_ids = self._eos_ids(tokenizer)
        tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        self.pieces: dict[int, str] = {}
        for token_id, token in enumerate(tokens):
            if token is None or token_id in self.eos_ids:
                continue
            if not any(ch in _ANSWER_CHARS for ch in token):
                continue
            piece = tokenizer.decode([token_id])
            stripped = piece.lstrip()
            if stripped and set(stripped) <= _ANSWER_CHARS and piece == piece.rstrip():
                self.pieces[token_id] = piece
        spelled = {p.strip() for p in self.pieces.values()}
        missing = [ch for ch in "0123456789," if ch not in spelled]
        if missing or not self.eos_ids:
            raise ReasoningUnavailable(f"tokenizer cannot spell answers (missing tokens {missing or 'eos'})")
        self.none_ids = [i for i, p in self.pieces.items() if p.strip().startswith("0")]
        self._cache: dict[tuple[str, int], list[int]] = {}

    @staticmethod
    def _eos_ids(tokenizer) -> set[int]:
        ids = tokenizer.eos_token_id
        if ids is None:
            return set()
        return set(ids) if isinstance(ids, (list, tuple)) else {int(ids)}

    def text_of(self, token_ids: Sequence[int]) -> str:
        return "".join(self.pieces.get(int(t), "") for t in token_ids).strip()

    def allowed(self, text: str, n_turns: int) -> list[int]:
        key = (text, n_turns)
        found = self._cache.get(key)
        if found is None:
            found = []
            for token_id, piece in self.pieces.items():
                if text and piece != piece.lstrip():
                    continue
                if answer_state(text + piece.strip(), n_turns)[0]:
                    found.append(token_id)
            if answer_state(text, n_turns)[1]:
                found.extend(sorted(self.eos_ids))
            self._cache[key] = found
        return found


class TurnNumberConstraint:
    """``LogitsProcessor``: every row of the batch may only continue its own fragment's valid answers."""

    def __init__(self, vocabulary: AnswerVocabulary, n_turns: Sequence[int], prompt_length: int, pad_id: int | None):
        self.vocabulary = vocabulary
        self.n_turns = list(n_turns)
        self.prompt_length = prompt_length
        self.pad_id = pad_id

    def __call__(self, input_ids, scores):
        import torch

        # One device-to-host copy of the answers so far and one host-to-device copy of the mask per
        # step: per-row indexing on the GPU cost a sync and a launch per candidate.
        generated = input_ids[:, self.prompt_length:].tolist()
        allow = np.zeros(tuple(scores.shape), dtype=bool)
        eos = sorted(self.vocabulary.eos_ids)
        for row, answer in enumerate(generated):
            if any(t in self.vocabulary.eos_ids for t in answer):
                # Finished rows only pad; keep one finite entry so the softmax stays defined.
                allow[row, eos + ([self.pad_id] if self.pad_id is not None else [])] = True
                continue
            allow[row, self.vocabulary.allowed(self.vocabulary.text_of(answer), self.n_turns[row])] = True
        mask = torch.from_numpy(allow).to(scores.device, non_blocking=True)
        return scores.masked_fill(~mask, float("-inf"))


@dataclass(frozen=True)
class Judgement:
    """The model's answer for one candidate."""

    turn_numbers: tuple[int, ...]
    relevance: float
    answer: str


def _turn(t) -> Turn:
    return Turn(message_id=t.message_id, sender_id=t.speaker, sent_at=t.sent_at, text=t.text, sender_name=t.speaker,
                images=tuple(ImageInfo(i.uri, i.caption) for i in t.images))


class VlmReasoner:
    """The model, its processor and the answer vocabulary, loaded once per process."""

    def __init__(self, model_path: str | Path, device: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                 policy: ImagePolicy | None = None, max_images: int = MAX_IMAGES_PER_CANDIDATE):
        self.model_path = Path(model_path)
        if not (self.model_path / "config.json").exists():
            raise ReasoningUnavailable(f"TESSERA_VLM_MODEL: no transformers model at {self.model_path}")
        self.device = device
        self.batch_size = batch_size
        self.policy = policy or ImagePolicy()
        self.max_images = max_images
        self._model = None
        self._processor = None
        self._vocabulary: AnswerVocabulary | None = None
        self._prep = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlm-prep")
        #: Sizes of the batches run, for the metrics wrapper.
        self.last_batches: list[int] = []

    def warm_up(self) -> None:
        if self._model is not None:
            return
        import torch

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._processor, self._vocabulary, self._model = models.load(
            ("vlm", str(self.model_path), device), lambda: self._build(device))
        self.device = device

    def _build(self, device: str):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        processor = AutoProcessor.from_pretrained(str(self.model_path), local_files_only=True)
        processor.tokenizer.padding_side = "left"
        model = AutoModelForImageTextToText.from_pretrained(str(self.model_path), local_files_only=True, dtype=dtype)
        return processor, AnswerVocabulary(processor.tokenizer), model.to(device).eval()

    @property
    def image_token(self) -> str:
        return getattr(self._processor, "image_token", None) or "<image>"

    def memory_bytes(self) -> int:
        import torch

        return int(torch.cuda.memory_allocated()) if str(self.device).startswith("cuda") else 0

    def _images(self, candidate: ReasonCandidate) -> dict[str, object]:
        """Decoded images of the candidate (span turns first), through the fetch guard."""
        span = set(candidate.span_message_ids)
        ordered = sorted(candidate.turns, key=lambda t: t.message_id not in span)
        uris = [i.uri for t in ordered for i in t.images][:self.max_images]
        loaded = {}
        for uri in uris:
            try:
                loaded[uri] = load(uri, self.policy).image
            except ImageError:
                continue
        return loaded

    def prompt(self, query: str, candidate: ReasonCandidate, images: dict[str, object]) -> tuple[str, list]:
        """The prompt text and its images, in the order their placeholders appear."""
        lines = [f"Search: {query}", f"Conversation of {candidate.start_at:%d %B %Y}:"]
        shown = []
        for number, t in enumerate(candidate.turns, start=1):
            line = f"[{number}] {t.speaker}: {t.text}".rstrip()
            for image in t.images:
                if image.uri in images:
                    line += f" {self.image_token}"
                    shown.append(images[image.uri])
                if image.caption:
                    line += f" (image: {image.caption})"
            lines.append(line)
        lines.append(INSTRUCTION)
        content = "\n".join(lines)
        template = getattr(self._processor, "chat_template", None)
        if template:
            parts = []
            for piece_index, piece in enumerate(content.split(self.image_token)):
                if piece_index:
                    parts.append({"type": "image"})
                if piece:
                    parts.append({"type": "text", "text": piece})
            text = self._processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True,
                                                       tokenize=False)
        else:
            text = f"USER: {content}\nASSISTANT:"
        return text, shown

    def judge(self, query: str, candidates: Sequence[ReasonCandidate]) -> list[Judgement]:
        """One judgement per candidate, in order; batches of ``batch_size``."""
        if self._model is None:
            self.warm_up()
        out: list[Judgement] = []
        batches = [list(candidates[i:i + self.batch_size]) for i in range(0, len(candidates), self.batch_size)]
        self.last_batches = [len(b) for b in batches]
        # The CPU prepares batch i+1 (image fetch, decode, preprocessing) while the GPU runs batch i.
        pending = self._prep.submit(self.inputs, query, batches[0]) if batches else None
        for i, batch in enumerate(batches):
            prepared = pending.result()
            pending = self._prep.submit(self.inputs, query, batches[i + 1]) if i + 1 < len(batches) else None
            out.extend(self._judge_batch(query, batch, prepared))
        return out

    def inputs(self, query: str, batch: Sequence[ReasonCandidate]):
        """CPU side of a batch: fetch and decode images, build prompts, tokenise and preprocess."""
        prompts, images = [], []
        for candidate in batch:
            text, shown = self.prompt(query, candidate, self._images(candidate))
            prompts.append(text)
            images.extend(shown)
        return self._processor(text=prompts, images=images or None, return_tensors="pt", padding=True)

    def _judge_batch(self, query: str, batch: Sequence[ReasonCandidate], prepared=None) -> list[Judgement]:
        import torch
        from transformers import LogitsProcessorList

        inputs = (prepared if prepared is not None else self.inputs(query, batch)).to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self._model.dtype)
        prompt_length = inputs["input_ids"].shape[1]
        tokenizer = self._processor.tokenizer
        constraint = TurnNumberConstraint(self._vocabulary, [len(c.turns) for c in batch], prompt_length,
                                          tokenizer.pad_token_id)
        longest = max(len(str(len(c.turns))) for c in batch)
        with torch.no_grad():
            generated = self._model.generate(
                **inputs, logits_processor=LogitsProcessorList([constraint]), do_sample=False, num_beams=1,
                max_new_tokens=MAX_ANSWER_TURNS * (longest + 1) + 1, output_scores=True, return_dict_in_generate=True,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self._vocabulary.eos_ids),
            )
        first = torch.softmax(generated.scores[0].float(), dim=-1)
        none_mass = first[:, self._vocabulary.none_ids].sum(dim=-1).cpu().numpy()
        judgements = []
        for row, candidate in enumerate(batch):
            answer = self._vocabulary.text_of(generated.sequences[row, prompt_length:].tolist())
            numbers = tuple(n for n in parse_answer(answer) if n <= len(candidate.turns))
            judgements.append(Judgement(numbers, float(np.clip(1.0 - none_mass[row], 0.0, 1.0)), answer))
        return judgements

    def answer(self, request: ReasonRequest) -> Result:
        """The result of a job whose candidates the model has judged; ordered by relevance."""
        start = time.perf_counter()
        judgements = self.judge(request.rewritten_query or request.job.query, request.candidates)
        ranked = sorted(zip(request.candidates, judgements), key=lambda cj: (-cj[1].relevance, -cj[0].score))
        fragments = [result_fragment(c, [c.turns[n - 1] for n in j.turn_numbers], j.relevance)
                     for c, j in ranked[:request.job.top_k]]
        return _result(request, fragments, "vlm", start)


def result_fragment(candidate: ReasonCandidate, chosen: Sequence, score: float) -> ResultFragment:
    """A candidate as a result fragment; without chosen turns, the CPU span stands."""
    if not chosen:
        span = set(candidate.span_message_ids)
        chosen = [t for t in candidate.turns if t.message_id in span]
    return ResultFragment(
        fragment_id=candidate.fragment_id, conversation_id=candidate.conversation_id,
        message_ids=[t.message_id for t in chosen], context_message_ids=[t.message_id for t in candidate.turns],
        start_at=candidate.start_at, end_at=candidate.end_at, score=round(score, 6),
        snippet=snippet(" ".join(render_turn(_turn(t)) for t in chosen)),
        images=[ResultImage.of(t.message_id, n, i.uri, i.caption) for t in chosen for n, i in enumerate(t.images)])


def _result(request: ReasonRequest, fragments: list[ResultFragment], by: str, start: float) -> Result:
    timings = dict(request.timings_ms)
    timings["reasoning"] = (time.perf_counter() - start) * 1000
    timings["total"] = sum(v for k, v in timings.items() if k != "total")
    return Result(job_id=request.job.job_id, status="ok", rewritten_query=request.rewritten_query, fragments=fragments,
                  reasoned_by=by, timings_ms={k: round(v, 3) for k, v in timings.items()})


def span_answer(request: ReasonRequest) -> Result:
    """The CPU span selector's answer to a request, for when the model cannot run (``reasoning: auto``)."""
    start = time.perf_counter()
    fragments = [result_fragment(c, [], c.score) for c in request.candidates[:request.job.top_k]]
    return _result(request, fragments, "cpu", start)
