"""``tessera eval dialogue DIR``: query rewriting, time filters and clarifying questions on LoCoMo.

Every figure is measured in one run on one index, each next to the number without the feature:

- Rewriting. Each question becomes a two-turn search by a fixed rule (``split_question``): the first
  turn is the question up to its middle content word (vague), the second is "no, the one about" plus
  the rest (refining). Recall of the second turn alone vs. the rule rewrite of both turns; the whole
  original question is the ceiling.
- Time. Temporal questions (category 2) as they are, with and without time filters; and the same
  questions with the month of their first evidence turn appended ("... in May 2023"), with and
  without filters (without, the month is only words). Relative expressions count back from one day
  after the question's conversation ends.
- Clarification. Every question, single turn: how often the system asks, and recall after one round
  with a simulated user who picks the option consistent with the evidence (``pick_option``), vs. the
  first answer. A question with no consistent option keeps the first answer ("none of these").
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from indexer.query.clarify import ASK_RATIO, CLOSE_RATIO
from indexer.text import STOPWORDS, words
from ops.eval.retrieval import BUDGETS, EVAL_TOP_K, asked_after, score
from ops.eval.locomo import TENANT, LocomoTurn, Question, load, to_events
from schemas import QUERY_SCHEMA, QueryJob, Result
from ops.runtime.assemble import warm_up

TEMPORAL = 2


def split_question(text: str) -> tuple[str, str] | None:
    """(vague first turn, refining second turn), or None when the question has under two content words."""
    tokens = text.split()
    content = [i for i, tok in enumerate(tokens) if any(w not in STOPWORDS for w in words(tok))]
    if len(content) < 2:
        return None
    cut = content[(len(content) + 1) // 2 - 1] + 1
    return " ".join(tokens[:cut]), "no, the one about " + " ".join(tokens[cut:])


def ranked(result: Result) -> list[tuple[str, str]]:
    return [(f.conversation_id, m) for f in result.fragments for m in f.message_ids]


def pick_option(options: Sequence[str], question: Question, turns: dict[tuple[str, str], LocomoTurn],
                people: dict[str, set[str]]) -> str | None:
    """The option a user who knows the answer would pick: consistent with an evidence turn."""
    evidence = [turns[(question.conversation_id, e)] for e in sorted(question.evidence)
                if (question.conversation_id, e) in turns]
    names = {n.lower() for n in people[question.conversation_id]}
    for option in options:
        said = set(words(option))
        if option.startswith("with ") and said - {"with", "and"} <= names:
            return option
        for t in evidence:
            if option == f"in {t.sent_at:%B %Y}" or option == f"on {t.sent_at.day} {t.sent_at:%B %Y}":
                return option
            if option.startswith("the photo of ") and t.caption and option == f"the photo of {t.caption}":
                return option
            if option.startswith("about ") and said - {"about"} <= set(words(t.text)):
                return option
    return None


def _job(job_id: str, text: str, asked_at, history=()) -> QueryJob:
    return QueryJob.model_validate({"schema": QUERY_SCHEMA, "job_id": job_id, "tenant_id": TENANT,
                                    "user_id": "evaluator", "query": text, "top_k": EVAL_TOP_K, "reasoning": "fast",
                                    "asked_at": asked_at.isoformat(), "history": list(history)})


def evaluate_dialogue(directory: str | Path, out_dir: str | Path | None = "results", progress: bool = True) -> dict:
    from ops.runtime.config import Config
    from ops.runtime.assemble import open_engine

    turns, questions = load(directory)
    if not turns:
        raise SystemExit(f"no LoCoMo conversations (*.json) in {directory}")
    by_key = {(t.conversation_id, t.message_id): t for t in turns}
    people: dict[str, set[str]] = {}
    for t in turns:
        people.setdefault(t.conversation_id, set()).add(t.speaker)
    asked = asked_after(turns)
    work = Path(tempfile.mkdtemp(prefix="tessera-dialogue-"))
    # The default stores: the ask threshold is chosen on the scores the deployed engine gives.
    engine = open_engine(Config(data_dir=work, clarify=False))
    events = to_events(turns)
    for start in tqdm(range(0, len(events), 256), desc="ingest", disable=not progress, file=sys.stderr):
        engine.ingest(events[start:start + 256])
    warm_up(engine)
    bar = tqdm(total=len(questions) * 5, desc="queries", disable=not progress, file=sys.stderr)

    def run(text: str, q: Question, i: int, history=(), **switches) -> Result:
        for name, value in switches.items():
            assert hasattr(engine.searcher, name), name
            setattr(engine.searcher, name, value)
        try:
            return engine.query(_job(f"q{i}", text, asked[q.conversation_id], history))
        finally:
            engine.searcher.clarify, engine.searcher.time_filters = False, True

    report: dict = {"dataset": str(directory), "questions": len(questions), "turns": len(turns),
                    "stores": [getattr(store, "backend", type(store).__name__)
                               for store in (engine.vectors, engine.keywords)]}
    started = time.perf_counter()

    # Rewriting.
    split = [(i, q, split_question(q.text)) for i, q in enumerate(questions)]
    split = [(i, q, s) for i, q, s in split if s is not None]
    full, last_only, rewritten = [], [], []
    for i, q, (first, second) in split:
        full.append(ranked(run(q.text, q, i)))
        last_only.append(ranked(run(second, q, i)))
        rewritten.append(ranked(run(second, q, i, history=[{"role": "user", "text": first}])))
        bar.update(3)
    qs = [q for _, q, _ in split]
    report["rewriting"] = {"questions": len(qs), "example": {"question": split[0][1].text,
                                                             "turns": list(split[0][2])},
                           "rows": {"whole question (ceiling)": score(qs, full),
                                    "last turn alone": score(qs, last_only),
                                    "rewritten (rule: history + last turn)": score(qs, rewritten)}}

    # Time.
    temporal = [(i, q) for i, q in enumerate(questions) if q.category == TEMPORAL]
    rows: dict[str, list] = {k: [] for k in ("as asked, no filters", "as asked, time filters",
                                             "month added, no filters", "month added, time filters")}
    fired = 0
    for i, q in temporal:
        first = min((by_key[(q.conversation_id, e)] for e in q.evidence if (q.conversation_id, e) in by_key),
                    key=lambda t: t.sent_at)
        dated = f"{q.text.rstrip('?')} in {first.sent_at:%B %Y}?"
        with_filters = run(q.text, q, i)
        fired += int(_had_time(engine, q.text, asked[q.conversation_id]))
        rows["as asked, no filters"].append(ranked(run(q.text, q, i, time_filters=False)))
        rows["as asked, time filters"].append(ranked(with_filters))
        rows["month added, no filters"].append(ranked(run(dated, q, i, time_filters=False)))
        rows["month added, time filters"].append(ranked(run(dated, q, i)))
    tq = [q for _, q in temporal]
    report["time"] = {"questions": len(tq), "with_time_expression": fired,
                      "rows": {k: score(tq, v) for k, v in rows.items()}}

    # Clarification: asked with the loosest rule (any runner-up within CLOSE_RATIO), so that every stricter
    # ask threshold can be replayed exactly from the same answers (``clarify_policy``).
    engine.searcher.ask_ratio = CLOSE_RATIO
    first_round, after, rounds = [], [], []
    for i, q in enumerate(questions):
        result = run(q.text, q, i, clarify=True)
        first_round.append(ranked(result))
        final, option = ranked(result), None
        if result.status == "clarify":
            option = pick_option(result.clarifying_question.options, q, by_key, people)
            if option is not None:
                history = [{"role": "user", "text": q.text},
                           {"role": "assistant", "text": result.clarifying_question.text}]
                final = ranked(run(option, q, i, history=history, clarify=True))
        after.append(final)
        scores = [f.score for f in result.fragments[:2]]
        rounds.append({"conversation": q.conversation_id, "asked": result.status == "clarify",
                       "question": result.clarifying_question.text if result.clarifying_question else None,
                       "answered": option is not None,
                       "runner_up": scores[1] / scores[0] if len(scores) == 2 and scores[0] > 0 else 0.0,
                       "best": scores[0] if scores else 0.0,
                       "rr_before": score([q], [first_round[-1]])["mrr"], "rr_after": score([q], [final])["mrr"]})
        bar.update(1)
    bar.close()
    policy = clarify_policy(rounds)
    deployed = [a if r["asked"] and r["runner_up"] >= ASK_RATIO else b
                for r, a, b in zip(rounds, after, first_round)]
    report["clarification"] = {
        "questions": len(questions), "asked": sum(r["asked"] for r in rounds),
        "ask_rate": float(np.mean([r["asked"] for r in rounds])),
        "answered_by_simulated_user": sum(r["answered"] for r in rounds),
        "ask_ratio": ASK_RATIO, "asked_as_deployed": sum(r["asked"] and r["runner_up"] >= ASK_RATIO for r in rounds),
        "policy": policy,
        "rows": {"without clarification": score(questions, first_round),
                 f"ask when any runner-up is within {CLOSE_RATIO} (before)": score(questions, after),
                 f"ask when the runner-up is within {ASK_RATIO} (default)": score(questions, deployed)}}
    report["seconds"] = time.perf_counter() - started
    engine.close()
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "dialogue-eval.json").write_text(json.dumps(report, indent=2))
        (out / "dialogue-eval.md").write_text(format_report(report) + "\n")
    return report


#: Ask thresholds tried: the runner-up span's score as a share of the best one's.
ASK_GRID = (0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99, 1.0)
#: Most questions a policy may answer with a question (issue: users stop answering beyond it).
MAX_ASK_RATE = 0.2


def clarify_policy(rounds: list[dict]) -> dict:
    """Each ask threshold replayed on the same answers, and the threshold chosen leave-one-conversation-out:
    on each conversation the one that gains most MRR on the others while asking at most ``MAX_ASK_RATE``."""

    def outcome(rows: list[dict], threshold: float) -> dict:
        asked = [r["asked"] and r["runner_up"] >= threshold for r in rows]
        gains = [r["rr_after"] - r["rr_before"] if a else 0.0 for r, a in zip(rows, asked)]
        return {"ask_rate": float(np.mean(asked)), "mrr_gain": float(np.mean(gains))}

    sweep = {f"{t:.2f}": outcome(rounds, t) for t in ASK_GRID}
    by_question: dict[str, list[float]] = {}
    for r in rounds:
        if r["asked"]:
            by_question.setdefault(r.get("question") or "?", []).append(r["rr_after"] - r["rr_before"])
    held_out, chosen = [], {}
    for conversation in sorted({r["conversation"] for r in rounds}):
        train = [r for r in rounds if r["conversation"] != conversation]
        allowed = [t for t in ASK_GRID if outcome(train, t)["ask_rate"] <= MAX_ASK_RATE]
        best = max(allowed, key=lambda t: (outcome(train, t)["mrr_gain"], t))
        chosen[conversation] = best
        test = [r for r in rounds if r["conversation"] == conversation]
        held_out += [(r, r["asked"] and r["runner_up"] >= best) for r in test]
    return {"sweep": sweep, "chosen_per_held_out_conversation": chosen,
            "by_question": {q: {"asked": len(g), "mrr_gain_sum": float(sum(g))} for q, g in by_question.items()},
            "rounds": rounds,
            "held_out": {"ask_rate": float(np.mean([a for _, a in held_out])),
                         "mrr_gain": float(np.mean([r["rr_after"] - r["rr_before"] if a else 0.0
                                                    for r, a in held_out]))}}


def _had_time(engine, text: str, now) -> bool:
    from indexer.query.timeparse import parse

    return not parse(engine.searcher.rewriter.rewrite(text), now).empty


def _table(rows: dict[str, dict]) -> list[str]:
    cols = [f"recall@{b}" for b in BUDGETS] + ["mrr"]
    lines = ["| system | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.3f}" for c in cols) + " |")
    return lines


def format_report(report: dict) -> str:
    r, t, c = report["rewriting"], report["time"], report["clarification"]
    lines = [f"# Dialogue features on {report['dataset']} ({report['questions']} questions, {report['turns']} turns)",
             "", f"## Rewriting: {r['questions']} questions as two turns",
             f"e.g. {r['example']['question']!r} -> {r['example']['turns']}", "", *_table(r["rows"]), "",
             f"## Time: {t['questions']} temporal questions ({t['with_time_expression']} with a time expression as asked)",
             "", *_table(t["rows"]), "",
             f"## Clarification: asked {c['asked']} of {c['questions']} ({c['ask_rate']:.1%}) by the loosest rule,"
             f" {c['asked_as_deployed']} ({c['asked_as_deployed'] / c['questions']:.1%}) by the default;"
             f" the simulated user found a consistent option {c['answered_by_simulated_user']} times", "",
             *_table(c["rows"]), "", "Ask threshold (runner-up score / best score) replayed on the same answers:", "",
             "| ask when runner-up within | asked | MRR gain |", "|---|---|---|",
             *[f"| {t} | {o['ask_rate']:.1%} | {o['mrr_gain']:+.4f} |" for t, o in c["policy"]["sweep"].items()], "",
             f"Leave-one-conversation-out (threshold chosen on the other conversations, at most {MAX_ASK_RATE:.0%} asked):"
             f" chosen {c['policy']['chosen_per_held_out_conversation']}, held out: asked"
             f" {c['policy']['held_out']['ask_rate']:.1%}, MRR gain {c['policy']['held_out']['mrr_gain']:+.4f}."]
    return "\n".join(lines)


def main_dialogue(directory: str, out: str, progress: bool = True) -> int:
    print(format_report(evaluate_dialogue(directory, out, progress)))
    return 0
