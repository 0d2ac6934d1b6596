"""The rules behind the dialogue figures: how questions become two turns, how the simulated user answers."""

from datetime import datetime, timezone

from ops.eval.dialogue import pick_option, split_question
from ops.eval.locomo import LocomoTurn, Question


def test_split_question_makes_a_vague_and_a_refining_turn():
    first, second = split_question("When did Caroline go to the LGBTQ support group?")
    assert first == "When did Caroline go to the LGBTQ"
    assert second == "no, the one about support group?"
    assert split_question("When?") is None


def test_simulated_user_picks_the_option_consistent_with_the_evidence():
    when = datetime(2023, 5, 8, 13, tzinfo=timezone.utc)
    turn = LocomoTurn("26", 1, "D1:3", "Caroline", "I went to a support group", "a rainbow flag", when)
    q = Question("26", "When did Caroline go?", frozenset({"D1:3"}), 2)
    turns = {("26", "D1:3"): turn}
    people = {"26": {"Caroline", "Melanie"}}
    assert pick_option(["in June 2023", "in May 2023"], q, turns, people) == "in May 2023"
    assert pick_option(["with Jon and Gina", "with Caroline and Melanie"], q, turns, people) == "with Caroline and Melanie"
    assert pick_option(["the photo of a cat", "the photo of a rainbow flag"], q, turns, people) == \
        "the photo of a rainbow flag"
    assert pick_option(["about hiking", "about support"], q, turns, people) == "about support"
    assert pick_option(["in June 2023", "about hiking"], q, turns, people) is None


def test_reasoning_benchmark_runs_on_a_tiny_model(tmp_path):
    from ops.bench.reasoning import run

    report = run("tiny", 3, [1, 3], 1, tmp_path)
    assert [r["batch_size"] for r in report["rows"]] == [1, 3]
    assert all(r["candidates_per_s"] > 0 for r in report["rows"])
    assert (tmp_path / "reasoning-bench.md").exists()


def test_the_ask_threshold_is_chosen_on_the_other_conversations():
    from ops.eval.dialogue import clarify_policy

    def row(conversation, runner_up, gain, asked=True):
        return {"conversation": conversation, "asked": asked, "runner_up": runner_up, "rr_before": 0.5,
                "rr_after": 0.5 + gain}

    # Close calls gain, loose ones lose; every conversation asks on 4 of 10 at the loosest rule.
    rounds = []
    for c in ("a", "b", "c"):
        rounds += [row(c, 0.99, 0.3), row(c, 0.97, 0.1), row(c, 0.93, -0.2), row(c, 0.91, -0.1)]
        rounds += [row(c, 0.5, 0.0, asked=False) for _ in range(6)]
    policy = clarify_policy(rounds)
    assert policy["sweep"]["0.90"]["ask_rate"] == 0.4
    assert policy["chosen_per_held_out_conversation"] == {"a": 0.97, "b": 0.97, "c": 0.97}
    assert policy["held_out"]["ask_rate"] == 0.2
    assert abs(policy["held_out"]["mrr_gain"] - 0.04) < 1e-9
