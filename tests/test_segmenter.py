from datetime import timedelta

import numpy as np

from indexer.model import ImageInfo, Turn
from indexer.ingest.segmenter import SegmenterConfig, segment
from indexer.text import render_turn
from tests.conftest import T0


def turn(i, vector, minutes=None, image=False):
    return Turn(f"m{i}", "a", T0 + timedelta(minutes=i if minutes is None else minutes), f"text {i}",
                images=(ImageInfo("file:///x.png", "cap"),) if image else (), vector=np.asarray(vector, dtype=np.float32))


X, Y = [1.0, 0.0], [0.0, 1.0]


def test_semantic_shift_opens_a_fragment():
    turns = [turn(i, X) for i in range(4)] + [turn(i, Y) for i in range(4, 8)]
    assert segment(turns, render_turn) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_no_shift_before_min_turns_and_length_limit():
    turns = [turn(0, X), turn(1, Y), turn(2, X), turn(3, Y)]
    assert segment(turns, render_turn) == [[0, 1, 2, 3]]
    long = [turn(i, X) for i in range(25)]
    sizes = [len(f) for f in segment(long, render_turn, SegmenterConfig(max_turns=10))]
    assert sizes == [10, 10, 5]


def test_time_gap_always_splits():
    turns = [turn(0, X), turn(1, X, minutes=1), turn(2, X, minutes=200)]
    assert segment(turns, render_turn) == [[0, 1], [2]]


def test_reply_to_an_image_stays_with_it():
    turns = [turn(i, X) for i in range(3)] + [turn(3, X, image=True), turn(4, Y), turn(5, Y)]
    fragments = segment(turns, render_turn)
    assert any(3 in f and 4 in f for f in fragments)


def test_prefix_stability_makes_streaming_safe():
    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(60, 8))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    turns = [turn(i, vectors[i]) for i in range(60)]
    full = segment(turns, render_turn)
    for cut in range(1, 60):
        prefix = segment(turns[:cut], render_turn)
        assert prefix[:-1] == full[:len(prefix) - 1]
