"""The VLM reasoning stage with tiny random LLaVA models of the real classes, loaded by the production
code: decoding always yields valid turn numbers, images reach the model, the modes behave."""

from datetime import datetime, timezone

import pytest
from hypothesis import given, strategies as st

from indexer.query.reasoning import MAX_ANSWER_TURNS, AnswerVocabulary, VlmReasoner, answer_state, parse_answer
from schemas import QUERY_SCHEMA, QueryJob, ReasonRequest
from tests.conftest import dialogue, query

T = datetime(2023, 5, 1, 12, tzinfo=timezone.utc)


def _devices():
    import torch

    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def vlm_paths(tmp_path_factory):
    from ops.bench import random_models

    root = tmp_path_factory.mktemp("vlm")
    return [random_models.llava(root / f"llava-{seed}", seed=seed) for seed in range(3)]


@pytest.fixture(scope="module", params=_devices())
def device(request):
    return request.param


@given(st.text(alphabet="0123456789,", max_size=12), st.integers(min_value=1, max_value=30))
def test_complete_answers_parse_to_valid_turns(text, n):
    prefix, complete = answer_state(text, n)
    if complete:
        numbers = parse_answer(text)
        assert text == "0" or (numbers == sorted(set(numbers)) and all(1 <= x <= n for x in numbers))
        assert len(numbers) <= MAX_ANSWER_TURNS
    if not prefix:
        assert not complete


def candidate(i, n_turns, images=()):
    turns = []
    for k in range(n_turns):
        attached = [{"uri": uri, "caption": f"picture {j}"} for j, uri in enumerate(images)] if k == 1 else []
        turns.append({"message_id": f"f{i}-m{k}", "speaker": "Ann" if k % 2 else "Bob", "sent_at": T,
                      "text": f"turn {k} about the glacier hike", "images": attached})
    return {"fragment_id": f"f{i}", "conversation_id": "c1", "start_at": T, "end_at": T, "score": 1.0 / (i + 1),
            "span_message_ids": [f"f{i}-m0"], "turns": turns}


def request(candidates, reasoning="vlm", top_k=5):
    job = QueryJob.model_validate({"schema": QUERY_SCHEMA, "job_id": "j", "tenant_id": "t1", "user_id": "u1",
                                   "query": "glacier hike", "top_k": top_k, "reasoning": reasoning})
    return ReasonRequest(job=job, rewritten_query=job.query, candidates=candidates)


def test_constrained_decoding_always_yields_valid_turns(vlm_paths, device):
    for path in vlm_paths:
        reasoner = VlmReasoner(path, device=device, batch_size=4)
        sizes = [1, 2, 3, 7, 9, 10, 11, 15]
        judgements = reasoner.judge("glacier hike", [request([candidate(i, n)]).candidates[0]
                                                     for i, n in enumerate(sizes)])
        assert len(judgements) == len(sizes)
        for n, judgement in zip(sizes, judgements):
            assert answer_state(judgement.answer, n)[1], f"{judgement.answer!r} is not a complete answer for {n} turns"
            assert all(1 <= x <= n for x in judgement.turn_numbers)
            assert 0.0 <= judgement.relevance <= 1.0
        assert reasoner.last_batches == [4, 4]


def test_answer_vocabulary_never_dead_ends(vlm_paths):
    from transformers import AutoTokenizer

    vocabulary = AnswerVocabulary(AutoTokenizer.from_pretrained(str(vlm_paths[0])))
    for n in (1, 9, 10, 23):
        frontier = [""]
        seen = set()
        while frontier:
            text = frontier.pop()
            if text in seen:
                continue
            seen.add(text)
            allowed = vocabulary.allowed(text, n)
            assert allowed, f"no way on from {text!r} with {n} turns"
            for token_id in allowed:
                if token_id not in vocabulary.eos_ids:
                    frontier.append(text + vocabulary.pieces[token_id].strip())


def test_fragment_images_reach_the_model(vlm_paths, tmp_path, device):
    from PIL import Image

    from indexer.images import ImagePolicy

    uris = []
    for i, colour in enumerate([(200, 0, 0), (0, 200, 0)]):
        Image.new("RGB", (40, 30), colour).save(tmp_path / f"{i}.png")
        uris.append(f"file://{tmp_path}/{i}.png")
    refused = "http://127.0.0.1:1/never.png"
    reasoner = VlmReasoner(vlm_paths[0], device=device, policy=ImagePolicy(file_roots=(tmp_path,)))
    reasoner.warm_up()
    seen = []
    tower = reasoner._model.model.vision_tower
    handle = tower.register_forward_hook(lambda module, args, kwargs_out: seen.append(args[0].shape[0]))
    try:
        with_images = request([candidate(0, 4, images=uris + [refused]), candidate(1, 3)]).candidates
        text, shown = reasoner.prompt("glacier", with_images[0], reasoner._images(with_images[0]))
        assert text.count(reasoner.image_token) == 2 and len(shown) == 2
        assert "picture 2" in text, "a refused image still reaches the model as its caption"
        reasoner.judge("glacier", with_images)
    finally:
        handle.remove()
    assert sum(seen) == 2, "both fetched images of the fragment went through the vision tower"


def test_answer_orders_by_relevance_and_keeps_context(vlm_paths):
    reasoner = VlmReasoner(vlm_paths[1])
    result = reasoner.answer(request([candidate(i, 3 + i) for i in range(6)], top_k=3))
    assert result.status == "ok" and result.reasoned_by == "vlm" and len(result.fragments) == 3
    scores = [f.score for f in result.fragments]
    assert scores == sorted(scores, reverse=True)
    for fragment in result.fragments:
        assert fragment.message_ids and set(fragment.message_ids) <= set(fragment.context_message_ids)
    assert result.timings_ms["reasoning"] > 0


def test_engine_modes(make_engine, vlm_paths):
    engine = make_engine()
    engine.ingest(dialogue())
    unavailable = engine.query(query("glacier hike", reasoning="vlm"))
    assert unavailable.status == "error" and unavailable.error.code == "reasoning_unavailable"
    assert engine.query(query("glacier hike", reasoning="auto")).reasoned_by == "cpu"
    engine.reasoner = VlmReasoner(vlm_paths[2])
    by_vlm = engine.query(query("glacier hike", reasoning="vlm"))
    assert by_vlm.status == "ok" and by_vlm.reasoned_by == "vlm" and by_vlm.fragments
    assert engine.query(query("glacier hike", reasoning="auto")).reasoned_by == "vlm"
    assert engine.query(query("glacier hike", reasoning="fast")).reasoned_by == "cpu"
    handed = engine.answer(query("glacier hike", reasoning="vlm"), vlm_available=True)
    assert isinstance(handed, ReasonRequest)
    assert all(c.turns and set(c.span_message_ids) <= {t.message_id for t in c.turns} for c in handed.candidates)


def test_missing_model_path_is_a_clear_error(tmp_path):
    from indexer.query.reasoning import ReasoningUnavailable

    with pytest.raises(ReasoningUnavailable, match="TESSERA_VLM_MODEL"):
        VlmReasoner(tmp_path / "nothing")
