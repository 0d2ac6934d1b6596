"""Conversational query rewriting: history plus the last utterance become one retrieval query.

The deterministic default keeps the user's earlier turns that still constrain the search (a refining
second turn rarely repeats the subject of the first) and drops the assistant's turns, which are the
system's own words.
"""

from __future__ import annotations

from typing import Sequence

from schemas import HistoryTurn

#: How many earlier user turns are carried into the query.
MAX_CARRIED_TURNS = 2


def rewrite(query: str, history: Sequence[HistoryTurn] = ()) -> str:
    earlier = [t.text.strip() for t in history if t.role == "user" and t.text.strip()]
    parts = earlier[-MAX_CARRIED_TURNS:] + [query.strip()]
    return " ".join(dict.fromkeys(p for p in parts if p))
