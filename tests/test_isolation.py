"""Property: the indexed state is a function of the set of events, and no result crosses a boundary.

Random histories of upserts, edits (``edited_at``), deletes, participant changes and missing lists
over two tenants are applied twice: once in log order by one engine, once shuffled and duplicated by
three engines working at once on one shared state. Then:
- both end in the same state (turns, tombstones, participants, fragments, index sizes);
- every returned turn is allowed by a model of the contract computed here, independently of the
  engine (highest stamp wins, deletes stick, the newest list decides visibility);
- a query for a word the model says the user can see returns something (no vacuous pass).
"""

from __future__ import annotations

import itertools
import random
import threading
from datetime import timedelta

import pytest
from hypothesis import given, HealthCheck, settings, strategies as st

from tests.conftest import message, query

_EXAMPLES = itertools.count()
TENANTS = ["t1", "t2"]
CONVERSATIONS = ["c1", "c2", "c3"]
USERS = ["ann", "bob", "cid", "dee"]
WORDS = ["glacier", "bread", "laptop", "concert", "garden", "wedding", "puppy", "marathon"]
WORKERS = 3
#: Histories and events the property covered in this session (reported by the closing note).
COVERED = {"histories": 0, "events": 0}

event = st.fixed_dictionaries({
    "tenant": st.sampled_from(TENANTS),
    "conversation": st.sampled_from(CONVERSATIONS),
    "n": st.integers(1, 6),
    "sender": st.sampled_from(USERS),
    "words": st.lists(st.sampled_from(WORDS), min_size=1, max_size=4),
    "participants": st.one_of(st.none(), st.lists(st.sampled_from(USERS), min_size=1, max_size=3, unique=True)),
    "edit_minutes": st.one_of(st.none(), st.integers(1, 30)),
    "delete": st.sampled_from([False, False, False, True]),
})


def _events(history: list[dict]) -> list:
    out = []
    for i, e in enumerate(history):
        m = message(e["conversation"], e["n"], e["sender"], "" if e["delete"] else " ".join(e["words"]),
                    tenant=e["tenant"], participants=e["participants"], op="delete" if e["delete"] else "upsert",
                    event_suffix=f"-{i}")
        if e["edit_minutes"] is not None:
            m = m.model_copy(update={"edited_at": m.sent_at + timedelta(minutes=e["edit_minutes"])})
        out.append(m)
    return out


def _model(events: list) -> tuple[dict, dict]:
    """What the contract says: live messages' texts and each conversation's participant list."""
    deleted = {(e.tenant_id, e.conversation_id, e.message_id) for e in events if e.op == "delete"}
    best: dict[tuple, object] = {}
    lists: dict[tuple, tuple] = {}
    seen = set()
    for e in events:
        key, stamp = (e.tenant_id, e.conversation_id, e.message_id), (e.version, e.event_id)
        seen.add(key[:2])
        if e.op == "upsert" and key not in deleted and (key not in best or (best[key].version, best[key].event_id) < stamp):
            best[key] = e
        if e.participants is not None and (key[:2] not in lists or lists[key[:2]][0] < stamp):
            lists[key[:2]] = (stamp, sorted(set(e.participants)))
    participants = {conv: lists[conv][1] if conv in lists else None for conv in seen}
    return {k: e.text for k, e in best.items()}, participants


def _state(engine) -> dict:
    state = engine.state
    convs = sorted({(t, c) for t in TENANTS for c in CONVERSATIONS})
    return {
        "turns": {conv: [(t.message_id, t.sender_id, t.text) for t in state.turns(*conv)] for conv in convs},
        "participants": {conv: state.participants(*conv) for conv in convs},
        "tombstoned": {conv: sorted(state.tombstones(*conv, [f"m{n:03d}" for n in range(1, 7)])) for conv in convs},
        "fragments": state.all_fragments(),
        "vectors": engine.vectors.count(),
        "keywords": engine.keywords.count(),
    }


#: (vector store, state backend): a fleet of engines on the shared stores and either state; the edge
#: store admits one process, so there the "workers" are threads sharing one engine.
BACKENDS = [("sqlite", "sqlite"), ("sqlite", "postgres"), ("edge", "sqlite")]


@pytest.fixture(params=BACKENDS, ids=["-".join(b) for b in BACKENDS])
def backends(request):
    return request.param


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(history=st.lists(event, min_size=3, max_size=30),
       asks=st.lists(st.tuples(st.sampled_from(TENANTS), st.sampled_from(USERS), st.sampled_from(WORDS)),
                     min_size=3, max_size=6),
       seed=st.integers(0, 2**32 - 1))
def test_any_delivery_order_gives_the_log_order_state_and_no_leak(tmp_path, embedder, new_state_url, backends,
                                                                     history, asks, seed):
    from ops.runtime.config import Config
    from ops.runtime.assemble import open_engine

    example = next(_EXAMPLES)
    events = _events(history)
    vector_store, state_backend = backends

    def engine_on(name: str, state_url: str | None):
        return open_engine(Config(data_dir=tmp_path / f"{name}-{example}", vector_store=vector_store,
                                    state_url=state_url), embedder=embedder)

    reference = engine_on("log", new_state_url(state_backend))
    workers: list = []
    try:
        for e in events:
            reference.ingest([e])

        rng = random.Random(seed)
        delivered = events + rng.sample(events, len(events) // 2)
        rng.shuffle(delivered)
        shared_url = new_state_url(state_backend)
        workers += [engine_on("fleet", shared_url) for _ in range(WORKERS if vector_store != "edge" else 1)]
        workers += [workers[0]] * (WORKERS - len(workers))
        errors: list[BaseException] = []

        def work(engine, share):
            try:
                for start in range(0, len(share), 3):
                    engine.ingest(share[start:start + 3])
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(w, delivered[i::WORKERS])) for i, w in enumerate(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        fleet = workers[0]
        fleet.index_pending()
        assert _state(fleet) == _state(reference)

        texts, participants = _model(events)
        for tenant, user, word in asks:
            result = fleet.query(query(word, tenant=tenant, user=user, top_k=50))
            assert result.status in ("ok", "clarify")
            for fragment in result.fragments:
                conv = (tenant, fragment.conversation_id)
                assert conv in participants, f"{fragment.conversation_id} is not a conversation of tenant {tenant}"
                allowed = participants[conv]
                assert allowed is None or user in allowed, f"{user} sees {conv}, participants {allowed}"
                for mid in fragment.message_ids:
                    assert (*conv, mid) in texts, f"deleted or foreign message {mid} returned"
            visible = [k for k, text in texts.items() if k[0] == tenant and word in text.split()
                       and (participants[k[:2]] is None or user in participants[k[:2]])]
            if visible:
                assert result.fragments, f"{user} of {tenant} may see {visible} with {word!r} but got nothing"
    finally:
        # Also when an example fails: Hypothesis replays many, and leaked pools would exhaust the server.
        for engine in {id(e): e for e in [reference, *workers]}.values():
            engine.close()
    COVERED["histories"] += 1
    COVERED["events"] += len(events)
