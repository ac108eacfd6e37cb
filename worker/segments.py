"""Where a segment ends inside generated text (docs/design.md section 2.2); engine-independent."""

from __future__ import annotations

import re
from collections.abc import Callable, Collection

from coolfusion.worker.backend import Finish, Segment

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


class SegmentScan:
    """Greedy tokens in, one at a time; the segment out once it has ended (docs/design.md section
    2.2). Every engine decides segments here, so they all end them alike.

    `decode` gives the text of new tokens after the context; `eos_ids` end the segment with EOS.
    """

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        eos_ids: Collection[int],
        max_tokens: int,
        stop_strings: tuple[str, ...],
    ):
        self._decode = decode
        self._eos_ids = eos_ids
        self._max_tokens = max_tokens
        self._stops = stop_strings
        self.tokens: list[int] = []  # the tokens generated so far, EOS excluded
        self.segment: Segment | None = None
        # Once ended: how many leading tokens lie within the segment's text. A cut drops the token
        # that crossed it and any earlier one whose text reaches past it (part of a whitespace run).
        self.kept = 0

    def add(self, token: int) -> Segment | None:
        """Takes the next greedy token; the segment if it ended with it, else None."""
        if self.segment is not None:
            raise RuntimeError("the segment has already ended")
        if token in self._eos_ids:
            return self._end(Segment(self._text(), Finish.EOS, len(self.tokens) + 1), len(self.tokens))
        self.tokens.append(token)
        text = self._text()
        cut = segment_cut(text, self._stops)
        if cut is not None:
            end, reason = cut
            kept = len(self.tokens) - 1
            while kept > 0 and len(self._decode(self.tokens[:kept])) > end:
                kept -= 1
            return self._end(Segment(text[:end], reason, len(self.tokens)), kept)
        if len(self.tokens) == self._max_tokens:
            return self._end(Segment(text, Finish.LENGTH, len(self.tokens)), len(self.tokens))
        return None

    @property
    def cut(self) -> bool:
        """Whether the segment ended at a word boundary or a stop string (tokens were dropped)."""
        return self.segment is not None and self.segment.finish in (Finish.BOUNDARY, Finish.STOP)

    def _text(self) -> str:
        return self._decode(self.tokens) if self.tokens else ""

    def _end(self, segment: Segment, kept: int) -> Segment:
        self.segment, self.kept = segment, kept
        return segment
