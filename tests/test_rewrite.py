"""Conversational rewriting: the rule, and a transformers model loaded from a local path."""

from indexer.query.rewrite import RuleRewriter, Seq2SeqRewriter, open_rewriter, rule_rewrite
from schemas import HistoryTurn


def h(*turns):
    return [HistoryTurn(role=r, text=t) for r, t in turns]


def test_last_turn_alone_without_history():
    assert rule_rewrite("the photo of the glacier") == "the photo of the glacier"


def test_refinement_carries_the_subject():
    out = rule_rewrite("no, the one from the lake", h(("user", "find the chat where Anna sent the glacier photo")))
    assert "glacier" in out and "lake" in out and "no," not in out.lower()
    assert not out.lower().startswith("find")


def test_assistant_turns_are_not_search_words_but_answers_join_the_question():
    out = rule_rewrite("in May 2023", h(("user", "the hiking trip"), ("assistant", "When was it? in May 2023 | in June 2023")))
    assert out == "the hiking trip in May 2023"


def test_exclusions_are_dropped():
    out = rule_rewrite("not the one with Bob", h(("user", "birthday cake photo")))
    assert "bob" not in out.lower() and "cake" in out


def test_only_recent_user_turns_and_no_repeats():
    out = rule_rewrite("glacier", h(("user", "alpha"), ("user", "beta glacier"), ("user", "gamma")))
    assert out.split() == ["beta", "gamma", "glacier"]


def test_open_rewriter_defaults_to_the_rule():
    assert isinstance(open_rewriter(None), RuleRewriter)


def test_seq2seq_model_from_a_local_path(tmp_path):
    from ops.bench import random_models

    path = random_models.bart(tmp_path / "rewriter")
    rewriter = open_rewriter(path)
    assert isinstance(rewriter, Seq2SeqRewriter)
    history = h(("user", "the glacier photo"))
    first = rewriter.rewrite("from May", history)
    assert first == rewriter.rewrite("from May", history), "greedy decoding is deterministic"
    assert first and len(first) <= 2000 and "<s>" not in first and "</s>" not in first
    # Without history there is nothing to rewrite: the model is not consulted.
    assert rewriter.rewrite("just this") == "just this"
