"""One cache of loaded models per process, keyed by what was loaded, from where, onto which device.

Every model Tessera runs (text encoder, image encoder, rewriter, VLM) comes from a local path, never
from a hub (each loader passes ``local_files_only``). Engines of one process (a worker's ingest and
query engines, a benchmark's store variants, the tests) share one copy: the first caller loads it
while the others wait, instead of each class keeping its own lock and its own copy.
"""

from __future__ import annotations

import threading
from typing import Callable, TypeVar

T = TypeVar("T")

_loaded: dict[tuple, object] = {}
_loading: dict[tuple, threading.Lock] = {}
_guard = threading.Lock()


def load(key: tuple, loader: Callable[[], T]) -> T:
    """The model ``loader`` builds for ``key``, built once per process."""
    with _guard:
        if key in _loaded:
            return _loaded[key]
        lock = _loading.setdefault(key, threading.Lock())
    with lock:
        if key not in _loaded:
            _loaded[key] = loader()
        return _loaded[key]
