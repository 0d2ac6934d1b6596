"""The embedded vector and BM25 stores on Qdrant's own engine (``qdrant-edge-py``): no server, one process.

One shard per unit kind under ``path`` (``turn``, ``window``; ``fragment`` in data dirs written before
fragments stopped being units), so a search touches only the points of its kind; with the keyword store on the
same engine, the vector store's window points also hold the BM25 terms of the window and of its turn
(``window_bm25``): a turn and its window share a payload, so a message is one point for the three lists. The
configuration follows what was measured on this machine (issue 17: random 384-d vectors, a tenant AND participant
filter, top 30) and what the data looks like:

* Every search carries a selective filter (tenant, then the user's conversations), so the points
  to score are found through payload indexes (keyword indexes on the scope word, the tenant,
  conversation and senders, float indexes on the times) and scored exactly. No HNSW graph is built
  (``m=0``): building it took 393 of 413 s of ingest at 100k points and bought nothing for such
  filters.
* ``full_scan_threshold`` is set far above any shard size when the shard is created (it is fixed
  in the segments then): without a graph, a filter estimated above the threshold would search the
  empty graph and find almost nothing (recall 0.005 for a tenant-only filter at 1M points).
* Vectors are quantized once the optimizer has turned a segment immutable, to 4 bits a dimension by TurboQuant
  (``QUANTIZATION``; a random rotation, then a scalar code per coordinate), and searches score the quantized copy
  alone (``SEARCH``). On the dev split (one ingest, every shard optimized) recall@10 / MRR 0.815 / 0.640, as a
  messy chat 0.792 / 0.625, against int8's 0.813 / 0.639 and 0.790 / 0.628; TurboQuant at 2 bits lost on the
  messy chat (0.782 / 0.619), binary codes of 2 bits on both (0.807 / 0.631, 0.778 / 0.614). A window's vector
  takes 192 bytes instead of 384: at 100k fragments RSS querying 764 against 828 MiB, p50 10.1 and 9.2 against
  10.7 and 9.3 ms (paired). A segment quantized otherwise (data dirs written before) is rebuilt by the next run
  of the optimizer, which rebuilds segments whose configuration is not the shard's; it is searched as it is
  until then. Rescoring the candidates with the originals changed no dev-split figure (with int8: recall@10
  0.812, MRR 0.6234 against 0.6237) but read 2 x limit original vectors at random per list: with a 100k-fragment
  one-tenant corpus held to 1.5 GB of memory by a cgroup (page cache included), the dense window list took p50
  45 ms with it, 10 ms without.
* The originals are read only by the optimizer, so they stay on disk (``Memory.Cold``, ``_vector_params``):
  cached, they were read into memory when a shard loaded (733 of the 3,084 MiB RSS of that corpus).
* The optimizer lays a segment's points out by tenant and conversation (``_CLUSTERED``): a user's points then sit
  in runs, one a conversation, rather than spread over the tenant's pages. Warm, searches are as fast (100k
  fragments, p50 9.4 to 9.8 against 9.3 to 9.5 ms); with the process held to 1 GB by a memory cgroup, page cache
  included, the pages a query reads fit better: p95 32 to 34 against 43 to 44 ms, p99 55 to 61 against 178 to 182.
* The rest of an immutable segment is memory-mapped and cached (``INDEX_MEMORY``): quantized vectors,
  payloads and payload indexes. The process's own memory is then little more than the
  appendable segments, and the pages of the files are the kernel's to drop under pressure: at 10k
  fragments the two stores held 144 MB of anonymous memory with the indexes and int8 vectors pinned
  in RAM, 16 MB mapped, with searches as fast.
* The engine runs no optimizer in the background: the store runs it after ``OPTIMIZE_EVERY`` points written to
  a shard, then each time the shard has doubled (``_written``), so points leave the appendable segment for
  immutable, quantized ones and deleted points are vacuumed; without it nothing was ever quantized. A bulk
  load ends with ``refresh``, which runs it over what is still appendable.
* A search reads no payload: a window hit comes back with its point id and its keys (``KEYS_VECTOR``, 12 bytes
  a point: the fragment's and the sender's, ``hit_keys``), which is all fusion reads of the 400 hits of a query,
  and the payloads of the 30 to 60 candidates it keeps are read after, in one read (``WindowHit``,
  ``read_payloads``). So window payloads stay on disk (``_payload_memory``): cached, they were read in when a
  shard loaded, 1.4 GB of the 4.5 GB resident querying 1M fragments. 500 queries and 150 narrowed ones, each
  way twice in alternation from a cold page cache: at 1M fragments RSS querying 3,035 / 3,038 against 4,486 MiB,
  p50 34.2 / 29.3 against 31.4 / 30.1 ms (recall stage 19.8 / 17.3 against 20.4 / 19.2, fusion 8.7 / 7.2
  against 5.4 / 5.3: the kept payloads are read from disk at first touch); at 100k 541 / 540 against 721 / 726
  MiB, p50 21.5 / 17.4 against 18.5 / 18.9 ms. Earlier, with every
  hit's payload read in the search, cold payloads had cost p50 74 against 46 ms on a one-tenant corpus. A
  payload read names one field (``HIT``, ``pack_hit``): the engine's cost of reading a payload is per field and
  hit (a dense list of 200 hits at 100k fragments took 3.7 to 7.3 ms naming the five ``HIT_FIELDS``, 2.4 to 2.6
  ms naming one, 1.3 ms naming none).
* The lists of a query are one batch of the window shard (``EdgeBM25Store.search_batch``: a search holds the
  GIL, so Python threads would only queue), on one engine thread per immutable segment (``SEARCH_THREADS``; the
  optimizer keeps that many, ``SEGMENTS``): the BM25 turn list of a 100k-fragment, one-tenant corpus took 3.8 ms
  on two segments and two threads against 7.3 ms on one segment, with the same scores.

The payload holds ids, participants and times, never text; the BM25 shards hold hashed term ids and weights
and the vector shards embeddings, both of which can be turned back into words, so an erasure rebuilds every
segment that holds an erased point and turns the write-ahead log over first (``compact``, ``turn_log_over``):
the log keeps its last 32 MiB segments, erased points' operations included, until later writes push them out.
A shard without a log (``wal_enabled=False``, fixed when the shard is created) would need each write flushed
before it returns: streaming one event at a time into the dev split then took 12 events/s against 104 with the
log. A shard deletes only the ids it holds, so no other shard's log ever names an erased unit. A store directory
has one owner at a time (``_own``): the multi-process local stack uses the ``sqlite`` store or a Qdrant server.
"""

from __future__ import annotations

import logging
import os
import shutil
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
from qdrant_edge import (
    Bm25, Bm25Config, CountRequest, Distance, EdgeConfig, EdgeOptimizersConfig, EdgeShard, EdgeSparseVectorParams,
    EdgeVectorParams, FieldCondition, Filter, FloatIndexParams, HasVectorCondition, HnswIndexConfig, IdfParams,
    KeywordIndexParams, MatchAny, MatchValue, Memory, Modifier, Point, PointVectors, QuantizationSearchParams, Query,
    QueryBatchRequest, QueryRequest, RangeFloat, ScrollRequest, SearchParams, SparseVector, TurboQuantBitSize,
    TurboQuantQuantizationConfig, UpdateOperation, VectorStorageDatatype,
)

from indexer import ids
from indexer.model import EVERYONE, INGESTED_KINDS, UNIT_KINDS, Hit, SearchFilter, Unit
from indexer.stores.base import check_vectors
from indexer.text import chat_text

log = logging.getLogger("tessera.stores")

TEXT_VECTOR = "text"
IMAGE_VECTOR = "image"
#: Far above any shard: filtered searches always take the payload-index path, never the empty graph.
FULL_SCAN_THRESHOLD = 2**31 - 1
#: Points per update operation: bounds the memory of one WAL record.
UPSERT_BATCH = 1024
#: Points written to a shard (upserted or deleted) before its optimizer first runs; later runs wait until the
#: shard has taken as many points again as it held at the last run (``_written``).
OPTIMIZE_EVERY = 20_000
#: Most points written to a shard between two optimizer runs, however large the shard: they wait in the appendable
#: segment, float vectors and indexes in the process's own memory, so this bounds a bulk load's memory (``_written``).
MAX_APPENDABLE = 500_000
#: Segment size (KiB of vectors) above which the optimizer turns a segment immutable; 1: any segment it is run on.
INDEXING_THRESHOLD_KB = 1
#: Keyword payload indexes: the fields filters name (``build_filter``), beside ``tenant_id`` (counts).
#: ``fragment_id`` stays in the payload unindexed: no filter names it, and indexing it (with the ``visible_to`` the
#: payload held then) cost 12% of the index's memory at 10k fragments (966 against 1102 MB RSS).
_KEYWORDS = ("scope", "conversation_id", "sender_ids")
#: One time index: a point searched is one turn's, sent at one time (``start_ts`` == ``end_ts``), so both bounds of a
#: filter are a range on ``start_ts`` (``build_filter``); the ``end_ts`` index of data dirs written before goes
#: (``_DROPPED``). At 1M fragments each time index held about 190 MiB resident.
_FLOATS = ("start_ts",)
_DROPPED = ("end_ts",)
#: Keyword indexes marked ``is_tenant``: the optimizer lays the points of a segment out in the order of these
#: fields' values, so the points of one conversation sit together in every file a search reads.
_CLUSTERED = ("tenant_id", "conversation_id")
#: Payload indexes no search reads: the tenant's serves counts and the segment layout (``_CLUSTERED``).
_UNSEARCHED = ("tenant_id",)


#: Joins tenant and principal in a scope keyword; identifiers cannot hold it (``schemas.ID_PATTERN``).
SCOPE_SEPARATOR = "\x1f"


def scope(tenant_id: str, principal: str) -> str:
    """One keyword per (tenant, principal): "everyone in tenant A" is a different word from tenant B's.

    A separator inside either part could make two pairs one word, so it is refused (fail closed)."""
    if SCOPE_SEPARATOR in tenant_id or SCOPE_SEPARATOR in principal:
        raise ValueError(f"identifier contains U+001F: {tenant_id!r}, {principal!r}")
    return f"{tenant_id}{SCOPE_SEPARATOR}{principal}"


#: The payload field a hit reads back: ``HIT_FIELDS`` packed in one string (``pack_hit``).
HIT = "hit"
#: Separate the fields of a packed hit and the ids of a list field; identifiers cannot hold either.
_FIELD, _ITEM = "\x1f", "\x1e"


def pack_hit(conversation_id: str, fragment_id: str, message_ids: Sequence[str], sender_ids: Sequence[str],
             start_ts: float) -> str:
    """``HIT_FIELDS`` as one string; an identifier holding a separator would shift the fields, so it is refused."""
    messages, senders = _ITEM.join(message_ids), _ITEM.join(sender_ids)
    packed = _FIELD.join((conversation_id, fragment_id, messages, senders, repr(float(start_ts))))
    if packed.count(_FIELD) != 4 or packed.count(_ITEM) != max(len(message_ids) - 1, 0) + max(len(sender_ids) - 1, 0):
        raise ValueError(f"identifier contains U+001E or U+001F: {conversation_id!r}, {fragment_id!r},"
                         f" {list(message_ids)!r}, {list(sender_ids)!r}")
    return packed


def unpack_hit(packed: str) -> dict:
    conversation_id, fragment_id, messages, senders, start_ts = packed.split(_FIELD)
    return {"conversation_id": conversation_id, "fragment_id": fragment_id, "message_ids": messages.split(_ITEM),
            "sender_ids": senders.split(_ITEM) if senders else [], "start_ts": float(start_ts)}


#: One point in this many is in the IDF sample (``in_idf_sample``).
IDF_SAMPLE_EVERY = 16
#: Points of the sample a user must see before IDF is counted over the sample instead of all they see: from
#: about 16,000 visible points, a quarter of what a user of the 1M-fragment bench corpus sees.
IDF_SAMPLE_MIN = 1000


def in_idf_sample(unit_id: str) -> bool:
    """Whether the point counts in a sampled IDF (``EdgeBM25Store._idf_corpus``): fixed by its id, so a point
    written again stays in or out, and spread evenly over tenants, conversations and times."""
    return zlib.crc32(unit_id.encode()) % IDF_SAMPLE_EVERY == 0


def sample_word(scope_word: str) -> str:
    """The scope word of a point in the IDF sample, kept beside the point's scope words in ``scope``: no scope
    word ends in the separator (identifiers cannot hold it), so a filter on scope words never matches it. One
    more word in the same index, not an index of its own: a keyword index keeps an entry for every point of a
    segment, and a separate one took 97 MiB of RSS at 1M fragments."""
    return scope_word + SCOPE_SEPARATOR


def scope_words(unit_id: str, scopes: Sequence[str]) -> list[str]:
    """A point's ``scope`` field: its scope words, and their sample words where the point is in the IDF sample."""
    return list(scopes) + ([sample_word(w) for w in scopes] if in_idf_sample(unit_id) else [])


def payload_of(unit: Unit) -> dict:
    """What filters read (``build_filter``, the tenant), with visibility as scope keywords, and the packed hit.

    Nothing more: each string of a payload cost the binding 5 to 8 µs to take in (a unit's full payload 91 µs,
    five times its vector), and the kind (one shard per kind) and ``visible_to`` (its scope words) say nothing new.
    Points of the IDF sample have their sample words among the scope words (``scope_words``).
    """
    return {"tenant_id": unit.tenant_id, "conversation_id": unit.conversation_id, "sender_ids": unit.sender_ids,
            "start_ts": unit.start_ts, "end_ts": unit.end_ts,
            "scope": scope_words(unit.unit_id, [scope(unit.tenant_id, p) for p in unit.visible_to]),
            HIT: pack_hit(unit.conversation_id, unit.fragment_id, unit.message_ids, unit.sender_ids, unit.start_ts)}


def build_filter(flt: SearchFilter) -> Filter:
    """Visibility as "the user's scope word or the tenant's everyone word" (``should``: at least one), the
    other conditions as ``must``. A scope word is an unambiguous tenant and principal, so its index yields
    exactly the points the user may see, each checked once. Two ``should`` matches walk those points faster
    than one ``MatchAny`` of both words (at 100k fragments, 6,000 visible turns: a dense list 3.2 against
    4.0 ms, a BM25 list 2.1 against 2.9 ms); conditions on ``tenant_id`` and the participants beside it select
    nothing more but are checked per visible point (at 100k fragments six lists took 40 ms with them instead
    of 27). Times are one range on ``start_ts``: every point searched is one turn's (``_FLOATS``)."""
    must = []
    if flt.conversation_id:
        must.append(FieldCondition(key="conversation_id", match=MatchValue(value=flt.conversation_id)))
    if flt.sender_ids:
        must.append(FieldCondition(key="sender_ids", match=MatchAny(any=list(flt.sender_ids))))
    if flt.sent_after is not None or flt.sent_before is not None:
        must.append(FieldCondition(key="start_ts", range=RangeFloat(gte=flt.sent_after, lte=flt.sent_before)))
    return Filter(must=must or None, should=_visible(flt))


def _visible(flt: SearchFilter, sample: bool = False) -> list[FieldCondition]:
    """What the user may see: their scope word or the tenant's everyone word (``should``: at least one);
    ``sample``: what of it is in the IDF sample (their sample words)."""
    words = [scope(flt.tenant_id, principal) for principal in (flt.user_id, EVERYONE)]
    return [FieldCondition(key="scope", match=MatchValue(value=sample_word(w) if sample else w)) for w in words]


#: Threads a search of one shard runs on, one per immutable segment: the segments of a shard are searched in
#: parallel inside the engine, outside the GIL.
SEARCH_THREADS = max(1, min(os.cpu_count() or 1, 8))
#: Immutable segments the optimizer merges a shard down to, one per search thread, plus the appendable one; it
#: merges no segment past its largest size (about 500,000 points here), so the window shard of the 1M-fragment
#: bench corpus keeps 11. Merged into two (``max_segment_size`` raised, 7.5 minutes), that corpus answered slower
#: from a cold start (500 queries from the demo chats, in alternation): p50 24.8 and 31.0 against 21.3 and 23.4 ms,
#: RSS 4,289 against 4,426 and 4,483 MiB.
SEGMENTS = SEARCH_THREADS + 1
_OPTIMIZERS = EdgeOptimizersConfig(deleted_threshold=0.2, vacuum_min_vector_number=1000,
                                   indexing_threshold=INDEXING_THRESHOLD_KB, default_segment_number=SEGMENTS)
#: After an erasure: every segment holding a deleted point is rebuilt without it (``_Shards.compact``).
_VACUUM_ALL = EdgeOptimizersConfig(deleted_threshold=0.0, vacuum_min_vector_number=0,
                                   indexing_threshold=INDEXING_THRESHOLD_KB, default_segment_number=SEGMENTS)


def _vector_params(size: int) -> EdgeVectorParams:
    """Original vectors: read by the optimizer (and searched while a segment is appendable), never by searches of
    an immutable segment (``SEARCH``)."""
    return EdgeVectorParams(size=size, distance=Distance.Cosine, memory=Memory.Cold)


#: Dense searches of immutable segments score the quantized vectors only (no rescoring with the originals).
SEARCH = SearchParams(quantization=QuantizationSearchParams(rescore=False))


class PointHit(Hit):
    """A hit of the engine whose unit id is read from its point only when asked.

    A query's lists bring back about a thousand hits, and fusion never asks for their ids; making each a
    string (a ``uuid.UUID`` built in Python, then printed) cost 2.6 µs a hit, 3 ms of a 19 ms query at
    10k fragments. The payload is ``HIT_FIELDS``, unpacked from the one field the engine read (``HIT``).
    """

    __slots__ = ("_point",)

    def __init__(self, point):
        object.__setattr__(self, "_point", point)
        object.__setattr__(self, "score", float(point.score))
        object.__setattr__(self, "payload", unpack_hit(point.payload[HIT]))

    @property
    def unit_id(self) -> str:
        return str(self._point.id)


#: A window point's fusion keys (``hit_keys``): what a search reads back instead of the payload.
KEYS_VECTOR = "keys"
#: Marks a store directory whose window points all hold ``KEYS_VECTOR`` (``EdgeVectorStore._fill_keys``).
KEYS_MARKER = "keys"


def hit_keys(fragment_id: str, sender_ids: Sequence[str]) -> list[float]:
    """``ids.fragment_key`` in two 24-bit halves and ``ids.sender_key`` of the turn's sender, as floats (exact below
    2**24). A window is one turn's, so one sender; a unit without one keys 0."""
    fragment = ids.fragment_key(fragment_id)
    sender = ids.sender_key(sender_ids[0]) if sender_ids else 0
    return [float(fragment >> 24), float(fragment & 0xFFFFFF), float(sender)]


def _payload_memory(kind: str) -> Memory:
    """Window payloads stay on disk: searches read keys (``WindowHit``), and payloads only of the candidates fusion
    keeps. A turn shard's hits (image lists) read theirs."""
    return Memory.Cold if kind == "window" else Memory.Cached


def _keys_of(packed: str) -> list[float]:
    hit = unpack_hit(packed)
    return hit_keys(hit["fragment_id"], hit["sender_ids"])


def _keys_params() -> EdgeVectorParams:
    """12 bytes a point, mapped and cached: read back with every hit. Never searched (``Euclid``: stored as
    given, where ``Cosine`` would normalise), so the quantized copy the shard's quantization makes of every dense
    vector stays on disk (no setting leaves it out): cached, it held 7 MiB of 13 at 100k fragments."""
    return EdgeVectorParams(size=3, distance=Distance.Euclid, memory=INDEX_MEMORY,
                            quantization_config=TurboQuantQuantizationConfig(bits=TurboQuantBitSize.Bits4,
                                                                             memory=Memory.Cold))


class WindowHit(Hit):
    """A hit of a window point, scored by the keys kept beside it (``KEYS_VECTOR``); its payload is read only when
    asked (``stores.base.describe``, ``reader``). Fusion keeps a few of a query's 400 hits, so the payloads stay
    on disk (``_payload_memory``): at 1M fragments they were 1.4 GB of the 4.5 GB resident while querying.
    A point written before it held keys is scored from its payload."""

    __slots__ = ("_point", "_payload", "_keys", "reader")

    def __init__(self, point, reader):
        object.__setattr__(self, "_point", point)
        object.__setattr__(self, "score", float(point.score))
        object.__setattr__(self, "reader", reader)
        object.__setattr__(self, "_payload", None)
        vector = point.vector
        object.__setattr__(self, "_keys", vector.get(KEYS_VECTOR) if vector else None)

    @property
    def unit_id(self) -> str:
        return str(self._point.id)

    @property
    def described(self) -> bool:
        return self._payload is not None

    @property
    def payload(self) -> dict:
        if self._payload is None:
            self.reader([self])
        return self._payload

    def turn_key(self, tenant_id: str) -> int:
        """The point is the turn's window: its id is the key (``ids.turn_key``)."""
        return self._point.id.int

    @property
    def fragment_key(self) -> int:
        if self._keys is None:
            return super().fragment_key
        return int(self._keys[0]) << 24 | int(self._keys[1])

    @property
    def sender_keys(self) -> tuple[int, ...]:
        if self._keys is None:
            return super().sender_keys
        return (int(self._keys[2]),)


class TurnHit(WindowHit):
    """A hit of the turn list searched on window points (``TURN_BM25_VECTOR``): its unit id is the turn's."""

    __slots__ = ("_tenant_id",)

    def __init__(self, point, reader, tenant_id: str):
        super().__init__(point, reader)
        object.__setattr__(self, "_tenant_id", tenant_id)

    @property
    def unit_id(self) -> str:
        hit = self.payload
        return ids.turn_unit_id(self._tenant_id, hit["conversation_id"], hit["message_ids"][0], "turn")


#: Marks a store directory whose shards are all in today's layout (``LAYOUT``); earlier ones are migrated on open.
LAYOUT_MARKER = "layout"
#: 2: the packed hit (``HIT``) and memory-mapped payload indexes and int8 vectors (``INDEX_MEMORY``);
#: 3: the IDF sample (``sample_word``).
LAYOUT = "3"
#: Where immutable segments keep their payload indexes and quantized vectors: mapped files the kernel caches.
INDEX_MEMORY = Memory.Cached
#: How immutable segments keep their dense vectors for searches: 4 bits a dimension.
QUANTIZATION = TurboQuantQuantizationConfig(bits=TurboQuantBitSize.Bits4, memory=INDEX_MEMORY)
#: Fields earlier layouts wrote that today's payload leaves out (``payload_of``); a migration removes them.
_EARLIER_FIELDS = ["kind", "visible_to", "fragment_id", "message_ids"]


def open_shard(directory: Path, config: EdgeConfig) -> EdgeShard:
    """Load the shard in ``directory``, or create it with ``config`` and the payload indexes every filter uses.

    A loaded shard takes ``config`` too (the engine checks that its vectors match): a data dir written with
    earlier tunables (the optimizer's) runs on today's. A shard of an earlier layout is migrated unless its
    store directory says its layout is today's: hits packed and the IDF sample marked (``_migrate_payloads``),
    payload indexes made again with today's parameters, and every segment rebuilt by the optimizer, which
    rebuilds segments whose configuration differs from the shard's (the int8 vectors' memory): for the
    100k-fragment bench corpus, after packing its hits, 2.5 minutes for both stores."""
    if (directory / "edge_config.json").exists():
        shard = EdgeShard.load(str(directory), config)
        if not _layout_is_current(directory.parent):
            log.warning("migrating %s to layout %s (once, for this data dir: 11 minutes for the window shard of a"
                        " 1M-fragment corpus)", directory, LAYOUT)
            _migrate_payloads(shard)
            _index_payload(shard)
            shard = optimized(shard, directory)
        elif not _indexed_as_today(shard):
            _index_payload(shard)
        return shard
    shard = EdgeShard.create(str(directory), config)
    _index_payload(shard)
    return shard


def optimized(shard: EdgeShard, directory: Path, run_with: EdgeConfig | None = None,
              config: EdgeConfig | None = None) -> EdgeShard:
    """Run the shard's optimizer, then load the shard again: the engine keeps in memory what a run built
    until the shard is loaded from its files (a 10k-fragment build peaked at 482 MiB of the process's own
    memory without the reload, 229 MiB with it; the loaded shard maps the same segments).

    ``run_with``: the configuration of this run only (the shard is loaded with it first), the shard then
    goes on with ``config`` (None: the one it has)."""
    if run_with is not None:
        shard.close()
        shard = EdgeShard.load(str(directory), run_with)
    shard.optimize()
    shard.flush()
    shard.close()
    return EdgeShard.load(str(directory), config)


#: Payload of one operation that turns the write-ahead log over (``turn_log_over``), MiB.
_TURN_OVER_MB = 8
#: Most the log is padded per shard before it is called stuck: its segments are 32 MiB, and three turn over.
_TURN_OVER_LIMIT_MB = 1024
#: Point the padding is written to: unit points have UUIDs, so an integer id is never a unit's.
_TURN_OVER_POINT = 0


def _log_position(directory: Path) -> tuple[int, list[int]]:
    """The last operation the shard's write-ahead log has acknowledged as flushed, and where each of its closed
    segments starts: the log names a closed segment ``closed-<index of its first operation>`` and keeps the
    acknowledged index in ``first-index``. A log not written that way fails the erasure (``turn_log_over``)."""
    import json

    wal = directory / "wal"
    try:
        acknowledged = int(json.loads((wal / "first-index").read_text())["ack_index"])
        starts = [int(p.name[len("closed-"):]) for p in wal.iterdir() if p.name.startswith("closed-")]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RuntimeError(f"{wal}: cannot tell which operations the write-ahead log holds ({e}); erased units'"
                           " operations may still be in it") from None
    return acknowledged, starts


def turn_log_over(shard: EdgeShard, directory: Path) -> int:
    """Write padding until no log segment holds an operation written so far; returns the MiB written. The engine
    drops a closed segment once later writes have filled the next one and the shard is flushed, so an erased
    unit's operations (its vectors and hashed terms) would otherwise stay in the log. Every operation up to the
    one acknowledged now has left the log once every closed segment starts after it (the open segment follows
    the closed ones; the segments allocated ahead are new, zero-filled files). The padding is one point's
    payload, written over and deleted: 64 to 96 MiB a shard, about 0.2 s."""
    shard.flush()
    erased, starts = _log_position(directory)
    pad = {"pad": "x" * (_TURN_OVER_MB << 20)}
    written = 0
    while not starts or min(starts) <= erased:
        if written >= _TURN_OVER_LIMIT_MB:
            raise RuntimeError(f"{directory / 'wal'}: the write-ahead log kept its segments after {written} MiB of"
                               " padding; erased units' operations may still be in it")
        for _ in range(4):
            shard.update(UpdateOperation.upsert_points([Point(id=_TURN_OVER_POINT, vector={}, payload=pad)]))
        written += 4 * _TURN_OVER_MB
        shard.flush()
        _, starts = _log_position(directory)
    if written:
        shard.update(UpdateOperation.delete_points([_TURN_OVER_POINT]))
        shard.flush()
    return written


def _index_memory(key: str) -> Memory:
    """Where a payload index lives: mapped and cached (``INDEX_MEMORY``) when filters read it, on disk when only
    counts do (``_UNSEARCHED``). 1M-fragment corpus, 500 searches and 150 filtered ones: RSS 5,062 against 5,226
    MiB with the tenant index cached, as fast. The indexes only filtered searches read (conversation, senders,
    times) on disk too: RSS 4,700 MiB, but a search by sender took p50 71 / 73 against 43 / 45 ms, p99 up to 1.6 s."""
    return Memory.Cold if key in _UNSEARCHED else INDEX_MEMORY


def _index_payload(shard: EdgeShard) -> None:
    """The payload indexes every filter uses; an index of the same field with other parameters is replaced."""
    for key in ("tenant_id", *_KEYWORDS):
        shard.update(UpdateOperation.create_field_index(key, KeywordIndexParams(is_tenant=key in _CLUSTERED,
                                                                                memory=_index_memory(key))))
    for key in _FLOATS:
        shard.update(UpdateOperation.create_field_index(key, FloatIndexParams(memory=_index_memory(key))))
    for key in _DROPPED:
        if key in shard.info().payload_schema:
            shard.update(UpdateOperation.delete_field_index(key))


def _indexed_as_today(shard: EdgeShard) -> bool:
    """Whether the shard's payload indexes have today's parameters: shards created before the conversation was
    among ``_CLUSTERED`` or before the tenant index stayed on disk get their indexes made again when opened, and
    the segments the optimizer builds from then on (every one after ``tessera reindex``) take the layout."""
    schema = shard.info().payload_schema

    def as_today(key: str) -> bool:
        params = schema[key].params if key in schema else None  # an index made from a schema type has none
        return (params is not None and bool(getattr(params, "is_tenant", False)) == (key in _CLUSTERED)
                and str(getattr(params, "memory", None)) == str(_index_memory(key)))

    return (all(as_today(key) for key in ("tenant_id", *_KEYWORDS, *_FLOATS))
            and not any(key in schema for key in _DROPPED))


def _layout_is_current(store: Path) -> bool:
    marker = store / LAYOUT_MARKER
    return marker.exists() and marker.read_text().strip() == LAYOUT


def _mark_layout(store: Path) -> None:
    """Written once every shard of ``store`` is in today's layout: until then, a reopened store migrates again."""
    (store / LAYOUT_MARKER).write_text(LAYOUT + "\n")


def _migrate_payloads(shard: EdgeShard, batch: int = UPSERT_BATCH) -> int:
    """Give every point of a shard written before the packed hit its ``HIT`` field, from the fields earlier
    layouts kept, and drop those fields; give the points of the IDF sample written before it their sample words;
    no vector is read or written. Idempotent: an interrupted migration runs again on the next open. The engine
    moves an updated point out of its immutable segment, so the shard is optimized again after (``open_shard``).
    The 100k-fragment bench corpus (2.2 million points in the two stores) took 7 minutes to pack, peak RSS 6.6 GB:
    a one-off, against a reindex from the state."""
    moved, offset = 0, None
    while True:
        records, offset = shard.scroll(ScrollRequest(offset=offset, limit=batch, with_payload=True, with_vector=False))
        earlier = []
        for record in records:
            payload = record.payload or {}
            fields = {}
            if HIT not in payload:
                fields[HIT] = pack_hit(payload["conversation_id"], payload["fragment_id"], payload["message_ids"],
                                       payload["sender_ids"], payload["start_ts"])
            words = payload.get("scope", [])
            wanted = scope_words(str(record.id), [w for w in words if not w.endswith(SCOPE_SEPARATOR)])
            if words != wanted:
                fields["scope"] = wanted
            if fields:
                shard.update(UpdateOperation.set_payload([record.id], fields))
                moved += 1
            if not payload.keys().isdisjoint(_EARLIER_FIELDS):
                earlier.append(record.id)
        if earlier:  # an update moves a point out of its immutable segment: only the points that need it
            shard.update(UpdateOperation.delete_payload(earlier, _EARLIER_FIELDS))
        if offset is None:
            return moved


#: The file a store directory's owner holds an exclusive lock on (``_Shards._own``).
LOCK_FILE = "lock"


class _Shards:
    """One shard per unit kind; deletes, counts and maintenance are the same for vectors and keywords."""

    shards: dict[str, EdgeShard]
    optimize_every: int
    max_appendable: int
    _pending: dict[str, int]
    _optimized: dict[str, int]

    def _batches(self, units: Sequence[Unit], point) -> None:
        points: dict[str, list[Point]] = {kind: [] for kind in UNIT_KINDS}
        for unit in units:
            if unit.kind not in points:
                raise ValueError(f"unit {unit.unit_id}: unknown kind {unit.kind!r}")
            points[unit.kind].append(point(unit))
        for kind, batch in points.items():
            if not batch:
                continue
            if kind not in self.shards:
                self._add_shard(kind)
            for start in range(0, len(batch), UPSERT_BATCH):
                self.shards[kind].update(UpdateOperation.upsert_points(batch[start:start + UPSERT_BATCH]))
            self._written(kind, len(batch))

    def delete(self, unit_ids: Sequence[str]) -> None:
        """A unit id does not name its kind: each shard deletes the ids it holds, and a shard that holds none
        writes nothing (its log would keep the ids until an erasure turns it over, ``compact``)."""
        if unit_ids:
            for kind, shard in self.shards.items():
                held = [record.id for record in shard.retrieve(list(unit_ids), with_payload=False, with_vector=False)]
                if held:
                    shard.update(UpdateOperation.delete_points(held))
                    self._deleted[kind] += len(held)
                    self._written(kind, len(held))

    def _written(self, kind: str, points: int) -> None:
        """Run the shard's optimizer once the points written since its last run reach ``optimize_every`` and
        the number the shard held then: the engine has no background optimizer, and without runs every point
        stayed in the first appendable segment, never quantized, its deletes never vacuumed (at 100k fragments
        4,288 MiB RSS querying, against 3,436 MiB optimized). A run merges the shard into about one segment per
        core, so its cost grows with the shard; waiting for the shard to double keeps the total at about twice
        the points (the 100k build took 791 s against 639 without runs; running every 20,000 points with eight
        segments kept took 1,062 s and a 25 GB peak RSS against 14 GB). But a doubling shard keeps up to half its
        points appendable, in the process's own memory (13.4 GB at the peak of the 1M-fragment build), so runs
        come at least every ``max_appendable`` points: the 100k build (500,000 points a shard) capped at 25,000
        peaked at 414 MiB of its own memory against 1,087, but took 618 s against 319, since each run of a large
        shard merges segments (15 s a run at 500,000 points)."""
        self._pending[kind] += points
        if self._pending[kind] >= max(self.optimize_every, min(self._optimized[kind], self.max_appendable)):
            self._run_optimizer(kind)

    def optimize(self, progress=None) -> list[str]:
        """Run the optimizer on every shard, written to or not, and return their kinds (``progress(kind)`` after
        each): segments built with another configuration than today's (int8 vectors, BM25 indexes on the heap:
        data dirs written before) are rebuilt, which a store that is only read never gets otherwise (``refresh``
        runs the shards written since their optimizer last ran, the optimizer runs as writes come, ``_written``).
        The 1M-fragment corpus's window shard took 449 s for the BM25 indexes, 500 s for the vectors."""
        for kind in list(self.shards):
            self._run_optimizer(kind)
            if progress is not None:
                progress(kind)
        return list(self.shards)

    def _run_optimizer(self, kind: str) -> None:
        """Optimize a shard and start counting what is written to it afresh (``_written``)."""
        self.shards[kind] = optimized(self.shards[kind], self.path / kind)
        self._optimized[kind] = self.shards[kind].info().points_count
        self._pending[kind] = 0

    def _config(self, kind: str, optimizers: EdgeOptimizersConfig = _OPTIMIZERS) -> EdgeConfig:
        raise NotImplementedError

    def _open_shards(self, open_one, optimize_every: int, max_appendable: int,
                     kinds: Sequence[str] = INGESTED_KINDS, elsewhere: Sequence[str] = ()) -> None:
        """Own the store directory, then open a shard per kind in ``kinds`` and per other kind the directory holds
        (fragment units of data dirs written before, which deletes must reach) but those another store holds
        (``elsewhere``); a shard that fails to open lets the directory go. A shard of another kind opens when a unit
        of it is written (``_add_shard``): an empty shard maps 17 MB of write-ahead log and takes a look-up in
        every delete."""
        self._own()
        self._open_one = open_one
        try:
            self.shards = {kind: open_one(kind) for kind in UNIT_KINDS
                           if kind not in elsewhere and (kind in kinds or (self.path / kind).exists())}
        except BaseException:
            self._lock.close()
            raise
        self._opened(optimize_every, max_appendable)

    def _add_shard(self, kind: str) -> None:
        self.shards[kind] = self._open_one(kind)
        self._pending[kind] = self._deleted[kind] = self._optimized[kind] = 0

    def _own(self) -> None:
        """Take the store directory for this store alone, before any shard is opened: two writers of one shard
        would corrupt it, and the engine's own lock (on a shard's log) neither names the cause nor covers shards
        created without a log. The lock goes with the process."""
        import fcntl

        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.path / LOCK_FILE, "a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise RuntimeError(f"{self.path} is open in another process (or another store of this one); the"
                               " multi-process local stack uses TESSERA_VECTOR_STORE=sqlite") from None

    def _opened(self, optimize_every: int, max_appendable: int) -> None:
        """Every shard is open, so in today's layout; a shard opened with points counts them as optimized: a
        restart does not rewrite it."""
        if not _layout_is_current(self.path):
            _mark_layout(self.path)
        self.optimize_every, self.max_appendable = optimize_every, max_appendable
        self._pending = dict.fromkeys(self.shards, 0)
        self._deleted = dict.fromkeys(self.shards, 0)
        self._optimized = {kind: shard.info().points_count for kind, shard in self.shards.items()}

    def count(self, tenant_id: str | None = None) -> int:
        flt = None if tenant_id is None else _tenant(tenant_id)
        return sum(shard.count(CountRequest(exact=True, filter=flt)) for shard in self.shards.values())

    def compact(self) -> None:
        """After an erasure: turn the write-ahead log over and rebuild every segment that holds a deleted point,
        so that no file keeps the vectors or hashed terms of an erased unit (the optimizer's own threshold would
        leave a segment until a fifth of it is deleted). Only shards with deletes since their last compaction
        are touched."""
        for kind in [kind for kind, deleted in self._deleted.items() if deleted]:
            directory = self.path / kind
            turn_log_over(self.shards[kind], directory)
            self.shards[kind] = optimized(self.shards[kind], directory, self._config(kind, _VACUUM_ALL),
                                          self._config(kind))
            self._optimized[kind] = self.shards[kind].info().points_count
            self._pending[kind] = self._deleted[kind] = 0

    def refresh(self) -> None:
        """The end of a bulk load (``tessera ingest FILE``, ``tessera reindex``, the bench's corpora): updates are
        searchable once applied, but up to half of a shard may sit in its appendable segment, waiting for the
        shard to double (``_written``): float vectors and indexes in the process's memory, scored unquantized.
        Each shard written since its optimizer last ran is optimized. Measured on a 100k-fragment corpus of one tenant (each user
        sees 12,000 fragments, as at 1M with ten tenants), where about a third of the points were appendable:
        56 s for both stores; queries as fast with the files in the page cache (p50 46 against 50 ms), and with
        the process held to 1.5 GB by a memory cgroup, page cache included, p50 88 against 108 ms, p99 242
        against 433 ms."""
        for kind in [kind for kind, pending in self._pending.items() if pending]:
            self._run_optimizer(kind)

    def close(self) -> None:
        for shard in self.shards.values():
            shard.flush()
            shard.close()
        self.shards = {}
        self._lock.close()


def _tenant(tenant_id: str) -> Filter:
    return Filter(must=[FieldCondition(key="tenant_id", match=MatchValue(value=tenant_id))])


#: Sparse vector of BM25 terms, in the BM25 shards and in the window shard of a vector store that holds them.
BM25_VECTOR = "bm25"
#: Sparse vector of the BM25 terms of a window's own turn, on the window point of a vector store that holds them:
#: a turn and its window share one payload (``units.fragment_units``), so one point serves the turn list too.
TURN_BM25_VECTOR = "turn_bm25"
#: The sparse vectors of a window point that holds both lists' terms.
WINDOW_POINT_BM25 = (BM25_VECTOR, TURN_BM25_VECTOR)


def window_point_id(tenant_id: str, conversation_id: str, message_ids: Sequence[str]) -> str:
    """The window point that holds the terms of the turn of ``message_ids`` (one message, as ingest makes turns)."""
    return ids.turn_unit_id(tenant_id, conversation_id, message_ids[0], "window")


def _window_of(payload: dict) -> str:
    """``window_point_id`` of a stored turn's payload (layouts before the packed hit kept its fields apart)."""
    hit = unpack_hit(payload[HIT]) if HIT in payload else payload
    return window_point_id(payload["tenant_id"], hit["conversation_id"], hit["message_ids"])


#: How the BM25 inverted indexes store a posting's weight (``_sparse_params``).
SPARSE_WEIGHTS = VectorStorageDatatype.Uint8


def bm25_model() -> Bm25:
    """Qdrant's defaults (k 1.2, b 0.75, avg_len 256). Setting avg_len to the measured length of chat turns (12
    tokens) lost 0.05 recall@10 on the single-turn list; the default's weaker length normalisation suits short
    turns."""
    return Bm25(Bm25Config(language="english"))


def _sparse_params() -> EdgeSparseVectorParams:
    """As for dense vectors: score the points the filter selects rather than walk the inverted index of the whole
    shard (a common word's postings span every tenant): the turn list at 100k fragments took 19 ms the other way,
    6.6 ms this way. The engine scores them through the posting lists of the query's terms, skipping along each
    list to the next selected point, so a search reads the postings of its terms and nothing of the shard's sparse
    vectors. The inverted index stays on disk (``Memory.Cold``) rather than on the process's heap: at 1M fragments
    RSS querying 4,365 against 5,062 MiB, p50 33.0 / 32.2 / 28.3 against 31.2 / 34.4 ms (runs in alternation).

    Its weights take one byte (``SPARSE_WEIGHTS``) instead of four: the 100k-fragment bench corpus's window and
    turn indexes 35.7 and 14.7 MB against 83.6 and 32.3 MB, RSS querying 725 / 726 against 787 / 785 MiB, p50
    11.9 / 11.9 against 12.5 / 12.7 ms (500 queries and 150 narrowed ones, each corpus twice in alternation);
    on the dev split recall@10 / MRR / span F1 0.819 / 0.662 / 0.511 against 0.819 / 0.660 / 0.509 (one ingest
    each). Segments with other index settings (data dirs written before) are searched as they are and rebuilt
    by the optimizer's next run."""
    return EdgeSparseVectorParams(modifier=Modifier.Idf, full_scan_threshold=FULL_SCAN_THRESHOLD, memory=Memory.Cold,
                                  datatype=SPARSE_WEIGHTS)


class EdgeVectorStore(_Shards):
    """Qdrant's engine in the process: WAL, segments, payload indexes, quantized vectors.

    ``window_bm25``: a window point also holds the BM25 terms of the window (``BM25_VECTOR``, of its chat text as
    ``keyword_units`` gives it) and of its own turn (``TURN_BM25_VECTOR``, put there by the keyword store,
    ``put_turn_terms``), so that the keyword store's window and turn lists are searched here (``EdgeBM25Store(
    windows=...)``): a message is then one point with one payload and one set of payload indexes, not three. At
    1M fragments each other copy was about 1.3 GB of payload and 1.0 to 1.3 GB of payload indexes resident while
    querying.
    """

    #: A search holds the GIL (two threads: 1.23 ms a search against 1.46 ms one after the other), so a
    #: query's lists recalled on threads only queue: recall took 11.0 ms that way at 10k fragments, 8.4 in turn.
    concurrent_search = False

    def __init__(self, path: str | Path, dim: int = 384, image_dim: int | None = None,
                 optimize_every: int = OPTIMIZE_EVERY, max_appendable: int = MAX_APPENDABLE, window_bm25: bool = False):
        self.path = Path(path)
        self.dim = dim
        self.image_dim = image_dim
        self.bm25 = bm25_model() if window_bm25 else None
        self._keys_pending = False
        # Turns are vector points only for their image vectors (``units.vector_units``).
        self._open_shards(self._open, optimize_every, max_appendable,
                          INGESTED_KINDS if image_dim is not None else ("window",))
        if self._keys_pending:
            self._fill_keys()
        marker = self.path / KEYS_MARKER
        if not marker.exists():
            marker.touch()

    def _config(self, kind: str, optimizers: EdgeOptimizersConfig = _OPTIMIZERS,
                sparse: Sequence[str] | None = None, keys: bool = True) -> EdgeConfig:
        """``sparse``: the sparse vectors the shard has (None: those it should have, ``_sparse_names``); ``keys``:
        whether a window shard has ``KEYS_VECTOR``."""
        vectors = {TEXT_VECTOR: _vector_params(self.dim)}
        if self._with_image(kind):
            vectors[IMAGE_VECTOR] = _vector_params(self.image_dim)
        if kind == "window" and keys:
            vectors[KEYS_VECTOR] = _keys_params()
        sparse = self._sparse_names(kind) if sparse is None else sparse
        return EdgeConfig(
            vectors=vectors, sparse_vectors={name: _sparse_params() for name in sparse} or None,
            hnsw_config=HnswIndexConfig(m=0, ef_construct=100, full_scan_threshold=FULL_SCAN_THRESHOLD),
            quantization_config=QUANTIZATION,
            optimizers=optimizers, payload_memory=_payload_memory(kind), max_search_threads=SEARCH_THREADS,
        )

    def _with_image(self, kind: str) -> bool:
        return kind == "turn" and self.image_dim is not None

    def _sparse_names(self, kind: str) -> tuple[str, ...]:
        return WINDOW_POINT_BM25 if kind == "window" and self.bm25 is not None else ()

    def _open(self, kind: str) -> EdgeShard:
        """A store written without image vectors has no turn shard, or one without the vector (before turns
        stopped being text points): its turns would never be found by image, so it is refused."""
        directory = self.path / kind
        if self._with_image(kind):
            if (directory / "edge_config.json").exists():
                without_images = IMAGE_VECTOR not in _vector_names(directory)
            else:
                without_images = (self.path / "window" / "edge_config.json").exists()
            if without_images:
                raise ValueError(f"{self.path} was written without the {IMAGE_VECTOR!r} vector; index into a new"
                                 " data dir to turn on TESSERA_IMAGE_MODEL")
        wanted = self._sparse_names(kind)
        exists = (directory / "edge_config.json").exists()
        without_keys = kind == "window" and exists and KEYS_VECTOR not in _vector_names(directory)
        if wanted and exists:
            held = _vector_names(directory, "sparse_vectors")
            if not held.issuperset(wanted):
                # Written before window points held these terms: the vectors are added, empty, and filled by the
                # keyword store from its own shards (``EdgeBM25Store``, ``take_bm25``) or by a reindex.
                shard = EdgeShard.load(str(directory), self._config(kind, sparse=[n for n in wanted if n in held],
                                                                    keys=not without_keys))
                for name in wanted:
                    if name not in held:
                        shard.update(UpdateOperation.create_sparse_vector(name, modifier=Modifier.Idf))
                shard.flush()
                shard.close()
        if without_keys:
            # Written before window points held their keys: the vector is added here, filled once every shard is
            # open (``_fill_keys``).
            shard = EdgeShard.load(str(directory), self._config(kind, keys=False))
            shard.update(UpdateOperation.create_dense_vector(KEYS_VECTOR, 3, Distance.Euclid))
            shard.flush()
            shard.close()
        if kind == "window" and exists and not (self.path / KEYS_MARKER).exists():
            self._keys_pending = True
        return open_shard(directory, self._config(kind))

    def _fill_keys(self) -> int:
        """Give every window point its ``KEYS_VECTOR`` from its payload (a data dir written before); returns how
        many. Like ``take_bm25``, the updated points move out of their immutable segments, so the optimizer runs
        each time a share of the shard has moved; an interrupted fill runs again on the next open, since the
        store's ``KEYS_MARKER`` is written only after it."""
        shard, moved, offset = self.shards["window"], 0, None
        log.warning("giving the %d window points of %s their keys (once, for this data dir)",
                    shard.info().points_count, self.path / "window")
        per_run = self._moved_per_run()
        while True:
            records, offset = self.shards["window"].scroll(ScrollRequest(offset=offset, limit=UPSERT_BATCH,
                                                                         with_payload=[HIT], with_vector=False))
            points = [PointVectors(id=r.id, vector={KEYS_VECTOR: _keys_of(r.payload[HIT])})
                      for r in records if r.payload and HIT in r.payload]
            if points:
                self.shards["window"].update(UpdateOperation.update_vectors(points))
                moved += len(points)
                self._pending["window"] += len(points)
            if self._pending["window"] >= per_run:
                self._run_optimizer("window")
            if offset is None:
                break
        if self._pending["window"]:
            self._run_optimizer("window")
        return moved

    def read_payloads(self, hits: Sequence[WindowHit]) -> None:
        """The ``reader`` of window hits: their payloads in one read (an empty one for a point gone since)."""
        records = {r.id: r for r in self.shards["window"].retrieve([h._point.id for h in hits], with_payload=[HIT],
                                                                     with_vector=False)}
        for hit in hits:
            record = records.get(hit._point.id)
            payload = unpack_hit(record.payload[HIT]) if record is not None and record.payload else {}
            object.__setattr__(hit, "_payload", payload)

    def take_bm25(self, source: Path, vector: str) -> int:
        """Copy the BM25 terms of a shard of the keyword store's own (``source``, in a data dir written before
        window points held them) onto this store's window points as ``vector``: a window shard's terms as the
        window's (``BM25_VECTOR``), a turn shard's as its window's turn terms (``TURN_BM25_VECTOR``, the window
        of the same message); returns how many. Points with no window here are left (a reindex writes them).

        The copied points move out of their immutable segments into the appendable one, so the optimizer runs each
        time a share of the shard has moved (``_moved_per_run``) and once more at the end. The 100k-fragment bench
        corpus's 500,000 windows took 2 to 3 minutes; its 1M corpus's 5 million, 50 to 60."""
        shard, moved, offset = EdgeShard.load(str(source)), 0, None
        turns = vector == TURN_BM25_VECTOR
        per_run = self._moved_per_run()
        log.warning("moving the BM25 terms of %d points from %s into %s as %r (once, for this data dir)",
                    shard.info().points_count, source, self.path / "window", vector)
        try:
            while True:
                records, offset = shard.scroll(ScrollRequest(offset=offset, limit=UPSERT_BATCH,
                                                             with_payload=["tenant_id", HIT] if turns else False,
                                                             with_vector=[BM25_VECTOR]))
                terms = {(_window_of(record.payload) if turns else str(record.id)): record.vector[BM25_VECTOR]
                         for record in records if record.vector and BM25_VECTOR in record.vector}
                moved += self._put_terms(vector, terms, strict=False)
                if self._pending["window"] >= per_run:
                    self._run_optimizer("window")
                if offset is None:
                    break
        finally:
            shard.close()
        if self._pending["window"]:
            self._run_optimizer("window")
        return moved

    def _moved_per_run(self) -> int:
        """Points moved between two optimizer runs of a migration: each run turns what moved into one immutable
        segment, so a shard moved whole between two runs would be searched by one thread: the 100k-fragment
        one-tenant bench corpus (a user sees 12,250 fragments) moved in one run took recall stage p50 17.9 and 18.6
        ms against 14.5 and 15.6 before the move, and moved a share per search thread 12.6 and 12.9 ms (paired).
        ``max_appendable`` bounds the memory of what waits in the appendable segment."""
        points = self.shards["window"].info().points_count
        return max(1, min(self.max_appendable, -(-points // SEARCH_THREADS)))

    def put_turn_terms(self, terms: dict[str, SparseVector]) -> None:
        """Put turns' BM25 terms on their window points (``window_point_id``), which a write of the windows has just
        replaced without them (``Ingestor.write_units`` writes the vector store first). A window that is not here
        is an error: its turn would be in no list."""
        self._put_terms(TURN_BM25_VECTOR, terms, strict=True)

    def _put_terms(self, vector: str, terms: dict[str, SparseVector], strict: bool) -> int:
        """Update ``vector`` of the window points in ``terms`` that this store holds (``strict``: all of them);
        returns how many. An update moves a point out of an immutable segment. A write's windows were counted as
        written when upserted, so it only marks a shard the optimizer has just run on as written (``refresh`` runs
        it again); a migration's updates count as written."""
        if not terms:
            return 0
        shard = self.shards["window"]
        held = [str(r.id) for r in shard.retrieve(list(terms), with_payload=False, with_vector=False)]
        if strict and len(held) < len(terms):
            missing = sorted(set(terms) - set(held))
            raise ValueError(f"window points {missing[:3]} ({len(missing)} in all) are not in {self.path}: the"
                             " windows of a fragment are written before their turns' terms")
        if held:
            shard.update(UpdateOperation.update_vectors([PointVectors(id=i, vector={vector: terms[i]})
                                                         for i in held]))
            pending = self._pending["window"]
            self._pending["window"] = max(pending, 1) if strict else pending + len(held)
        return len(held)

    def upsert(self, units: Sequence[Unit]) -> None:
        for unit in units:
            check_vectors(unit, self.dim, self.image_dim)

        def point(unit: Unit) -> Point:
            named = {TEXT_VECTOR: unit.vector.astype(np.float32).tolist()}
            if unit.image_vector is not None:
                named[IMAGE_VECTOR] = unit.image_vector.astype(np.float32).tolist()
            if self._sparse_names(unit.kind):
                named[BM25_VECTOR] = self.bm25.embed_document(chat_text(unit.text))
            if unit.kind == "window":
                named[KEYS_VECTOR] = hit_keys(unit.fragment_id, unit.sender_ids)
            return Point(id=unit.unit_id, vector=named, payload=payload_of(unit))

        self._batches(units, point)

    def search(self, vector: np.ndarray, kind: str, flt: SearchFilter, limit: int, using: str = TEXT_VECTOR) -> list[Hit]:
        if kind not in UNIT_KINDS:
            raise ValueError(f"unknown kind {kind!r}")
        if kind not in self.shards or (using == IMAGE_VECTOR and (kind != "turn" or self.image_dim is None)):
            return []
        return self.hits(kind, self.shards[kind].query(self.request(vector, kind, build_filter(flt), limit, using)))

    @staticmethod
    def request(vector: np.ndarray, kind: str, flt: Filter, limit: int, using: str = TEXT_VECTOR) -> QueryRequest:
        """The search of ``kind`` points by the named vector: a window hit comes with its keys, no payload."""
        windows = kind == "window"
        return QueryRequest(limit=limit, query=Query.Nearest(vector.astype(np.float32).tolist(), using=using),
                            filter=flt, with_payload=False if windows else [HIT],
                            with_vector=[KEYS_VECTOR] if windows else False, params=SEARCH)

    def hits(self, kind: str, points) -> list[Hit]:
        if kind == "window":
            return [WindowHit(p, self.read_payloads) for p in points]
        return [PointHit(p) for p in points]


def _vector_names(directory: Path, field: str = "vectors") -> set[str]:
    """Named vectors (``field``: dense ``vectors`` or ``sparse_vectors``) a shard has, from its configuration file."""
    import json

    config = json.loads((directory / "edge_config.json").read_text())
    vectors = config.get(field) or {}
    return set(vectors) if isinstance(vectors, dict) else set()


class EdgeBM25Store(_Shards):
    """BM25 in the same engine: sparse term-frequency vectors (English stemming, stopwords) with IDF.

    IDF is counted over the points the asking user may see (``IdfParams(corpus=...)``, the visibility part of
    the filter): neither another tenant's words nor the conversations of the same tenant the user is not part of
    shift the user's scores, so a query reveals nothing of their vocabulary. It is also cheaper than counting
    over the tenant, since the engine counts the corpus per query term: with 100k fragments in one tenant (a
    user sees 12,250), the turn list took 11.8 ms counting over the tenant, 7.0 ms over the user's points, 6.4 ms
    with the shard's own IDF. Narrowing conditions (a conversation, senders, times) stay out of the corpus: a
    word's weight does not change with the window a query looks through.

    The count is per visible point, so a user who sees much pays for it on every list. Once a user sees
    ``idf_sample_min`` points of the IDF sample (one point in ``IDF_SAMPLE_EVERY``, chosen by id:
    ``sample_word``), IDF is counted over those instead: a subset of what the user sees, so the scores still
    tell nothing of what they do not. At 1M fragments (a user sees 61,000 points, 3,800 of them sampled) the
    turn list took 3.8 against 6.5 ms, the window list 4.9 against 7.3 ms, and a whole query p50 19.3 against
    22.4 ms (500 queries, each run both ways, paired). Weights from a sample are close enough well below that
    size: on the dev split (1,451 points) IDF over one point in 4 gave recall@10 / MRR 0.812 / 0.645, one in 16
    (90 points) 0.807 / 0.642, against 0.812 / 0.642 over all.

    ``windows``: an ``EdgeVectorStore`` with ``window_bm25``, whose window points hold the terms of the window and of
    its turn: both lists are searched there and nothing of either is written here (the vector store writes the
    windows with their dense vector, this store puts the turns' terms on them). A turn's terms then go with its
    window point: the ingestor deletes and writes the two together. Shards of its own from a data dir written
    before give their terms to ``windows`` when the store opens, then go.
    """

    #: As for the vector store: searches hold the GIL.
    concurrent_search = False

    def __init__(self, path: str | Path, optimize_every: int = OPTIMIZE_EVERY, max_appendable: int = MAX_APPENDABLE,
                 windows: EdgeVectorStore | None = None, idf_sample_min: int = IDF_SAMPLE_MIN):
        self.idf_sample_min = idf_sample_min
        if windows is not None and windows.bm25 is None:
            raise ValueError("windows: the vector store must hold the windows' BM25 terms (window_bm25=True)")
        self.path = Path(path)
        self.model = bm25_model()
        self.windows = windows
        self._open_shards(lambda kind: open_shard(self.path / kind, self._config(kind)), optimize_every,
                          max_appendable, () if windows is not None else INGESTED_KINDS,
                          elsewhere=INGESTED_KINDS if windows is not None else ())
        if windows is not None:
            for kind, vector in (("window", BM25_VECTOR), ("turn", TURN_BM25_VECTOR)):
                if (self.path / kind / "edge_config.json").exists():
                    windows.take_bm25(self.path / kind, vector)
                    shutil.rmtree(self.path / kind)

    def _config(self, kind: str, optimizers: EdgeOptimizersConfig = _OPTIMIZERS) -> EdgeConfig:
        return EdgeConfig(vectors={}, sparse_vectors={BM25_VECTOR: _sparse_params()}, optimizers=optimizers,
                          payload_memory=Memory.Cached, max_search_threads=SEARCH_THREADS)

    def upsert(self, units: Sequence[Unit]) -> None:
        if self.windows is not None:
            self.windows.put_turn_terms({window_point_id(u.tenant_id, u.conversation_id, u.message_ids):
                                         self.model.embed_document(u.text) for u in units if u.kind == "turn"})
            units = [u for u in units if u.kind not in INGESTED_KINDS]
        self._batches(units, lambda u: Point(id=u.unit_id, vector={BM25_VECTOR: self.model.embed_document(u.text)},
                                             payload=payload_of(u)))

    def _idf_corpus(self, shard: EdgeShard, flt: SearchFilter) -> Filter:
        """The points IDF is counted over: the user's visible points in the IDF sample (``sample_word``) once those
        are ``idf_sample_min`` or more (the engine's estimate from the index), else all the user's visible points."""
        sample = Filter(should=_visible(flt, sample=True))
        if shard.count(CountRequest(exact=False, filter=sample)) >= self.idf_sample_min:
            return sample
        return Filter(should=_visible(flt))

    def count(self, tenant_id: str | None = None) -> int:
        """With ``windows``, the turns are the window points that hold their terms."""
        held = super().count(tenant_id)
        if self.windows is None or "window" not in self.windows.shards:
            return held
        flt = Filter(must=[HasVectorCondition(TURN_BM25_VECTOR)] + ([_tenant(tenant_id)] if tenant_id else []))
        return held + self.windows.shards["window"].count(CountRequest(exact=True, filter=flt))

    def search(self, text: str, kind: str, flt: SearchFilter, limit: int) -> list[Hit]:
        if kind not in UNIT_KINDS:
            raise ValueError(f"unknown kind {kind!r}")
        query = self.model.embed_query(text)
        on_windows = self.windows is not None and kind in INGESTED_KINDS
        shards = self.windows.shards if on_windows else self.shards
        shard = shards.get("window" if on_windows else kind)
        if not query.indices or shard is None:
            return []
        points = shard.query(self._request(query, kind, on_windows, build_filter(flt), limit, self._idf(shard, flt)))
        if not on_windows:
            return [PointHit(p) for p in points]
        return self._window_hits(kind, points, flt.tenant_id)

    def _idf(self, shard: EdgeShard, flt: SearchFilter) -> SearchParams:
        return SearchParams(idf=IdfParams(corpus=self._idf_corpus(shard, flt)))

    @staticmethod
    def _request(query: SparseVector, kind: str, on_windows: bool, where: Filter, limit: int,
                 idf: SearchParams) -> QueryRequest:
        """The BM25 search of ``kind``; on window points (``on_windows``) a hit comes with its keys, no payload."""
        using = TURN_BM25_VECTOR if on_windows and kind == "turn" else BM25_VECTOR
        return QueryRequest(limit=limit, query=Query.Nearest(query, using=using), filter=where,
                            with_payload=False if on_windows else [HIT],
                            with_vector=[KEYS_VECTOR] if on_windows else False, params=idf)

    def _window_hits(self, kind: str, points, tenant_id: str) -> list[Hit]:
        reader = self.windows.read_payloads
        if kind == "turn":
            return [TurnHit(p, reader, tenant_id) for p in points]
        return [WindowHit(p, reader) for p in points]

    @property
    def dense_here(self) -> bool:
        """Its turn and window lists are searched on the window points of ``windows``, which hold the dense vectors
        too, so ``search_batch`` searches them with the dense window list in one pass."""
        return self.windows is not None

    def search_batch(self, text: str, keyword_depths: Sequence[tuple[str, int]], vector: np.ndarray | None,
                     dense_depth: int, flt: SearchFilter) -> tuple[list[list[Hit]], list[Hit]]:
        """The BM25 lists of ``keyword_depths`` (kind, depth: turns, windows) and the dense window list of ``vector``
        of ``windows`` (none without a vector), as one batch of the window shard: the engine walks the points the
        filter selects once for all of them, where a search each walked them three times. The bench queries, each
        run both ways in one process (500, in alternation): the recall stage p50 4.34 against 4.76 ms at 100k
        fragments, 21.8 against 22.5 ms at 1M, the same results."""
        if not self.dense_here:
            raise ValueError("search_batch needs the window points of a vector store (windows=...)")
        if any(kind not in INGESTED_KINDS for kind, _ in keyword_depths):
            raise ValueError(f"search_batch searches {', '.join(INGESTED_KINDS)} only")
        shard = self.windows.shards.get("window")
        if shard is None:
            return [[] for _ in keyword_depths], []
        where = build_filter(flt)
        query = self.model.embed_query(text)
        requests = []
        if query.indices:
            idf = self._idf(shard, flt)
            requests = [self._request(query, kind, True, where, depth, idf) for kind, depth in keyword_depths]
        if vector is not None:
            requests.append(self.windows.request(vector, "window", where, dense_depth))
        found = list(shard.query_batch(QueryBatchRequest(requests))) if requests else []
        dense = self.windows.hits("window", found.pop()) if vector is not None else []
        return [self._window_hits(kind, points, flt.tenant_id)
                for (kind, _), points in zip(keyword_depths, found or [[]] * len(keyword_depths))], dense
