"""A calibration's scope: the traffic it was fitted on (tags, prompt form, answer length), which is
where a default calibration applies (docs/design.md section 3.7)."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

FORMS = ("plain", "chat")
# What answers are held to: free text, or a constraint's kind (docs/design.md chapter 9).
TEXT = "text"


@dataclass(frozen=True)
class Scope:
    """Which requests resemble the items a calibration was fitted on. A rule fitted on one-phrase
    answers to plain few-shot prompts may lead with a model that is right there and degenerates on
    open chat, so a default calibration runs only for requests inside its scope."""

    tags: tuple[str, ...] = ()  # the tags of its items; empty when they had none
    forms: tuple[str, ...] = FORMS  # "plain" (a prompt string) and/or "chat" (messages)
    max_new_tokens: int | None = None  # the longest answer cap among its items, tokens; None: any
    # What its items' answers were held to: TEXT (free text) and/or constraint kinds ("json_schema").
    answers: tuple[str, ...] = (TEXT,)

    def excludes(self, tag: str, form: str, max_new_tokens: int, answer: str = TEXT) -> str | None:
        """Why a request with this tag ("" when it has none), prompt form, answer cap and answer
        form (TEXT or its constraint's kind) lies outside the scope, in words; None when it lies
        inside. An untagged request is judged by its form, length and answer alone: the tag is how
        a caller says what its request is, and a request that says nothing is not refused a fit
        that the rest matches."""
        if tag and tag not in self.tags:
            fitted = f"fitted on tags {', '.join(self.tags)}" if self.tags else "fitted on untagged items"
            return f"the request's tag is {tag!r}; it was {fitted}"
        if form not in self.forms:
            return f"the request's prompt is {form}; it was fitted on {' and '.join(self.forms)} prompts"
        if self.max_new_tokens is not None and max_new_tokens > self.max_new_tokens:
            return (
                f"the request allows {max_new_tokens} new tokens; it was fitted on answers of at most "
                f"{self.max_new_tokens}"
            )
        if answer not in self.answers:
            return f"the request's answer is {_spelled(answer)}; it was fitted on {' and '.join(map(_spelled, self.answers))}"
        return None

    def describe(self) -> str:
        tags = ", ".join(self.tags) or "untagged"
        length = "any length" if self.max_new_tokens is None else f"at most {self.max_new_tokens} new tokens"
        return f"tags {tags}; {' and '.join(self.forms)} prompts; {length}; {' and '.join(map(_spelled, self.answers))}"


def _spelled(answer: str) -> str:
    return "free text" if answer == TEXT else f"held to a {answer} constraint"


def scope_document(scope: Scope) -> dict[str, Any]:
    return {
        "tags": list(scope.tags), "prompt_forms": list(scope.forms), "max_new_tokens": scope.max_new_tokens,
        "answers": list(scope.answers),
    }  # fmt: skip


def scope_from_document(document: Mapping[str, Any]) -> Scope:
    """A scope as a calibration file writes it; ValueError says what is malformed."""
    tags, forms, length = (
        document.get("tags", []),
        document.get("prompt_forms", list(FORMS)),
        document.get("max_new_tokens"),
    )
    if not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags):
        raise ValueError(f"scope.tags must be a list of tags, got {tags!r}")
    if not isinstance(forms, list) or not forms or not _known(forms):
        raise ValueError(f"scope.prompt_forms must list one or both of {', '.join(FORMS)}, got {forms!r}")
    if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 1):
        raise ValueError(f"scope.max_new_tokens must be a positive whole number or null, got {length!r}")
    answers = document.get("answers", [TEXT])  # files before answer forms were recorded: free text
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a for a in answers):
        raise ValueError(f"scope.answers must list what answers were held to, e.g. [{TEXT!r}], got {answers!r}")
    return Scope(tuple(tags), tuple(forms), length, tuple(answers))


def _known(forms: Collection[Any]) -> bool:
    return all(form in FORMS for form in forms)
