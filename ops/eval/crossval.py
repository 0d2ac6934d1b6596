"""``tessera eval locomo DIR --cross-validate``: are the tuned search settings fitted to the dev split?

Each tuned setting of ``SearchConfig`` is tried at its default and at a value on either side (one
at a time, the others at their defaults) on one ingest of the dev split. For each conversation, the
variant with the best MRR on the *other* conversations is chosen and scored on the held-out one
(leave-one-conversation-out). Defaults that generalise are chosen again, or lose nothing held out to
what is chosen; the report gives the held-out figures of the chosen variants next to the defaults'.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from indexer.query.hybrid import SearchConfig
from ops.eval.locomo import Question, load, to_events
from ops.eval.retrieval import Answers, ask_all, asked_after, score, span_scores

DEFAULT = "default"
#: Values tried on either side of each default (``SearchConfig``).
GRID: dict[str, tuple] = {
    "keyword_weight": (0.35, 0.65),
    "dense_weight": (0.15, 0.35),
    "window_share": (0.3, 0.7),
    "fragment_weight": (0.15, 0.45),
    "fragment_turns": (1, 3),
    "speaker_bonus": (0.2, 0.4),
    "span_ratio": (0.8, 0.95),
    "span_max_turns": (1, 2),
    "spread_penalty": (0.0, 0.2),
    "several_span_turns": (2, 3),
    "spread_unit": ("fragment",),
    "dense_depth": (100, 300),
    "keyword_depth": (50, 200),
    "feedback_turns": (0, 4),
    "feedback_weight": (0.1, 0.3),
    "feedback_depth": (20, 50),
    "reply_weight": (0.0, 0.1, 0.2),
    "reply_turns": (1, 2),
    "setup_weight": (0.0, 0.3, 0.7),
    "answer_weight": (0.0, 0.05, 0.2),
    "asking_penalty": (0.0, 0.1, 1.0),
}


def variants(grid: dict[str, tuple]) -> dict[str, SearchConfig]:
    out = {DEFAULT: SearchConfig()}
    for name, values in grid.items():
        for value in values:
            out[f"{name}={value}"] = dataclasses.replace(SearchConfig(), **{name: value})
    return out


def _figures(questions: Sequence[Question], answers: Answers, picked: Sequence[int], with_image: set) -> dict:
    qs = [questions[i] for i in picked]
    figures = score(qs, [answers.system[i] for i in picked])
    spans = span_scores(qs, [answers.spans[i] for i in picked], with_image, [answers.statuses[i] for i in picked])
    return {"recall@10": figures["recall@10"], "mrr": figures["mrr"], "span_f1@top1": spans["span_f1@top1"]}


def cross_validate(directory: str | Path, grid: dict[str, tuple] = GRID, data_dir: str | Path | None = None,
                   progress: bool = True, embedder=None) -> dict:
    from ops.runtime.assemble import open_engine
    from ops.runtime.config import Config

    turns, questions = load(directory)
    conversations = sorted({q.conversation_id for q in questions})
    if len(conversations) < 2:
        raise SystemExit(f"cross-validation needs questions of at least two conversations in {directory}")
    asked = asked_after(turns)
    asked_at = [asked[q.conversation_id] for q in questions]
    work = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="tessera-cv-"))
    engine = open_engine(Config.from_env(work), embedder=embedder)
    events = to_events(turns)
    for start in range(0, len(events), 256):
        engine.ingest(events[start:start + 256])
    runs: dict[str, Answers] = {}
    try:
        for name, config in tqdm(variants(grid).items(), desc="variants", disable=not progress, file=sys.stderr):
            engine.searcher.hybrid.config = config
            runs[name] = ask_all(engine, questions, asked_at, progress=False)
    finally:
        engine.close()
    with_image = {(t.conversation_id, t.message_id) for t in turns if t.caption}
    of = {c: [i for i, q in enumerate(questions) if q.conversation_id == c] for c in conversations}
    folds = []
    for held in conversations:
        train = [i for c in conversations if c != held for i in of[c]]
        # Ties go to the default: a variant must win on the other conversations to be chosen.
        chosen = max(runs, key=lambda name: (score([questions[i] for i in train], [runs[name].system[i] for i in train])["mrr"],
                                             name == DEFAULT))
        folds.append({"held_out": held, "questions": len(of[held]), "chosen": chosen,
                      "chosen_figures": _figures(questions, runs[chosen], of[held], with_image),
                      "default_figures": _figures(questions, runs[DEFAULT], of[held], with_image)})
    pooled = {}
    for side in ("chosen", "default"):
        rows = [(i, runs[f["chosen"] if side == "chosen" else DEFAULT]) for f in folds for i in of[f["held_out"]]]
        merged = Answers([a.system[i] for i, a in rows], [a.spans[i] for i, a in rows],
                         [a.statuses[i] for i, a in rows], [a.latencies_ms[i] for i, a in rows])
        pooled[side] = _figures([questions[i] for i, _ in rows], merged, range(len(rows)), with_image)
    return {"dataset": str(directory), "variants": list(runs), "folds": folds, "pooled_held_out": pooled,
            "all_questions": {name: _figures(questions, a, range(len(questions)), with_image)
                              for name, a in runs.items()}}


def format_report(report: dict) -> str:
    lines = ["Leave-one-conversation-out: the variant with the best MRR on the other conversations, scored on"
             " the held-out one (recall@10 / MRR / span F1 of the first result)",
             "held out  questions  chosen                  chosen held out          default held out"]
    for f in report["folds"]:
        c, d = f["chosen_figures"], f["default_figures"]
        lines.append(f"{f['held_out']:<9} {f['questions']:>9}  {f['chosen']:<22}  {c['recall@10']:.3f} / {c['mrr']:.3f} /"
                     f" {c['span_f1@top1']:.3f}    {d['recall@10']:.3f} / {d['mrr']:.3f} / {d['span_f1@top1']:.3f}")
    c, d = report["pooled_held_out"]["chosen"], report["pooled_held_out"]["default"]
    lines.append(f"{'pooled':<9} {'':>9}  {'':<22}  {c['recall@10']:.3f} / {c['mrr']:.3f} / {c['span_f1@top1']:.3f}"
                 f"    {d['recall@10']:.3f} / {d['mrr']:.3f} / {d['span_f1@top1']:.3f}")
    lines.append("every variant on all questions (recall@10 / MRR / span F1):")
    for name, r in report["all_questions"].items():
        lines.append(f"  {name:<22} {r['recall@10']:.3f} / {r['mrr']:.3f} / {r['span_f1@top1']:.3f}")
    return "\n".join(lines)


def main_cross_validate(directory: str, out: str | None, progress: bool = True) -> int:
    report = cross_validate(directory, progress=progress)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2))
    print(format_report(report))
    return 0
