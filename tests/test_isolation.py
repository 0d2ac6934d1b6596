"""Property: no result ever holds a fragment of another tenant or of a conversation the user is not in.

Random histories of upserts, edits, deletes and participant changes over two tenants, then random
queries; every returned turn is checked against a model of who may see what, computed independently
of the engine.
"""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import message, query

_EXAMPLES = itertools.count()
TENANTS = ["t1", "t2"]
CONVERSATIONS = ["c1", "c2", "c3"]
USERS = ["ann", "bob", "cid", "dee"]
WORDS = ["glacier", "bread", "laptop", "concert", "garden", "wedding", "puppy", "marathon"]

event = st.fixed_dictionaries({
    "tenant": st.sampled_from(TENANTS),
    "conversation": st.sampled_from(CONVERSATIONS),
    "n": st.integers(1, 6),
    "sender": st.sampled_from(USERS),
    "words": st.lists(st.sampled_from(WORDS), min_size=1, max_size=4),
    "participants": st.one_of(st.none(), st.lists(st.sampled_from(USERS), min_size=1, max_size=3, unique=True)),
    "delete": st.sampled_from([False, False, False, True]),
})


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(history=st.lists(event, min_size=3, max_size=25),
       asks=st.lists(st.tuples(st.sampled_from(TENANTS), st.sampled_from(USERS), st.sampled_from(WORDS)),
                     min_size=3, max_size=6))
def test_results_respect_tenant_and_participants(make_engine, history, asks):
    # A fresh data dir per example: hypothesis may run the same history again (replay, shrinking).
    engine = make_engine(f"iso-{next(_EXAMPLES)}")
    participants: dict[tuple[str, str], list[str] | None] = {}
    alive: set[tuple[str, str, str]] = set()
    for i, e in enumerate(history):
        conv = (e["tenant"], e["conversation"])
        mid = f"m{e['n']:03d}"
        if e["delete"]:
            engine.ingest([message(e["conversation"], e["n"], e["sender"], "", tenant=e["tenant"], op="delete",
                                   event_suffix=f"-{i}")])
            alive.discard((*conv, mid))
            continue
        engine.ingest([message(e["conversation"], e["n"], e["sender"], " ".join(e["words"]), tenant=e["tenant"],
                               participants=e["participants"], event_suffix=f"-{i}")])
        alive.add((*conv, mid))
        if conv not in participants or e["participants"] is not None:
            participants[conv] = e["participants"]
    for tenant, user, word in asks:
        result = engine.query(query(word, tenant=tenant, user=user, top_k=50))
        # A clarifying question still carries the fragments found so far: they are checked the same way.
        assert result.status in ("ok", "clarify")
        for fragment in result.fragments:
            conv = (tenant, fragment.conversation_id)
            assert conv in participants, f"{fragment.conversation_id} is not a conversation of tenant {tenant}"
            allowed = participants[conv]
            assert allowed is None or user in allowed, f"{user} sees {conv}, participants {allowed}"
            for mid in fragment.message_ids:
                assert (*conv, mid) in alive, f"deleted or foreign message {mid} returned"
