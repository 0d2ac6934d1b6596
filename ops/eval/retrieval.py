"""``tessera eval locomo DIR``: corpus-level retrieval quality with the peer baselines of the same run.

Scoring follows shared/datasets/locomo-dev/README.md: every question searches all loaded
conversations; ranked fragments are flattened into distinct turns (each fragment's message ids in the
order given, best fragment first).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sqlite3
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from indexer.ingest.units import turn_of_event
from indexer.stores.fts5 import match_expression
from indexer.text import render_turn
from ops.eval.locomo import (
    TENANT, LocomoTurn, Question, into_messy_chat, into_one_conversation, into_screenshots, load, to_events, turn_of,
)
from schemas import QUERY_SCHEMA, QueryJob

BUDGETS = (5, 10, 30)
MRR_DEPTH = 100
#: Fragments asked for per question: enough that the flattened list reaches the deepest budget.
EVAL_TOP_K = 100
RRF_K = 60

Ranked = list[tuple[str, str]]  # (conversation_id, message_id), best first

def score(questions: Sequence[Question], rankings: Sequence[Ranked]) -> dict[str, float]:
    recall = {b: [] for b in BUDGETS}
    rr, hit = [], []
    for q, ranked in zip(questions, rankings):
        ranked = list(dict.fromkeys(ranked))
        evidence = {(q.conversation_id, e) for e in q.evidence}
        for b in BUDGETS:
            recall[b].append(len(evidence & set(ranked[:b])) / len(evidence))
        rr.append(next((1 / (i + 1) for i, t in enumerate(ranked[:MRR_DEPTH]) if t in evidence), 0.0))
        hit.append(float(bool(ranked) and ranked[0][0] == q.conversation_id))
    out = {f"recall@{b}": float(np.mean(recall[b])) for b in BUDGETS}
    out["mrr"] = float(np.mean(rr))
    out["conv_hit@1"] = float(np.mean(hit))
    return out

def _prf(predicted: set, gold: set) -> tuple[float, float, float]:
    hit = len(predicted & gold)
    p = hit / len(predicted) if predicted else 0.0
    r = hit / len(gold) if gold else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def span_scores(questions: Sequence[Question], spans: Sequence[list[list[tuple[str, str]]]],
                with_image: set[tuple[str, str]], statuses: Sequence[str] = ()) -> dict[str, float]:
    """FFRS-style fine-grained scores: precision, recall and F1 of the turns the first result (and the first
    three) point at, against the evidence; image-id F1 on questions whose evidence has images; the share of
    ``clarify`` answers. ``spans[i]`` holds question i's fragments, each a list of (conversation, message)."""
    out: dict[str, list[float]] = defaultdict(list)
    for q, fragments in zip(questions, spans):
        gold = {(q.conversation_id, e) for e in q.evidence}
        for name, depth in (("top1", 1), ("top3", 3)):
            predicted = {t for f in fragments[:depth] for t in f}
            for metric, value in zip(("precision", "recall", "f1"), _prf(predicted, gold)):
                out[f"span_{metric}@{name}"].append(value)
        gold_images = gold & with_image
        if gold_images:
            predicted = {t for f in fragments[:1] for t in f} & with_image
            out["image_f1@top1"].append(_prf(predicted, gold_images)[2])
    scores = {name: float(np.mean(values)) for name, values in out.items()}
    if statuses:
        scores["clarify_share"] = float(np.mean([s == "clarify" for s in statuses]))
    return scores


def asked_after(turns: Sequence[LocomoTurn]) -> dict:
    """When each conversation's questions are asked: a day after its last turn ("in June" is the last June)."""
    last: dict = {}
    for t in turns:
        last[t.conversation_id] = max(last.get(t.conversation_id, t.sent_at), t.sent_at)
    return {c: ts + timedelta(days=1) for c, ts in last.items()}


def indexed_texts(turns: Sequence[LocomoTurn]) -> list[str]:
    """Exactly the text Tessera indexes for each turn (speaker, words, caption)."""
    return [render_turn(turn_of_event(e)) for e in to_events(list(turns))]


class _Baselines:
    """The five peer baselines of the dataset README, over the same turns and the same encoder."""

    def __init__(self, turns: Sequence[LocomoTurn], embedder):
        self.turns = turns
        self.keys = [(t.conversation_id, t.message_id) for t in turns]
        # Same text as the system indexes (speaker, words, caption): the baselines get every fair advantage.
        texts = indexed_texts(turns)
        self.vectors = embedder.encode(texts)
        session = [(t.conversation_id, t.session) for t in turns]
        self.neighbours = [[j for j in (i - 1, i, i + 1) if 0 <= j < len(turns) and session[j] == session[i]]
                           for i in range(len(turns))]
        win_vecs = np.stack([np.average(self.vectors[n], axis=0, weights=[2.0 if j == i else 1.0 for j in n])
                             for i, n in enumerate(self.neighbours)])
        self.window_vectors = win_vecs / np.linalg.norm(win_vecs, axis=1, keepdims=True)
        self.turn_fts = self._fts(texts)
        self.window_fts = self._fts([" ".join(texts[j] for j in n) for n in self.neighbours])
        self.fixed_windows: list[list[int]] = []
        by_conv = defaultdict(list)
        for i, t in enumerate(turns):
            by_conv[t.conversation_id].append(i)
        for members in by_conv.values():
            for start in range(0, max(1, len(members) - 2), 3):
                self.fixed_windows.append(members[start:start + 5])
        fixed = embedder.encode([" ".join(texts[j] for j in w) for w in self.fixed_windows])
        self.fixed_vectors = fixed

    @staticmethod
    def _fts(docs: Sequence[str]) -> sqlite3.Connection:
        db = sqlite3.connect(":memory:")
        db.execute("CREATE VIRTUAL TABLE d USING fts5(t, tokenize='porter unicode61')")
        db.executemany("INSERT INTO d(rowid, t) VALUES (?, ?)", list(enumerate(docs)))
        return db

    @staticmethod
    def _bm25(db: sqlite3.Connection, text: str, depth: int = 200) -> list[int]:
        expression = match_expression(text)
        if expression is None:
            return []
        return [r for (r,) in db.execute("SELECT rowid FROM d WHERE d MATCH ? ORDER BY bm25(d) LIMIT ?",
                                         (expression, depth))]

    @staticmethod
    def _dense(matrix: np.ndarray, qv: np.ndarray, depth: int = 200) -> list[int]:
        return [int(i) for i in np.argsort(-(matrix @ qv))[:depth]]

    @staticmethod
    def _rrf(lists: Sequence[Sequence[int]]) -> list[int]:
        scores: dict[int, float] = defaultdict(float)
        for lst in lists:
            for rank, item in enumerate(lst):
                scores[item] += 1.0 / (RRF_K + rank + 1)
        return sorted(scores, key=lambda i: -scores[i])

    def rank_all(self, text: str, qv: np.ndarray) -> dict[str, Ranked]:
        bm = self._bm25(self.turn_fts, text)
        dn = self._dense(self.vectors, qv)
        fixed = self._dense(self.fixed_vectors, qv, 60)
        window = self._rrf([bm, dn, self._bm25(self.window_fts, text), self._dense(self.window_vectors, qv)])
        k = self.keys
        return {
            "BM25 over single turns": [k[i] for i in bm],
            "dense MiniLM over single turns": [k[i] for i in dn],
            "dense MiniLM over fixed 5-turn windows, stride 3": [k[i] for w in fixed for i in self.fixed_windows[w]],
            "reciprocal-rank fusion of the first two": [k[i] for i in self._rrf([bm, dn])],
            "sentence-window hybrid (four lists, RRF)": [k[i] for i in window],
        }

@dataclass
class Answers:
    """What the system answered each question: the flattened turns, the spans, the status, the time."""

    system: list[Ranked] = field(default_factory=list)
    spans: list[list[list[tuple[str, str]]]] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)


def ask_all(engine, questions: Sequence[Question], asked_at: Sequence, progress: bool = True) -> Answers:
    answers = Answers()
    for i, q in enumerate(tqdm(questions, desc="questions", disable=not progress, file=sys.stderr)):
        job = QueryJob.model_validate({"schema": QUERY_SCHEMA, "job_id": f"q{i}", "tenant_id": TENANT,
                                       "user_id": "evaluator", "query": q.text, "top_k": EVAL_TOP_K,
                                       "reasoning": "fast", "asked_at": asked_at[i].isoformat()})
        t = time.perf_counter()
        result = engine.query(job)
        answers.latencies_ms.append((time.perf_counter() - t) * 1000)
        answers.system.append([(f.conversation_id, m) for f in result.fragments for m in f.message_ids])
        answers.spans.append([[(f.conversation_id, m) for m in f.message_ids] for f in result.fragments])
        answers.statuses.append(result.status)
    return answers


def evaluate_locomo(directory: str | Path, out_path: str | Path | None = None, data_dir: str | Path | None = None,
                    progress: bool = True, embedder=None, one_conversation: bool = False, messy: bool = False,
                    typos: float = 0.0, screenshots: float = 0.0) -> dict:
    """``embedder`` defaults to the configured encoder (``TESSERA_ENCODER``); the bench passes each one.
    ``one_conversation``: the long-chat stress (``locomo.into_one_conversation``), each question asked
    when it was asked of its own conversation. ``messy``: the messy-chat stress (``locomo.into_messy_chat``),
    a piece of a turn found counting as its turn, for Tessera and the baselines alike; ``typos``: that share of
    its longer words misspelt (``locomo.misspell``), which implies ``messy``. ``screenshots``: the screenshot stress
    (``locomo.into_screenshots``) with that share of the single-evidence turns, read or not as ``TESSERA_OCR`` says;
    the report adds the scores of the questions on them (``screenshots``)."""
    from ops.runtime.config import Config
    from ops.runtime.assemble import configured_embedder, open_engine

    turns, questions = load(directory)
    if not turns:
        raise SystemExit(f"no LoCoMo conversations (*.json) in {directory}")
    asked = asked_after(turns)
    asked_at = [asked[q.conversation_id] for q in questions]
    if one_conversation:
        turns, questions = into_one_conversation(turns, questions)
    messy = messy or typos > 0
    if messy:
        turns = into_messy_chat(turns, typo_share=typos)
    if screenshots > 0 and messy:
        raise SystemExit("--screenshots pictures whole turns: it does not combine with --messy or --typos")
    embedder = embedder or configured_embedder(Config.from_env(data_dir))
    embedder.warm_up()
    work = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="tessera-eval-"))
    config = Config.from_env(work)
    shots: set[tuple[str, str]] = set()
    shots_dir = None
    if screenshots > 0:
        # The pictures are files the engine may fetch: their directory joins the image policy's roots.
        shots_dir = Path(tempfile.mkdtemp(prefix="tessera-screenshots-"))
        turns, shots = into_screenshots(turns, questions, screenshots, shots_dir)
        policy = config.image_policy
        config = dataclasses.replace(config, image_policy=dataclasses.replace(
            policy, file_roots=policy.file_roots + (shots_dir.resolve(),)))
    engine = open_engine(config, embedder=embedder)
    events = to_events(turns)
    t0 = time.perf_counter()
    batch = 256
    for start in tqdm(range(0, len(events), batch), desc="ingest", unit="batch", disable=not progress, file=sys.stderr):
        engine.ingest(events[start:start + batch])
    ingest_s = time.perf_counter() - t0

    baselines = _Baselines(turns, embedder)
    qvectors = embedder.encode([q.text for q in questions])
    answers = ask_all(engine, questions, asked_at, progress)

    def as_turns(ranked: Ranked) -> Ranked:
        return list(dict.fromkeys((c, turn_of(m)) for c, m in ranked)) if messy else ranked
    system = [as_turns(r) for r in answers.system]
    spans = [[as_turns(span) for span in found] for found in answers.spans]
    statuses, latencies = answers.statuses, answers.latencies_ms
    peer: dict[str, list[Ranked]] = defaultdict(list)
    for i, q in enumerate(questions):
        for name, ranked in baselines.rank_all(q.text, qvectors[i]).items():
            peer[name].append(as_turns(ranked))
    engine.close()

    rows = {"tessera (hybrid fragments + spans)": score(questions, system)}
    for name, rankings in peer.items():
        rows[name] = score(questions, rankings)
    with_image = {(t.conversation_id, turn_of(t.message_id)) for t in turns if t.caption}

    def category(c: int, scorer, *lists):
        picked = [i for i, q in enumerate(questions) if q.category == c]
        return scorer([questions[i] for i in picked], *[[values[i] for i in picked] for values in lists])
    lat = np.array(latencies)
    report = {
        "dataset": str(directory), "conversations": len({t.conversation_id for t in turns}), "turns": len(turns),
        "questions": len(questions), "rows": rows,
        "spans": span_scores(questions, spans, with_image, statuses),
        "by_category": {str(c): category(c, score, system) | category(
                            c, lambda qs, sp, st: span_scores(qs, sp, with_image, st), spans, statuses)
                        for c in sorted({q.category for q in questions})},
        "query_latency_ms": {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
                             "mean": float(lat.mean())},
        "ingest_seconds": ingest_s,
    }
    if shots:
        on_shots = [i for i, q in enumerate(questions) if len(q.evidence) == 1
                    and (q.conversation_id, next(iter(q.evidence))) in shots]
        report["screenshots"] = {"turns": len(shots), "questions": len(on_shots), "ocr": config.ocr,
                                 **score([questions[i] for i in on_shots], [system[i] for i in on_shots])}
    if shots_dir is not None:
        shutil.rmtree(shots_dir, ignore_errors=True)
    if out_path:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(out_path).write_text(json.dumps(report, indent=2))
    return report

def format_table(report: dict) -> str:
    cols = [f"recall@{b}" for b in BUDGETS] + ["mrr", "conv_hit@1"]
    width = max(len(n) for n in report["rows"]) + 2
    lines = [f"LoCoMo {report['dataset']}: {report['conversations']} conversations, {report['turns']} turns,"
             f" {report['questions']} questions",
             "system".ljust(width) + "".join(c.rjust(12) for c in cols)]
    for name, row in report["rows"].items():
        lines.append(name.ljust(width) + "".join(f"{row[c]:12.3f}" for c in cols))
    sp = report["spans"]
    lines.append(f"spans (tessera): first result P/R/F1 {sp['span_precision@top1']:.3f} / {sp['span_recall@top1']:.3f}"
                 f" / {sp['span_f1@top1']:.3f}, first three {sp['span_precision@top3']:.3f} /"
                 f" {sp['span_recall@top3']:.3f} / {sp['span_f1@top3']:.3f}, image-id F1 {sp.get('image_f1@top1', 0):.3f},"
                 f" clarify asked {sp['clarify_share']:.1%}")
    lines.append("by category (tessera; 1 multi-hop, 2 temporal, 3 open-domain, 4 single-hop): " + ", ".join(
        f"{c}: r@10 {r['recall@10']:.3f} mrr {r['mrr']:.3f} span F1 {r['span_f1@top1']:.3f}"
        f" clarify {r['clarify_share']:.0%}" for c, r in report["by_category"].items()))
    if "screenshots" in report:
        sh = report["screenshots"]
        lines.append(f"screenshots: {sh['turns']} turns sent as pictures of their text, their {sh['questions']}"
                     f" questions (OCR {'on' if sh['ocr'] else 'off'}): r@10 {sh['recall@10']:.3f} mrr {sh['mrr']:.3f}")
    lat = report["query_latency_ms"]
    lines.append(f"query latency ms: p50 {lat['p50']:.1f}, p99 {lat['p99']:.1f}, mean {lat['mean']:.1f}")
    return "\n".join(lines)

def main_eval(directory: str, out: str | None, progress: bool = True, one_conversation: bool = False,
              messy: bool = False, typos: float = 0.0, screenshots: float = 0.0) -> int:
    report = evaluate_locomo(directory, out, progress=progress, one_conversation=one_conversation, messy=messy,
                             typos=typos, screenshots=screenshots)
    print(format_table(report))
    return 0

RankFn = Callable[[str], Ranked]
