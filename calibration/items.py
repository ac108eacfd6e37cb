"""Labelled items: the JSONL file a deployment writes from its own traffic to explore, fit and check a
calibration on (docs/own-traffic.md). Parsed whole before anything is asked, so a bad line fails
at once with its number and what is wrong; the tuning / held-out split is fixed by the file."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coolfusion.calibration.answers import AnswerRule, matches, read
from coolfusion.constraints import Constraint, ConstraintError, ConstraintKind, compile_grammar

TUNING, HELD_OUT = "tuning", "held-out"
SPLITS = (TUNING, HELD_OUT)
PLAIN, CHAT = "plain", "chat"  # the prompt forms: a `prompt` string, or `messages`
FIELDS = (
    "id", "prompt", "messages", "answers", "rule", "field", "tag", "split", "max_new_tokens", "stop", "json_schema",
    "meta",
)  # fmt: skip
# What an answer is held to: free text, or one JSON value valid against the item's `json_schema`.
TEXT_ANSWER, JSON_SCHEMA_ANSWER = "text", "json_schema"
ROLES = ("system", "user", "assistant")
# An item that sets no length gets this many tokens (of the first worker): room for a short answer
# and its sentence, little for a runaway one; explored trees grow with every token allowed.
DEFAULT_MAX_NEW_TOKENS = 32
# Without a `split` field, this share of the items is held out (by a hash of each item's id).
HELD_OUT_FRACTION = 0.5
# The orchestrator's default request bounds (orchestrator/settings.py, RequestLimits): an item
# beyond them would only be refused when explored, minutes later.
MAX_NEW_TOKENS, MAX_STOP_STRINGS, MAX_STOP_CHARS = 4096, 8, 64
# Tags name calibrations ("<tag>-<workers>") and routes, so they are spelled like worker names.
_TAG = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
POOLED = "pooled"  # the scope of a fit over every item of the file, so no tag may take the name
_MAX_ERRORS = 20  # a file with more bad lines than this is reported by its first ones

Prompt = str | tuple[tuple[str, str], ...]  # plain text, or (role, content) messages


class ItemsError(ValueError):
    """A labelled-items file that cannot be used; the message names each bad line and what is wrong."""


@dataclass(frozen=True)
class LabelledItem:
    """One labelled prompt: what to ask, how to check the answer, and where it belongs."""

    id: str  # unique in the file: given, or a digest of the prompt
    tag: str  # the scope it belongs to ("" when untagged: it counts in the pooled fit only)
    split: str  # TUNING or HELD_OUT
    prompt: Prompt
    answers: tuple[str, ...]
    rule: AnswerRule = AnswerRule.FIRST_PHRASE
    field: str | None = None  # json_field's path, keys joined by dots
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    stop: tuple[str, ...] = ()
    line: int = 0  # its line in the file, from 1
    split_given: bool = False  # whether the file set its split (else hashed_split chose it)
    json_schema: str | None = None  # the answer's JSON Schema, as JSON text (docs/design.md chapter 9)

    @property
    def answer_form(self) -> str:
        """TEXT_ANSWER, or JSON_SCHEMA_ANSWER when the answer is held to a schema."""
        return TEXT_ANSWER if self.json_schema is None else JSON_SCHEMA_ANSWER

    @property
    def form(self) -> str:
        return PLAIN if isinstance(self.prompt, str) else CHAT

    @property
    def request_prompt(self) -> str | list[dict[str, str]]:
        """The prompt as the client sends it: plain text, or chat messages."""
        if isinstance(self.prompt, str):
            return self.prompt
        return [{"role": role, "content": content} for role, content in self.prompt]

    @property
    def fingerprint(self) -> str:
        """A digest of what exploring the item asks (prompt, length, stop strings, schema): a tree
        explored for another question under the same id is never mistaken for this one's, and items
        that ask the same (one per field of a text) share one tree."""
        asked = {"prompt": self.request_prompt, "max_new_tokens": self.max_new_tokens, "stop": list(self.stop)}
        if self.json_schema is not None:
            asked["json_schema"] = self.json_schema
        return hashlib.sha256(json.dumps(asked, sort_keys=True).encode()).hexdigest()[:16]

    def read(self, text: str) -> str | None:
        """The answer `text` gives under the item's rule (None: none)."""
        return read(self.rule, text, self.answers, self.field)

    def correct(self, prediction: str | None) -> bool:
        return matches(self.rule, prediction, self.answers)


@dataclass(frozen=True)
class ItemsFile:
    """A parsed labelled-items file and what identifies it."""

    path: Path
    items: tuple[LabelledItem, ...]
    sha256: str
    size: int  # bytes

    @property
    def tags(self) -> list[str]:
        """The tags in order of first appearance (without the untagged "")."""
        return [tag for tag in dict.fromkeys(item.tag for item in self.items) if tag]

    def split_rule(self) -> str:
        """The split in words, as calibration files and reports state it."""
        given = sum(1 for item in self.items if item.split_given)
        if given == len(self.items):
            return "the file's own split field"
        hashed = (
            f"held out when sha256('coolfusion.split/' + id) falls in the lowest {HELD_OUT_FRACTION:g} of its range"
        )
        return hashed if not given else f"the file's split field where given ({given} items), else {hashed}"

    def describe(self) -> dict[str, Any]:
        """What a calibration records of the data it was fitted on."""
        counts = {split: sum(item.split == split for item in self.items) for split in SPLITS}
        return {
            "file": self.path.name, "sha256": self.sha256, "bytes": self.size, "items": len(self.items),
            "split": {"rule": self.split_rule(), **counts},
        }  # fmt: skip


def load_items(path: Path) -> ItemsFile:
    """Reads and checks a labelled-items file; ItemsError names the file, each bad line and what is wrong."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ItemsError(f"{path}: {error.strerror or error}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ItemsError(f"{path}: not UTF-8 ({error.reason} at byte {error.start})") from None
    try:
        items = parse_items(text.splitlines())
    except ItemsError as error:
        raise ItemsError(f"{path}: {error}") from None
    return ItemsFile(Path(path), tuple(items), hashlib.sha256(data).hexdigest(), len(data))


def parse_items(lines: Iterable[str]) -> list[LabelledItem]:
    """The items of a file's lines (blank lines skipped); every line is checked before any error is
    raised, so one ItemsError lists the bad lines, each as `line N: what is wrong`."""
    items: list[LabelledItem] = []
    errors: list[str] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = parse_item(line, number)
            if item.id in seen:
                raise ItemsError(
                    f"line {number}: id {item.id!r} is also line {seen[item.id]}'s (an item without an id is "
                    "named by a digest of its prompt: the same prompt twice; give each an id to keep both)"
                )
        except ItemsError as error:
            errors.append(str(error))
            continue
        seen[item.id] = number
        items.append(item)
    if errors:
        more = f"\n... and {len(errors) - _MAX_ERRORS} more" if len(errors) > _MAX_ERRORS else ""
        raise ItemsError("\n".join(errors[:_MAX_ERRORS]) + more)
    if not items:
        raise ItemsError("no items: each line must be one JSON object (docs/own-traffic.md)")
    return items


def parse_item(line: str, number: int = 0) -> LabelledItem:
    """One line of a labelled-items file; ItemsError says `line N: what is wrong`."""
    try:
        document = json.loads(line)
    except json.JSONDecodeError as error:
        raise ItemsError(f"line {number}: not JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(document, dict):
        raise ItemsError(f"line {number}: must be a JSON object, not {type(document).__name__}")
    try:
        return _item(document, number)
    except ItemsError as error:
        raise ItemsError(f"line {number}: {error}") from None


def _item(document: Mapping[str, Any], number: int) -> LabelledItem:
    if unknown := sorted(set(document) - set(FIELDS)):
        raise ItemsError(f"unknown field {unknown[0]!r}; the fields are {', '.join(FIELDS)}")
    prompt = _prompt(document)
    rule = _rule(document)
    answers = _answers(document, rule)
    field = document.get("field")
    if rule == AnswerRule.JSON_FIELD and not (isinstance(field, str) and field):
        raise ItemsError(
            'rule json_field needs `field`: the key of the answer\'s JSON object, e.g. "city" or "address.city"'
        )
    if rule != AnswerRule.JSON_FIELD and field is not None:
        raise ItemsError(f"`field` is read by rule json_field only; this item's rule is {rule}")
    item_id = _id(document.get("id"), prompt)
    split = document.get("split")
    if split is not None and split not in SPLITS:
        raise ItemsError(f"split is {split!r}; it must be {TUNING!r} or {HELD_OUT!r} (or absent)")
    return LabelledItem(
        id=item_id,
        tag=_tag(document.get("tag")),
        split=split or hashed_split(item_id),
        prompt=prompt,
        answers=answers,
        rule=rule,
        field=field,
        max_new_tokens=_max_new_tokens(document.get("max_new_tokens")),
        stop=_stop(document.get("stop")),
        line=number,
        split_given=split is not None,
        json_schema=_json_schema(document.get("json_schema")),
    )


def _prompt(document: Mapping[str, Any]) -> Prompt:
    if ("prompt" in document) == ("messages" in document):
        raise ItemsError("give either `prompt` (plain text) or `messages` (a chat), exactly one")
    if "prompt" in document:
        prompt = document["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise ItemsError("prompt must be a non-empty string")
        return prompt
    messages = document["messages"]
    if not isinstance(messages, list) or not messages:
        raise ItemsError('messages must be a non-empty list of {"role", "content"} objects')
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise ItemsError(f"messages[{i}] must be an object with exactly `role` and `content`")
        if message["role"] not in ROLES:
            raise ItemsError(f"messages[{i}].role is {message['role']!r}; it must be one of {', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise ItemsError(f"messages[{i}].content must be a string")
        turns.append((message["role"], message["content"]))
    return tuple(turns)


def _json_schema(value: Any) -> str | None:
    """The schema as JSON text, checked: it compiles as a constraint, or the line says why not."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ItemsError("json_schema must be a JSON Schema object")
    text = json.dumps(value, sort_keys=True)
    try:
        compile_grammar(Constraint(ConstraintKind.JSON_SCHEMA, text))
    except ConstraintError as error:
        raise ItemsError(f"json_schema: {error}") from None
    return text


def _rule(document: Mapping[str, Any]) -> AnswerRule:
    rule = document.get("rule", AnswerRule.FIRST_PHRASE.value)
    if rule not in set(AnswerRule):
        raise ItemsError(f"unknown rule {rule!r}; the rules are {', '.join(AnswerRule)}")
    return AnswerRule(rule)


def _answers(document: Mapping[str, Any], rule: AnswerRule) -> tuple[str, ...]:
    answers = document.get("answers")
    if "answers" not in document:
        raise ItemsError("no `answers`: each item needs a non-empty list of accepted answers")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        raise ItemsError(f"answers must be a non-empty list of non-empty strings, got {json.dumps(answers)[:80]}")
    for i, answer in enumerate(answers):
        if rule == AnswerRule.REGEX:
            try:
                re.compile(answer)
            except re.error as error:
                raise ItemsError(f"answers[{i}] {answer!r} is not a regular expression: {error}") from None
        if rule == AnswerRule.NUMBER and not _is_number(answer.replace(",", "")):
            raise ItemsError(f"answers[{i}] {answer!r} is not a number, which rule number compares with")
    return tuple(answers)


def _id(value: Any, prompt: Prompt) -> str:
    if value is None:
        asked = prompt if isinstance(prompt, str) else [list(turn) for turn in prompt]
        return hashlib.sha256(json.dumps(asked).encode()).hexdigest()[:12]
    if isinstance(value, bool) or not isinstance(value, str | int) or str(value) == "":
        raise ItemsError(f"id must be a non-empty string or an integer, got {value!r}")
    return str(value)


def _tag(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or not _TAG.fullmatch(value):
        raise ItemsError(f"tag {value!r} must be lowercase letters, digits and '-' (it names calibrations and routes)")
    if value == POOLED:
        raise ItemsError(f"tag {POOLED!r} is the fit over all items; choose another name")
    return value


def _max_new_tokens(value: Any) -> int:
    if value is None:
        return DEFAULT_MAX_NEW_TOKENS
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_NEW_TOKENS:
        raise ItemsError(f"max_new_tokens is {value!r}; it must be a whole number in [1, {MAX_NEW_TOKENS}]")
    return value


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_STOP_STRINGS:
        raise ItemsError(f"stop must be a list of at most {MAX_STOP_STRINGS} strings")
    if not all(isinstance(s, str) and 1 <= len(s) <= MAX_STOP_CHARS for s in value):
        raise ItemsError(f"each stop string must be 1-{MAX_STOP_CHARS} characters")
    return tuple(value)


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def hashed_split(item_id: str) -> str:
    """The part an item without a `split` field belongs to, from its id alone: an item keeps its part
    when the file grows or is reordered, so nothing once held out is ever fitted on."""
    digest = hashlib.sha256(f"coolfusion.split/{item_id}".encode()).digest()
    return HELD_OUT if int.from_bytes(digest[:8], "big") < HELD_OUT_FRACTION * 2**64 else TUNING


def item_document(item: LabelledItem) -> dict[str, Any]:
    """The item as a line of a labelled-items file (fields at their defaults left out, split kept)."""
    document: dict[str, Any] = {"id": item.id}
    if item.tag:
        document["tag"] = item.tag
    document["split"] = item.split
    if isinstance(item.prompt, str):
        document["prompt"] = item.prompt
    else:
        document["messages"] = item.request_prompt
    document["answers"] = list(item.answers)
    if item.rule != AnswerRule.FIRST_PHRASE:
        document["rule"] = str(item.rule)
    if item.field is not None:
        document["field"] = item.field
    if item.max_new_tokens != DEFAULT_MAX_NEW_TOKENS:
        document["max_new_tokens"] = item.max_new_tokens
    if item.stop:
        document["stop"] = list(item.stop)
    return document


def write_items(items: Sequence[LabelledItem], path: Path) -> None:
    """Writes `items` as a labelled-items file, one JSON object a line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (json.dumps(item_document(item), ensure_ascii=False) for item in items)
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
