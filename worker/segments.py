"""Where a segment ends inside generated text (docs/design.md section 2.2); engine-independent."""

from __future__ import annotations

import re

from coolfusion.worker.backend import Finish

# A segment ends right before the first whitespace that follows a non-whitespace character.
_WORD_BOUNDARY = re.compile(r"\S(?=\s)")


def segment_cut(text: str, stop_strings: tuple[str, ...]) -> tuple[int, Finish] | None:
    """Where a segment ends inside `text` (exclusive end, reason), or None if it has not ended."""
    cuts: list[tuple[int, Finish]] = []
    boundary = _WORD_BOUNDARY.search(text)
    if boundary:
        cuts.append((boundary.end(), Finish.BOUNDARY))
    for stop in stop_strings:
        at = text.find(stop)
        if at >= 0:
            cuts.append((at + len(stop), Finish.STOP))
    return min(cuts, key=lambda cut: cut[0]) if cuts else None
