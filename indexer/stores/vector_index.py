"""In-process dense index: one float32 matrix per unit kind plus the columns the filters read.

SQLite stays the record (several processes share it); each process keeps this copy and brings it up
to date from the store's change log before every search, so a search costs one small SELECT plus
NumPy work proportional to what the asking user may see. Visibility is grouped: every distinct
(tenant, visible_to) set gets a code, each principal knows its codes, and each code its slots, so a
user-scoped query touches only the rows of conversations it takes part in.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
import numpy as np

from indexer.model import EVERYONE, SearchFilter

#: A search that may see more than this share of the rows scores the whole matrix and masks it;
#: gathering the rows first would copy more than it saves.
FULL_SCAN_SHARE = 0.5


@dataclass(frozen=True)
class IndexRow:
    rowid: int
    tenant_id: str
    conversation_id: str
    sender_ids: tuple[str, ...]
    visible_to: tuple[str, ...]
    start_ts: float
    end_ts: float


class _Codes(dict):
    """Interns hashable keys to dense integer codes."""

    def code(self, key) -> int:
        found = self.get(key)
        if found is None:
            found = self[key] = len(self)
        return found


class VectorIndex:
    def __init__(self, dim: int, capacity: int = 1024):
        self.dim = dim
        self.n = 0
        self.dead = 0
        self._alloc(capacity)
        self.slot_of: dict[int, int] = {}
        self.conversations = _Codes()
        self.access = _Codes()
        self.sender_sets = _Codes()
        self.principal_access: dict[tuple[str, str], set[int]] = {}
        self.sender_access: dict[tuple[str, str], set[int]] = {}
        self.access_slots: dict[int, array] = {}

    def _alloc(self, capacity: int) -> None:
        self.matrix = np.zeros((capacity, self.dim), dtype=np.float32)
        self.rowids = np.zeros(capacity, dtype=np.int64)
        self.live = np.zeros(capacity, dtype=bool)
        self.conversation = np.zeros(capacity, dtype=np.int32)
        self.access_code = np.zeros(capacity, dtype=np.int32)
        self.sender_code = np.zeros(capacity, dtype=np.int32)
        self.start = np.zeros(capacity, dtype=np.float64)
        self.end = np.zeros(capacity, dtype=np.float64)

    def _grow(self, needed: int) -> None:
        capacity = len(self.rowids)
        if needed <= capacity:
            return
        new = max(needed, capacity * 2)
        old = (self.matrix, self.rowids, self.live, self.conversation, self.access_code, self.sender_code,
               self.start, self.end)
        self._alloc(new)
        for dst, src in zip((self.matrix, self.rowids, self.live, self.conversation, self.access_code,
                             self.sender_code, self.start, self.end), old):
            dst[:self.n] = src[:self.n]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.matrix, self.rowids, self.live, self.conversation, self.access_code,
                                      self.sender_code, self.start, self.end))

    def add(self, rows: list[IndexRow], vectors: np.ndarray) -> None:
        for rowid in (r.rowid for r in rows):
            self.remove(rowid)
        self._grow(self.n + len(rows))
        base = self.n
        self.matrix[base:base + len(rows)] = vectors
        for i, r in enumerate(rows):
            slot = base + i
            self.slot_of[r.rowid] = slot
            self.rowids[slot] = r.rowid
            self.live[slot] = True
            self.conversation[slot] = self.conversations.code((r.tenant_id, r.conversation_id))
            access_key = (r.tenant_id, tuple(sorted(r.visible_to)))
            access = self.access.code(access_key)
            if access not in self.access_slots:
                self.access_slots[access] = array("q")
                for principal in access_key[1]:
                    self.principal_access.setdefault((r.tenant_id, principal), set()).add(access)
            self.access_slots[access].append(slot)
            self.access_code[slot] = access
            sender_key = (r.tenant_id, tuple(sorted(r.sender_ids)))
            senders = self.sender_sets.get(sender_key)
            if senders is None:
                senders = self.sender_sets.code(sender_key)
                for sender in sender_key[1]:
                    self.sender_access.setdefault((r.tenant_id, sender), set()).add(senders)
            self.sender_code[slot] = senders
            self.start[slot] = r.start_ts
            self.end[slot] = r.end_ts
        self.n += len(rows)
        if self.dead > 4096 and self.dead > self.n // 2:
            self.compact()

    def remove(self, rowid: int) -> None:
        slot = self.slot_of.pop(rowid, None)
        if slot is not None:
            self.live[slot] = False
            self.dead += 1

    def compact(self) -> None:
        """Drop dead slots: streaming re-segmentation rewrites units all the time."""
        keep = np.flatnonzero(self.live[:self.n])
        arrays = [a[keep] for a in (self.matrix, self.rowids, self.live, self.conversation, self.access_code,
                                    self.sender_code, self.start, self.end)]
        self.n, self.dead = len(keep), 0
        self._alloc(max(1024, self.n))
        for dst, src in zip((self.matrix, self.rowids, self.live, self.conversation, self.access_code,
                             self.sender_code, self.start, self.end), arrays):
            dst[:self.n] = src
        self.slot_of = {int(r): i for i, r in enumerate(self.rowids[:self.n])}
        self.access_slots = {}
        codes = self.access_code[:self.n]
        order = np.argsort(codes, kind="stable")
        bounds = np.flatnonzero(np.diff(codes[order])) + 1
        for chunk in np.split(order, bounds) if self.n else []:
            self.access_slots[int(codes[chunk[0]])] = array("q", chunk.astype(np.int64).tobytes())
        for access in self.access.values():
            self.access_slots.setdefault(access, array("q"))

    def candidates(self, flt: SearchFilter) -> np.ndarray | None:
        """Slots the filter admits, or None when they are most of the index (scan all, mask later)."""
        allowed = (self.principal_access.get((flt.tenant_id, flt.user_id), set())
                   | self.principal_access.get((flt.tenant_id, EVERYONE), set()))
        total = sum(len(self.access_slots[a]) for a in allowed)
        if total > FULL_SCAN_SHARE * self.n:
            return None
        if not total:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.frombuffer(self.access_slots[a], dtype=np.int64) for a in allowed
                               if len(self.access_slots[a])])

    def _mask(self, slots: np.ndarray | None, flt: SearchFilter) -> np.ndarray:
        """Boolean mask over ``slots`` (or over all slots when None) of the rows the filter keeps."""
        pick = (lambda a: a[:self.n]) if slots is None else (lambda a: a[slots])
        mask = pick(self.live).copy()
        if slots is None:
            allowed = (self.principal_access.get((flt.tenant_id, flt.user_id), set())
                       | self.principal_access.get((flt.tenant_id, EVERYONE), set()))
            mask &= np.isin(pick(self.access_code), np.fromiter(allowed, dtype=np.int32, count=len(allowed)))
        if flt.conversation_id is not None:
            code = self.conversations.get((flt.tenant_id, flt.conversation_id), -1)
            mask &= pick(self.conversation) == code
        if flt.sender_ids:
            codes: set[int] = set()
            for sender in flt.sender_ids:
                codes |= self.sender_access.get((flt.tenant_id, sender), set())
            mask &= np.isin(pick(self.sender_code), np.fromiter(codes, dtype=np.int32, count=len(codes)))
        if flt.sent_after is not None:
            mask &= pick(self.end) >= flt.sent_after
        if flt.sent_before is not None:
            mask &= pick(self.start) <= flt.sent_before
        return mask

    def search(self, query: np.ndarray, flt: SearchFilter, limit: int) -> list[tuple[int, float]]:
        """(rowid, cosine) of the best ``limit`` rows the filter admits, best first."""
        if self.n == 0 or limit <= 0:
            return []
        slots = self.candidates(flt)
        if slots is not None and not len(slots):
            return []
        mask = self._mask(slots, flt)
        if slots is None:
            keep = np.flatnonzero(mask)
            if not len(keep):
                return []
            scores = (self.matrix[:self.n] @ query)[keep]
        else:
            keep = slots[mask]
            if not len(keep):
                return []
            scores = self.matrix[keep] @ query
        if len(keep) > limit:
            top = np.argpartition(-scores, limit - 1)[:limit]
            top = top[np.lexsort((self.rowids[keep[top]], -scores[top]))]
        else:
            top = np.lexsort((self.rowids[keep], -scores))
        return [(int(self.rowids[keep[i]]), float(scores[i])) for i in top]
