"""What one fragment is indexed as: a turn and a window per member turn.

The fragment itself is not a unit: search weighs a fragment by its best turns' hits (``hybrid.SearchConfig.
fragment_turns``). Data dirs written before hold fragment units; ingest deletes one by id whenever its fragment
is written or goes, so ``tessera reindex``, which writes every fragment, leaves none."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from indexer import ids
from indexer.model import FragmentRecord, ImageInfo, SortKey, Turn, Unit
from indexer.text import chat_text, render_turn
from schemas import MessageEvent


#: A turn's window: the turns before and after it in its fragment, and the weight of its own vector among theirs.
#: Two before, since in a dialogue the answer often comes in the speaker's next turn, after the other's reaction:
#: of the 102 single-hop dev questions (of 200) whose first span missed, 35 had their evidence two turns after it.
#: On the dev split (``make eval``), against one before and one after, weight 2: recall@10 0.804 -> 0.814, MRR
#: 0.616 -> 0.627, better on each conversation in both and on the messy and long-chat stresses; chosen
#: leave-one-conversation-out by MRR + recall@10 among nine extents and weights, it is the choice of two folds of three.
WINDOW_BEFORE, WINDOW_AFTER, WINDOW_SELF_WEIGHT = 2, 1, 3.0


def sort_key(turn: Turn) -> SortKey:
    return (turn.sent_at.timestamp(), turn.message_id)


def turn_of_event(event: MessageEvent) -> Turn:
    return Turn(
        message_id=event.message_id, sender_id=event.sender_id, sender_name=event.sender_name,
        sent_at=event.sent_at, text=event.text,
        images=tuple(ImageInfo(i.uri, i.caption) for i in event.images),
    )


def unit_vector(vectors: Sequence[np.ndarray], weights: Sequence[float] | None = None) -> np.ndarray:
    v = np.average(np.stack(vectors), axis=0, weights=weights).astype(np.float32)
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


def fragment_units(fragment: FragmentRecord, members: Sequence[Turn], visible_to: list[str],
                   version: int = 0) -> list[Unit]:
    """The units ingest indexes for one fragment: a turn and a window per member."""
    texts = [render_turn(t) for t in members]
    vecs = [t.vector for t in members]
    common = dict(tenant_id=fragment.tenant_id, conversation_id=fragment.conversation_id,
                  fragment_id=fragment.fragment_id, visible_to=list(visible_to), version=version)
    units: list[Unit] = []
    for i, turn in enumerate(members):
        ts = turn.sent_at.timestamp()
        base = dict(message_ids=[turn.message_id], sender_ids=[turn.sender_id], start_ts=ts, end_ts=ts, **common)
        units.append(Unit(ids.turn_unit_id(fragment.tenant_id, fragment.conversation_id, turn.message_id, "turn"),
                          "turn", text=texts[i], vector=turn.vector, image_vector=turn.image_vector, **base))
        lo, hi = max(0, i - WINDOW_BEFORE), min(len(members), i + WINDOW_AFTER + 1)
        # The turn itself counts most: the window adds context without drowning the turn.
        weights = [WINDOW_SELF_WEIGHT if j == i else 1.0 for j in range(lo, hi)]
        units.append(Unit(ids.turn_unit_id(fragment.tenant_id, fragment.conversation_id, turn.message_id, "window"),
                          "window", text=" ".join(texts[lo:hi]), vector=unit_vector(vecs[lo:hi], weights), **base))
    return units


def vector_units(units: Sequence[Unit]) -> list[Unit]:
    """The units as the vector stores index them: windows and fragments, and a turn only when it carries an
    image vector (the image lists search turns). Search has no dense list over turns (``indexer/query/hybrid.py``),
    so a turn's text vector would be memory, disk and build time for nothing: at 100k fragments half a
    million of the 1.1 million points."""
    return [u for u in units if u.kind != "turn" or u.image_vector is not None]


def keyword_units(units: Sequence[Unit]) -> list[Unit]:
    """The units as the keyword stores index them: their text as chat search sees it (``chat_text``)."""
    return [dataclasses.replace(u, text=chat_text(u.text)) for u in units]
