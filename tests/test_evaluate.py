import json

import pytest

from ops.eval.retrieval import evaluate_locomo, score, span_scores
from ops.eval.locomo import Question


def test_score_follows_the_dataset_rules():
    q = [Question("c", "?", frozenset({"D1:2", "D1:9"}), 4)]
    ranked = [[("c", "D1:1"), ("c", "D1:2"), ("c", "D1:2"), ("x", "D1:9")] + [("c", f"D2:{i}") for i in range(40)]
              + [("c", "D1:9")]]
    row = score(q, ranked)
    assert row["recall@5"] == 0.5 and row["recall@30"] == 0.5
    assert row["mrr"] == 0.5 and row["conv_hit@1"] == 1.0
    assert score(q, [[]])["mrr"] == 0.0


def test_span_scores_are_the_ffrs_precision_recall_and_f1_of_the_pointed_turns():
    qs = [Question("c", "?", frozenset({"D1:2", "D1:3"}), 4), Question("c", "?", frozenset({"D2:1"}), 1)]
    spans = [[[("c", "D1:2"), ("c", "D1:4")], [("c", "D1:3")]],  # first span: 1 of 2 right; with the next: 2 of 3
             [[("x", "D2:1")], [("c", "D2:1")]]]                   # right id, wrong conversation first
    with_image = {("c", "D1:2"), ("c", "D2:1")}
    got = span_scores(qs, spans, with_image, ["ok", "clarify"])
    assert got["span_precision@top1"] == pytest.approx((0.5 + 0) / 2)
    assert got["span_recall@top1"] == pytest.approx((0.5 + 0) / 2)
    assert got["span_f1@top1"] == pytest.approx((0.5 + 0) / 2)
    assert got["span_precision@top3"] == pytest.approx((2 / 3 + 0.5) / 2)
    assert got["span_recall@top3"] == pytest.approx((1 + 1) / 2)
    assert got["image_f1@top1"] == pytest.approx((1 + 0) / 2)
    assert got["clarify_share"] == 0.5
    assert span_scores(qs[:1], [[]], with_image)["span_f1@top1"] == 0.0


def test_eval_on_a_small_locomo_file(tmp_path):
    data = {"speaker_a": "Ann", "speaker_b": "Bob", "session_1_date_time": "1:47 pm on 18 May, 2023",
            "session_1": [{"speaker": "Ann", "dia_id": "D1:1", "text": "I adopted a cat named Pixel."},
                          {"speaker": "Bob", "dia_id": "D1:2", "text": "Cute! I started learning the violin."},
                          {"speaker": "Ann", "dia_id": "D1:3", "text": "Look", "img_url": ["http://x/y.jpg"],
                           "blip_caption": "a photo of a grey cat on a windowsill"}],
            "qa": [{"question": "What instrument is Bob learning?", "answer": "violin", "evidence": ["D1:2"],
                    "category": 4},
                   {"question": "What is the cat called?", "answer": "Pixel", "evidence": ["D1:1"], "category": 1},
                   {"question": "ignored", "evidence": ["D1:1"], "category": 5},
                   {"question": "no evidence", "evidence": ["D9:9"], "category": 4}]}
    (tmp_path / "1.json").write_text(json.dumps(data))
    report = evaluate_locomo(tmp_path, tmp_path / "out.json", data_dir=tmp_path / "d", progress=False)
    assert report["questions"] == 2 and report["turns"] == 3
    assert report["rows"]["tessera (hybrid fragments + spans)"]["recall@5"] == 1.0
    assert len(report["rows"]) == 6
    assert json.loads((tmp_path / "out.json").read_text())["rows"]
    assert 0.0 <= report["spans"]["span_f1@top1"] <= 1.0 and "clarify_share" in report["spans"]
    assert set(report["by_category"]) == {"1", "4"} and "span_f1@top1" in report["by_category"]["4"]


def test_the_long_chat_stress_makes_one_conversation_of_all_in_time_order(tmp_path):
    from ops.eval.locomo import into_one_conversation, load

    for name, (day, speakers) in {"1": ("18 May", ("Ann", "Bob")), "2": ("17 May", ("Cem", "Dia"))}.items():
        data = {"session_1_date_time": f"1:47 pm on {day}, 2023",
                "session_1": [{"speaker": s, "dia_id": f"D1:{k + 1}", "text": f"turn {k} of {name}"}
                              for k, s in enumerate(speakers)],
                "qa": [{"question": f"q{name}", "evidence": ["D1:2"], "category": 4}]}
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    turns, questions = into_one_conversation(*load(tmp_path))
    assert [t.message_id for t in turns] == ["2:D1:1", "2:D1:2", "1:D1:1", "1:D1:2"], "time order across chats"
    assert {t.conversation_id for t in turns} == {q.conversation_id for q in questions} == {"all"}
    assert sorted(q.evidence for q in questions) == [frozenset({"1:D1:2"}), frozenset({"2:D1:2"})]
    report = evaluate_locomo(tmp_path, data_dir=tmp_path / "d", progress=False, one_conversation=True)
    assert report["conversations"] == 1 and report["questions"] == 2


def test_the_messy_chat_stress_sends_a_message_a_sentence_and_scores_pieces_as_their_turn(tmp_path):
    from ops.eval.locomo import into_messy_chat, load, to_events, turn_of

    data = {"session_1_date_time": "1:47 pm on 18 May, 2023",
            "session_1": [{"speaker": "Ann", "dia_id": "D1:1", "text": "Thank you so much! I adopted a cat. Her name is Pixel."},
                          {"speaker": "Bob", "dia_id": "D1:2", "text": "Really? You are lucky.", "img_url": ["http://x/y.jpg"],
                           "blip_caption": "a grey cat"}],
            "qa": [{"question": "What is the cat called?", "evidence": ["D1:1"], "category": 4}]}
    (tmp_path / "1.json").write_text(json.dumps(data))
    turns, _ = load(tmp_path)
    messy = into_messy_chat(turns, reaction_share=1.0)
    assert [t.message_id for t in messy] == ["D1:1+0", "D1:1+1", "D1:1+2", "r.D1:1", "D1:2+0", "D1:2+1", "r.D1:2"]
    assert [t.text for t in messy][:3] == ["ty sooo much!", "i adopted a cat.", "her name is pixel."]
    assert messy[3].speaker == "Bob" and messy[6].speaker == "Ann"
    assert [t.caption for t in messy[4:6]] == [None, "a grey cat"], "the image comes with the last piece"
    assert [t.sent_at for t in messy] == sorted(t.sent_at for t in messy)
    assert into_messy_chat(turns, reaction_share=1.0) == messy
    assert len(to_events(messy)) == 7, "pieces and reactions are valid message ids"
    assert {turn_of(t.message_id) for t in messy} == {"D1:1", "D1:2", "r.D1:1", "r.D1:2"}
    report = evaluate_locomo(tmp_path, data_dir=tmp_path / "d", progress=False, messy=True)
    assert report["turns"] == len(into_messy_chat(turns))
    assert report["rows"]["tessera (hybrid fragments + spans)"]["recall@5"] == 1.0, "a piece of D1:1 counts as D1:1"


def test_typos_in_the_messy_chat_stress_change_only_the_longer_words_of_the_same_messages(tmp_path):
    from ops.eval.locomo import into_messy_chat, load

    text = "Thank you so much! I adopted a little cat yesterday. Her name is Pixel and she loves sleeping."
    data = {"session_1_date_time": "1:47 pm on 18 May, 2023",
            "session_1": [{"speaker": "Ann", "dia_id": f"D1:{i}", "text": text} for i in range(1, 21)],
            "qa": [{"question": "What is the cat called?", "evidence": ["D1:1"], "category": 4}]}
    (tmp_path / "1.json").write_text(json.dumps(data))
    turns, _ = load(tmp_path)
    plain = into_messy_chat(turns)
    typed = into_messy_chat(turns, typo_share=0.5)
    assert [t.message_id for t in typed] == [t.message_id for t in plain], "the same messages and reactions"
    assert into_messy_chat(turns, typo_share=0.5) == typed, "seeded"
    changed = kept = 0
    for a, b in zip(plain, typed):
        words_a, words_b = a.text.split(" "), b.text.split(" ")
        assert len(words_a) == len(words_b)
        for wa, wb in zip(words_a, words_b):
            if sum(ch.isalpha() for ch in wa) < 4:
                assert wa == wb, "short words keep their spelling"
            elif wa != wb:
                changed += 1
                assert wa[0] == wb[0] and abs(len(wa) - len(wb)) <= 1, "one edit inside the word"
            else:
                kept += 1
    assert 0.3 < changed / (changed + kept) < 0.7


def test_cross_validation_chooses_on_the_other_conversations_and_scores_the_held_out_one(tmp_path):
    from ops.eval.crossval import DEFAULT, cross_validate, format_report

    for name, (pet, instrument) in {"1": ("Pixel", "violin"), "2": ("Mochi", "cello")}.items():
        data = {"session_1_date_time": "1:47 pm on 18 May, 2023",
                "session_1": [{"speaker": "Ann", "dia_id": "D1:1", "text": f"I adopted a cat named {pet}."},
                              {"speaker": "Bob", "dia_id": "D1:2", "text": f"Cute! I started learning the {instrument}."},
                              {"speaker": "Ann", "dia_id": "D1:3", "text": "The weather is lovely today."}],
                "qa": [{"question": f"What instrument is Bob learning, the {instrument}?", "evidence": ["D1:2"],
                        "category": 4},
                       {"question": f"What is the cat {pet} called?", "evidence": ["D1:1"], "category": 4}]}
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    report = cross_validate(tmp_path, {"span_max_turns": (1,)}, data_dir=tmp_path / "d", progress=False)
    assert report["variants"] == [DEFAULT, "span_max_turns=1"]
    assert [f["held_out"] for f in report["folds"]] == ["1", "2"] and all(f["questions"] == 2 for f in report["folds"])
    assert all(f["chosen"] in report["variants"] for f in report["folds"])
    assert report["all_questions"][DEFAULT]["recall@10"] == 1.0
    assert "pooled" in format_report(report)


def test_the_dialogue_benchmark_runs_on_the_default_stores(tmp_path):
    """The ask threshold it chooses is deployed: it must be chosen on the scores the default engine gives."""
    from ops.eval.dialogue import evaluate_dialogue
    from ops.runtime.assemble import open_engine
    from ops.runtime.config import Config

    data = {"session_1_date_time": "1:47 pm on 18 May, 2023",
            "session_1": [{"speaker": "Ann", "dia_id": "D1:1", "text": "I adopted a cat named Pixel."},
                          {"speaker": "Bob", "dia_id": "D1:2", "text": "Cute! I started learning the violin."}],
            "qa": [{"question": "When did Ann adopt the cat named Pixel?", "evidence": ["D1:1"], "category": 2}]}
    (tmp_path / "1.json").write_text(json.dumps(data))
    (tmp_path / "2.json").write_text(json.dumps(data).replace("Pixel", "Mochi").replace("violin", "cello"))
    default = open_engine(Config(data_dir=tmp_path / "default"))
    expected = [default.vectors.backend, default.keywords.backend]
    default.close()
    report = evaluate_dialogue(tmp_path, out_dir=None, progress=False)
    assert report["stores"] == expected


@pytest.mark.parametrize("encoder", ["torch", "onnx-int8"])
def test_the_evals_encode_with_the_configured_model(tmp_path, monkeypatch, encoder):
    """``TESSERA_EMBED_MODEL`` names the model an eval measures; the evals opened the default model whatever it said."""
    from ops.eval.crossval import cross_validate

    (tmp_path / "set").mkdir()
    for name in ("1", "2"):  # cross-validation holds one conversation out
        (tmp_path / "set" / f"{name}.json").write_text(json.dumps({
            "session_1_date_time": "1:47 pm on 18 May, 2023",
            "session_1": [{"speaker": "Ann", "dia_id": "D1:1", "text": "I adopted a cat named Pixel."}],
            "qa": [{"question": "What is the cat called?", "evidence": ["D1:1"], "category": 4}]}))
    monkeypatch.setenv("TESSERA_ENCODER", encoder)
    monkeypatch.setenv("TESSERA_EMBED_MODEL", str(tmp_path / "no-such-model"))
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        evaluate_locomo(tmp_path / "set", data_dir=tmp_path / "d", progress=False)
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        cross_validate(tmp_path / "set", {}, data_dir=tmp_path / "c", progress=False)


def test_the_screenshot_stress_pictures_a_share_of_single_evidence_turns_and_keeps_the_rest(tmp_path):
    from PIL import Image

    from ops.eval.locomo import SCREENSHOT_WORDS, into_screenshots, load, to_events

    data = {"session_1_date_time": "1:47 pm on 18 May, 2023",
            "session_1": [{"speaker": "Ann", "dia_id": f"D1:{i}", "text": f"turn number {i} about pottery"}
                          for i in range(1, 21)],
            "qa": [{"question": f"q{i}", "evidence": [f"D1:{i}"], "category": 4} for i in range(1, 9)]
            + [{"question": "both", "evidence": ["D1:10", "D1:11"], "category": 1}]}
    (tmp_path / "1.json").write_text(json.dumps(data))
    turns, questions = load(tmp_path)
    shots_dir = tmp_path / "shots"
    stressed, shots = into_screenshots(turns, questions, 0.5, shots_dir)
    assert len(shots) == 4 and all(m in {f"D1:{i}" for i in range(1, 9)} for _, m in shots), "single evidence only"
    assert into_screenshots(turns, questions, 0.5, tmp_path / "again")[1] == shots, "seeded"
    for before, after, event in zip(turns, stressed, to_events(stressed)):
        if (after.conversation_id, after.message_id) in shots:
            assert after.text in SCREENSHOT_WORDS and event.images[-1].caption is None
            assert Image.open(event.images[-1].uri.removeprefix("file://")).size[0] == 640
        else:
            assert after == before and not event.images
