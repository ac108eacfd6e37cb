"""Terminal rendering of fused answers: who won each segment, the share table, drops and timings."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TextIO

from coolfusion.v1 import orchestrator_pb2, worker_pb2

# Foreground colours that read on both dark and light terminals (no black, white or yellow).
_COLOURS = ("36", "35", "32", "34", "31", "96", "95", "92")
_RESET = "\x1b[0m"


@dataclass(frozen=True)
class Segment:
    """A piece of the answer and the worker whose candidate it was."""

    worker: str
    text: str


@dataclass
class Palette:
    """Gives each worker a stable colour, in the order the workers are first seen."""

    colours: dict[str, str] = field(default_factory=dict)

    def colour(self, worker: str) -> str:
        if worker not in self.colours:
            self.colours[worker] = _COLOURS[len(self.colours) % len(_COLOURS)]
        return self.colours[worker]

    def paint(self, worker: str, text: str) -> str:
        return f"\x1b[{self.colour(worker)}m{text}{_RESET}"


def segments(steps: Iterable[orchestrator_pb2.FuseStep], text: str | None = None) -> list[Segment]:
    """Each step's winning text with its worker, clipped to `text` (a stop string may cut the last one)."""
    pieces = [Segment(step.winner_worker, step.candidates[step.winner_index].text) for step in steps]
    if text is None:
        return pieces
    clipped, used = [], 0
    for piece in pieces:
        kept = piece.text[: max(0, len(text) - used)]
        used += len(kept)
        if kept:
            clipped.append(Segment(piece.worker, kept))
    return clipped


def label(segment: Segment, palette: Palette | None) -> str:
    """A segment marked with its worker: coloured with a palette, else as `[worker]text`."""
    if palette is None:
        return f"[{segment.worker}]{segment.text}"
    return palette.paint(segment.worker, segment.text)


def legend(workers: Iterable[str], palette: Palette) -> str:
    return "workers: " + "  ".join(palette.paint(name, f"■ {name}") for name in workers)


def share_table(result: orchestrator_pb2.FuseResult) -> str:
    """Per-worker segments and characters won, with each worker's percentage of the characters."""
    total = sum(share.chars for share in result.shares) or 1  # an empty answer: every share is 0%
    width = max([len("worker"), *(len(share.worker) for share in result.shares)])
    rows = [f"{'worker':<{width}}  segments  chars      %"]
    for share in result.shares:
        rows.append(f"{share.worker:<{width}}  {share.segments:>8}  {share.chars:>5}  {100 * share.chars / total:5.1f}")
    return "\n".join(rows)


def dropped_lines(result: orchestrator_pb2.FuseResult) -> list[str]:
    return [f"dropped {d.worker} at step {d.step}: {d.reason}" for d in result.dropped]


def timings_line(result: orchestrator_pb2.FuseResult) -> str:
    t = result.timings
    finish = worker_pb2.FinishReason.Name(result.finish_reason).removeprefix("FINISH_REASON_").lower()
    line = (
        f"{t.steps} steps, finished by {finish}; total {t.total_ms:.0f} ms "
        f"(open {t.open_ms:.0f}, generate {t.generate_ms:.0f}, score {t.score_ms:.0f}"
    )
    return line + (f", rerank {t.rerank_ms:.0f})" if t.rerank_ms else ")")


def rerank_lines(result: orchestrator_pb2.FuseResult) -> list[str]:
    """Which full answer Cool+R returned, and the ranking it chose from (best first)."""
    if not result.rerank:
        return []
    chosen = "the fused answer" if result.source == "fused" else f"{result.source}'s solo answer"
    lines = [f"rerank chose {chosen}:"]
    width = max(len(entry.source) for entry in result.rerank)
    lines += [f"  {entry.source:<{width}}  mean perplexity {entry.fused_score:.4g}" for entry in result.rerank]
    if result.source != "fused":
        lines += ["answer returned:", result.text]
    return lines


def summary(result: orchestrator_pb2.FuseResult) -> str:
    """Everything after the answer itself: share table, drops, rerank choice and timings."""
    return "\n".join([share_table(result), *dropped_lines(result), *rerank_lines(result), timings_line(result)])


def render_result(result: orchestrator_pb2.FuseResult, palette: Palette | None) -> str:
    """The whole answer with attribution, then its summary; falls back to bare text without a trace."""
    pieces = segments(result.trace, _fused_text(result))
    workers = [share.worker for share in result.shares]
    head = [legend(workers, palette)] if palette else []
    answer = "".join(label(piece, palette) for piece in pieces) if result.trace else result.text
    return "\n".join([*head, answer, "", summary(result)])


def _fused_text(result: orchestrator_pb2.FuseResult) -> str | None:
    # With Cool+R choosing a solo answer, `text` is that answer; the fused one is in the ranking.
    if result.source in ("", "fused"):
        return result.text
    return next((entry.text for entry in result.rerank if entry.source == "fused"), None)


class StreamPrinter:
    """Writes segments as FuseStream delivers them, then the summary; used by `fuse --stream` and `demo`."""

    def __init__(self, out: TextIO, palette: Palette | None, workers: Sequence[str] = ()):
        self._out = out
        self._palette = palette
        self._legend_shown = False
        self._workers = list(workers)
        self.pieces: list[Segment] = []

    def step(self, step: orchestrator_pb2.FuseStep) -> None:
        if self._palette and not self._legend_shown:
            # The legend needs the worker names; the first step's candidates name them all.
            names = self._workers or [name for c in step.candidates for name in c.proposed_by]
            self._out.write(legend(names, self._palette) + "\n")
            self._legend_shown = True
        piece = segments([step])[0]
        self.pieces.append(piece)
        self._out.write(label(piece, self._palette))
        self._out.flush()

    def finish(self, result: orchestrator_pb2.FuseResult) -> None:
        self._out.write("\n\n" + summary(result) + "\n")
        self._out.flush()

    def event(self, event: orchestrator_pb2.FuseStreamResponse) -> orchestrator_pb2.FuseResult | None:
        """Handles one stream event; returns the summary when it is the last one."""
        if event.WhichOneof("event") == "step":
            self.step(event.step)
            return None
        self.finish(event.summary)
        return event.summary
