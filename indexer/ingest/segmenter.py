"""Streaming semantic segmentation of a conversation into fragments.

A fragment is a contiguous run of turns about one thing. The rule is greedy and left-to-right: the
decision to open a new fragment before turn ``i`` looks only at turn ``i`` and the fragment that is
still open. Decisions before the open fragment therefore never depend on later turns, which is what
makes segmenting turn by turn give the same fragments as segmenting the whole conversation at once:
the caller re-runs the rule from the first fragment a change can touch (see ``resegment_from``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Sequence

import numpy as np
from indexer.model import Turn


@dataclass(frozen=True)
class SegmenterConfig:
    #: A fragment never holds more turns than this; long runs on one topic are cut into pieces.
    max_turns: int = 10
    #: Nor more characters of rendered text (keeps fragments inside the encoder's window).
    max_chars: int = 1_500
    #: A semantic shift only closes a fragment that already has this many turns.
    min_turns: int = 3
    #: A silence longer than this always starts a new fragment (a new session of the dialogue).
    max_gap: timedelta = timedelta(minutes=30)
    #: Cosine similarity between a turn and the recent turns of the open fragment below which the
    #: turn starts a new topic. MiniLM similarities of unrelated chat turns sit around 0.05-0.2.
    shift_threshold: float = 0.18
    #: How many trailing turns of the open fragment represent its current topic.
    window: int = 3


def boundary_before(turn: Turn, open_turns: Sequence[Turn], open_chars: int, turn_chars: int,
                    config: SegmenterConfig) -> bool:
    """Whether ``turn`` starts a new fragment after the still-open ``open_turns``."""
    if not open_turns:
        return False
    last = open_turns[-1]
    if turn.sent_at - last.sent_at > config.max_gap:
        return True
    if len(open_turns) >= config.max_turns or open_chars + turn_chars > config.max_chars:
        return True
    if last.has_image:
        # The reply to a shared image talks about it: keep them together.
        return False
    if len(open_turns) < config.min_turns or turn.vector is None:
        return False
    recent = [t.vector for t in open_turns[-config.window:] if t.vector is not None]
    if not recent:
        return False
    centroid = np.mean(recent, axis=0)
    norm = float(np.linalg.norm(centroid))
    if norm == 0.0:
        return False
    similarity = float(np.dot(turn.vector, centroid) / norm)
    return similarity < config.shift_threshold


def segment(turns: Sequence[Turn], render, config: SegmenterConfig = SegmenterConfig()) -> list[list[int]]:
    """Split ordered ``turns`` into fragments; returns lists of indices into ``turns``.

    ``render`` maps a turn to the text that is indexed, so the length limit counts what is stored.
    """
    fragments: list[list[int]] = []
    open_idx: list[int] = []
    open_chars = 0
    for i, turn in enumerate(turns):
        chars = len(render(turn))
        if boundary_before(turn, [turns[j] for j in open_idx], open_chars, chars, config):
            fragments.append(open_idx)
            open_idx, open_chars = [], 0
        open_idx.append(i)
        open_chars += chars
    if open_idx:
        fragments.append(open_idx)
    return fragments
