"""Writes extraction.jsonl, the structured-extraction workload of README.md here: fields read from
short texts into JSON under a schema (docs/design.md chapter 9), written for this project.

    .venv/bin/python calibration/workloads/write_extraction.py calibration/workloads/extraction.jsonl

Each text is asked once per field: an item per (text, field), under the text's schema, checked by
the `json_field` rule, so an item's accuracy is a field's and items of one text share one fused
answer. The same code writes the same file (fixed seeds); the split is fixed per text by its index
(even: tuning, odd: held-out), before anything was explored or fitted."""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

MAX_NEW_TOKENS = 48
TEXTS_PER_TAG = 50

FIRST = [
    "Maria",
    "Tom",
    "Aiko",
    "Pierre",
    "Edna",
    "Ravi",
    "Lena",
    "Omar",
    "Sofia",
    "Jonas",
    "Keiko",
    "Diego",
    "Amara",
    "Felix",
    "Ines",
    "Nikolai",
    "Zara",
    "Hugo",
    "Priya",
    "Mateo",
]
LAST = [
    "Lopez",
    "Becker",
    "Tanaka",
    "Dubois",
    "Clarke",
    "Patel",
    "Novak",
    "Haddad",
    "Rossi",
    "Berg",
    "Sato",
    "Alvarez",
    "Okafor",
    "Wagner",
    "Costa",
    "Petrov",
    "Khan",
    "Laurent",
    "Iyer",
    "Silva",
]
CITIES = [
    "Seville",
    "Hamburg",
    "Osaka",
    "Lyon",
    "Leeds",
    "Pune",
    "Prague",
    "Cairo",
    "Turin",
    "Bergen",
    "Kyoto",
    "Valencia",
    "Lagos",
    "Vienna",
    "Porto",
    "Kazan",
    "Lahore",
    "Nantes",
    "Chennai",
    "Cusco",
]
PRODUCTS = [
    "lamp",
    "chair",
    "kettle",
    "notebook",
    "backpack",
    "umbrella",
    "blender",
    "mirror",
    "candle",
    "helmet",
    "jacket",
    "teapot",
    "drill",
    "cushion",
    "scarf",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
ROOMS = ["Atlas", "Birch", "Cedar", "Delta", "Ember", "Falcon", "Grove", "Harbor", "Iris", "Juniper"]

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"}},
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
ORDER = {
    "type": "object",
    "properties": {"product": {"type": "string"}, "quantity": {"type": "integer"}, "price": {"type": "number"}},
    "required": ["product", "quantity", "price"],
    "additionalProperties": False,
}
MEETING = {
    "type": "object",
    "properties": {"day": {"enum": DAYS}, "hour": {"type": "integer"}, "room": {"type": "string"}},
    "required": ["day", "hour", "room"],
    "additionalProperties": False,
}


def person(rng: random.Random) -> tuple[str, dict]:
    name, age, city = f"{rng.choice(FIRST)} {rng.choice(LAST)}", rng.randint(19, 88), rng.choice(CITIES)
    text = rng.choice(
        [
            f"{name}, {age}, moved to {city} last spring.",
            f"The new manager is {name}; at {age} she still lives in {city}.",
            f"{name} (age {age}) works from {city}.",
            f"At {age}, {name} still cycles across {city} every day.",
            f"Born {age} years ago, {name} has always lived in {city}.",
        ]
    )
    return text, {"name": name, "age": age, "city": city}


def order(rng: random.Random) -> tuple[str, dict]:
    product, quantity, price = rng.choice(PRODUCTS), rng.randint(2, 12), rng.choice([4.5, 9.99, 12.0, 15.25, 30.0, 7.8])
    text = rng.choice(
        [
            f"Please send {quantity} of the {product} at {price} euros each.",
            f"We ordered {quantity} units of {product}, {price} per unit.",
            f"Invoice: {product} x{quantity}, unit price {price}.",
            f"I'd like {quantity} more of that {product}; it was {price} a piece.",
        ]
    )
    return text, {"product": product, "quantity": quantity, "price": price}


def meeting(rng: random.Random) -> tuple[str, dict]:
    day, hour, room = rng.choice(DAYS), rng.randint(8, 17), rng.choice(ROOMS)
    text = rng.choice(
        [
            f"The review is on {day} at {hour}:00 in room {room}.",
            f"Let's meet {day}, {hour} o'clock, in the {room} room.",
            f"Moved: planning now starts at {hour}:00 on {day}, room {room}.",
            f"See you in {room} on {day} at {hour}h.",
        ]
    )
    return text, {"day": day, "hour": hour, "room": room}


# tag -> (schema, two worked examples written here, draw of a (text, fields) pair, seed)
TAGS: dict[str, tuple[dict, list[tuple[str, dict]], Callable[[random.Random], tuple[str, dict]], int]] = {
    "person": (
        PERSON,
        [
            ("Anna Weiss, 52, teaches in Graz.", {"name": "Anna Weiss", "age": 52, "city": "Graz"}),
            ("Our tenant Paul Mercier (41) comes from Lille.", {"name": "Paul Mercier", "age": 41, "city": "Lille"}),
        ],
        person,
        101,
    ),
    "order": (
        ORDER,
        [
            ("Add 3 of the mugs at 6.5 each.", {"product": "mug", "quantity": 3, "price": 6.5}),
            ("Order: desk x2, unit price 120.0.", {"product": "desk", "quantity": 2, "price": 120.0}),
        ],
        order,
        202,
    ),
    "meeting": (
        MEETING,
        [
            ("Standup moves to Friday at 9:00 in room Oak.", {"day": "Friday", "hour": 9, "room": "Oak"}),
            ("Budget talk: Monday, 14 o'clock, Willow room.", {"day": "Monday", "hour": 14, "room": "Willow"}),
        ],
        meeting,
        303,
    ),
}


def compact(value: dict) -> str:
    return json.dumps(value, separators=(", ", ": "), ensure_ascii=False)


def prompt(examples: list[tuple[str, dict]], text: str) -> str:
    shots = [f"Text: {t}\nJSON:\n{compact(v)}" for t, v in examples]
    return "Read the fields of each text as JSON.\n\n" + "\n\n".join([*shots, f"Text: {text}\nJSON:\n"])


def items() -> list[dict]:
    lines = []
    for tag, (schema, examples, draw, seed) in TAGS.items():
        rng, seen = random.Random(seed), set[str]()
        while len(seen) < TEXTS_PER_TAG:
            text, fields = draw(rng)
            if text in seen:
                continue
            index = len(seen)
            seen.add(text)
            for field, value in fields.items():
                lines.append(
                    {
                        "id": f"{tag}:{index}:{field}",
                        "tag": tag,
                        "split": "tuning" if index % 2 == 0 else "held-out",
                        "prompt": prompt(examples, text),
                        "json_schema": schema,
                        "answers": [str(value)],
                        "rule": "json_field",
                        "field": field,
                        "max_new_tokens": MAX_NEW_TOKENS,
                    }
                )
    return lines


def main() -> int:
    out = Path(sys.argv[1])
    out.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
