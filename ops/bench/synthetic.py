"""Synthetic corpora for scale: 10k to 1M fragments of real chat turns, written through the real stores.

How a corpus is made (``generate``), so that figures at different sizes compare:

* A pool of real turns (the bundled demo chats, plus LoCoMo turns when a directory is given) is
  encoded once with the real encoder. Every synthetic turn copies a pool turn's text and speaker,
  in pool order from a random start (so neighbouring turns belong together), and its vector is the
  pool vector plus a little Gaussian noise (sigma 0.02 per dimension, renormalised), so no two
  units share a vector.
* ``tenants`` tenants (default 10) with ``users`` users each (default 100); a conversation has 10
  fragments of 5 turns, 2 or 3 participants drawn from its tenant; one conversation in ten is a
  team conversation that everyone in the tenant sees. Turns are 2 minutes apart, fragments 1 hour.
* Fragments and their units are the ones ingest builds (``units.fragment_units``): five turns and five
  windows per fragment. Only segmentation and encoding are skipped, which the
  ingest benchmark measures on real data.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
from tqdm import tqdm

from indexer import ids
from indexer.model import EVERYONE, FragmentRecord, Turn
from indexer.ingest.units import fragment_units

TURNS_PER_FRAGMENT = 5
FRAGMENTS_PER_CONVERSATION = 10
TEAM_SHARE = 0.1
NOISE = 0.02
START = datetime(2024, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class Pool:
    speakers: list[str]
    texts: list[str]
    vectors: np.ndarray


def load_pool(embedder, locomo_dir: str | Path | None = None, cache: Path | None = None) -> Pool:
    """Real turns and their vectors; encoded once per pool and encoder, then read from ``cache``."""
    import tempfile

    from ops.demo.generate import generate as demo_events

    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for line in demo_events(tmp).read_text().splitlines():
            event = json.loads(line)
            caption = " ".join(f"[image: {i['caption']}]" for i in event["images"] if i.get("caption"))
            rows.append((event["sender_name"], (event["text"] + " " + caption).strip()))
    if locomo_dir:
        from ops.eval.locomo import load

        turns, _ = load(locomo_dir)
        rows.extend((t.speaker, t.text) for t in turns)
    speakers = [r[0] for r in rows]
    texts = [r[1] for r in rows]
    key = f"pool-{embedder.name}-{len(rows)}.npy"
    if cache and (cache / key).exists():
        vectors = np.load(cache / key)
    else:
        rendered = [f"{s}: {t}" for s, t in rows]
        vectors = np.concatenate([embedder.encode(rendered[i:i + 1024])
                                  for i in tqdm(range(0, len(rendered), 1024), desc="encode pool", file=sys.stderr)])
        if cache:
            cache.mkdir(parents=True, exist_ok=True)
            np.save(cache / key, vectors)
    return Pool(speakers, texts, vectors.astype(np.float32))


@dataclass(frozen=True)
class Layout:
    fragments: int
    tenants: int = 10
    users: int = 100
    seed: int = 7

    @property
    def conversations(self) -> int:
        return max(1, self.fragments // FRAGMENTS_PER_CONVERSATION)

    @property
    def seen_by_a_user(self) -> int:
        """Fragments one user may see, expected: the tenant's team conversations and a share of the others (2.5
        participants of ``users``). What a query scores exactly grows with it, not with the corpus: 100k fragments
        of one tenant let a user see what a user of 1M fragments in ten tenants sees (about 12,000)."""
        share = TEAM_SHARE + (1 - TEAM_SHARE) * 2.5 / self.users
        return round(self.conversations / self.tenants * share) * FRAGMENTS_PER_CONVERSATION

    def tenant(self, c: int) -> str:
        return f"tenant-{c % self.tenants:03d}"

    def participants(self, c: int) -> list[str] | None:
        """None for a team conversation (everyone in the tenant)."""
        rnd = random.Random(self.seed * 1_000_003 + c)
        if rnd.random() < TEAM_SHARE:
            return None
        return sorted(rnd.sample([f"user-{u:03d}" for u in range(self.users)], rnd.choice((2, 3))))


def generate(engine, pool: Pool, layout: Layout, batch_conversations: int = 100, progress: bool = True) -> dict:
    """Write ``layout.fragments`` fragments into the engine's state and stores; returns counts."""
    rng = np.random.default_rng(layout.seed)
    units_written = 0
    bar = tqdm(total=layout.conversations * FRAGMENTS_PER_CONVERSATION, desc=f"synthetic {layout.fragments}",
               unit="fragment", file=sys.stderr, disable=not progress)
    for first in range(0, layout.conversations, batch_conversations):
        batch = range(first, min(layout.conversations, first + batch_conversations))
        units = []
        with engine.state.transaction():
            for c in batch:
                units.extend(_conversation(engine, pool, layout, c, rng))
        engine.ingestor.write_units(units)
        units_written += len(units)
        bar.update(len(batch) * FRAGMENTS_PER_CONVERSATION)
    bar.close()
    # A bulk load ends with the stores refreshed, as ``tessera ingest`` and ``reindex`` do: no point left appendable.
    engine.refresh()
    return {"fragments": layout.conversations * FRAGMENTS_PER_CONVERSATION, "units": units_written,
            "conversations": layout.conversations, "tenants": layout.tenants, "users_per_tenant": layout.users}


def _conversation(engine, pool: Pool, layout: Layout, c: int, rng: np.random.Generator) -> list:
    tenant, conversation = layout.tenant(c), conversation_id(c)
    participants = layout.participants(c)
    people = participants or [f"user-{u:03d}" for u in rng.choice(layout.users, 2, replace=False)]
    engine.state.set_participants(tenant, conversation, participants, (0.0, "synthetic") if participants else None)
    n = TURNS_PER_FRAGMENT * FRAGMENTS_PER_CONVERSATION
    start = int(rng.integers(len(pool.texts)))
    picks = [(start + k) % len(pool.texts) for k in range(n)]
    noisy = pool.vectors[picks] + rng.normal(0, NOISE, size=(n, pool.vectors.shape[1])).astype(np.float32)
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    at = START + timedelta(minutes=int(rng.integers(0, 2 * 365 * 24 * 60)))
    units = []
    for f in range(FRAGMENTS_PER_CONVERSATION):
        members = []
        for k in range(TURNS_PER_FRAGMENT):
            i = f * TURNS_PER_FRAGMENT + k
            sender = people[i % len(people)]
            turn = Turn(message_id=f"m{i:03d}", sender_id=sender, sender_name=pool.speakers[picks[i]],
                        sent_at=at, text=pool.texts[picks[i]], vector=noisy[i])
            members.append(turn)
            at += timedelta(minutes=2)
        engine.state.put_turns(tenant, conversation, [(t, None, (0.0, "synthetic")) for t in members])
        record = FragmentRecord(ids.fragment_id(tenant, conversation, members[0].message_id), tenant, conversation,
                                tuple(t.message_id for t in members), members[0].sent_at, members[-1].sent_at)
        engine.state.put_fragments([record])
        units.extend(fragment_units(record, members, participants or [EVERYONE]))
        at += timedelta(hours=1)
    return units


def sample_queries(pool: Pool, layout: Layout, count: int, seed: int = 11) -> list[tuple[str, str, str]]:
    """(tenant, user, query) triples: a user of a conversation asks with words of one of its turns."""
    return [(tenant, user, text) for tenant, user, text, _ in _asks(pool, layout, count, seed)]


#: What a filtered query (``sample_filtered``) narrows to, in turn: one of the user's conversations, what one
#: person of it sent, or a quarter of the corpus's two years.
FILTER_KINDS = ("conversation", "participant", "time")


def sample_filtered(pool: Pool, layout: Layout, count: int, seed: int = 13) -> list[tuple[str, str, str, str, dict]]:
    """(tenant, user, query, filter kind, ``QueryFilters`` fields): the searches that read the payload indexes
    of conversations, senders and times, which unfiltered searches never touch."""
    rnd = random.Random(seed)
    out = []
    for i, (tenant, user, text, c) in enumerate(_asks(pool, layout, count, seed)):
        kind = FILTER_KINDS[i % len(FILTER_KINDS)]
        if kind == "conversation":
            filters = {"conversation_id": conversation_id(c)}
        elif kind == "participant":
            filters = {"participants": [rnd.choice(layout.participants(c) or [user])]}
        else:
            after = START + timedelta(days=rnd.randrange(2 * 365 - 91))
            filters = {"sent_after": after.isoformat(), "sent_before": (after + timedelta(days=91)).isoformat()}
        out.append((tenant, user, text, kind, filters))
    return out


def _asks(pool: Pool, layout: Layout, count: int, seed: int) -> list[tuple[str, str, str, int]]:
    rnd = random.Random(seed)
    out = []
    while len(out) < count:
        c = rnd.randrange(layout.conversations)
        participants = layout.participants(c) or [f"user-{rnd.randrange(layout.users):03d}"]
        words = pool.texts[rnd.randrange(len(pool.texts))].split()
        if len(words) < 4:
            continue
        take = words[:rnd.randint(4, 10)]
        out.append((layout.tenant(c), rnd.choice(participants), " ".join(take), c))
    return out


def conversation_id(c: int) -> str:
    return f"conv-{c:07d}"

