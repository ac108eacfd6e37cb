"""Shared prompts: a session being prefilled copies what another live session already holds of its
prompt instead of computing it again (docs/design.md section 4.6, "Shared prompts").

Copies run on the model thread; sessions are opened, closed and evicted on the event loop. One
lock orders the two, so that a session withdrawn here is never read as a donor afterwards and its
buffers can be freed at once.
"""

from __future__ import annotations

import threading
import weakref

from coolfusion.worker.hf.kv import SessionKV
from coolfusion.worker.text import common_prefix_length


class PromptDonors:
    """The session caches a prefill may copy from."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Withdrawn explicitly when a session goes; weak as well, so that a cache whose owner was
        # dropped without closing it (a session store thrown away whole) is no donor either.
        self._caches: weakref.WeakSet[SessionKV] = weakref.WeakSet()

    def add(self, kv: SessionKV) -> None:
        with self._lock:
            self._caches.add(kv)

    def withdraw(self, kv: SessionKV) -> None:
        """Once this returns, no copy reads `kv`: one in progress has finished, none starts."""
        with self._lock:
            self._caches.discard(kv)

    def __contains__(self, kv: SessionKV) -> bool:
        with self._lock:
            return kv in self._caches

    def copy_into(self, kv: SessionKV, target: list[int]) -> int:
        """Copies into `kv` the longest stretch of `target` past what it holds that another
        session holds too, always leaving the last token of `target` to be fed (for its logits);
        returns the number of tokens copied. Holding the lock for the copy bounds a close's wait
        by one memory copy of a prompt, never by a forward pass."""
        start, stop = len(kv.ids), len(target) - 1
        with self._lock:
            best, end = None, start
            for donor in self._caches:
                if donor is kv or len(donor.ids) <= end or donor.ids[start] != target[start]:
                    continue
                shared = min(common_prefix_length(donor.ids, target), stop)
                if shared > end:
                    best, end = donor, shared
            if best is None:
                return 0
            kv.extend_from(best, end)
        return end - start
