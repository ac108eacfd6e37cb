"""Writes records.jsonl, the labelled-items workload of README.md here: few-shot "Field: value"
records in five tags, unlike the task families' sentences, written for this project.

    .venv/bin/python calibration/workloads/write_records.py calibration/workloads/records.jsonl

The same code writes the same file (the numbers are drawn with fixed seeds); the split is the
labelled-items default (a hash of each id), fixed before anything was explored or fitted."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

STOP = ["\n"]
MAX_NEW_TOKENS = 8

# Each table line reads `asked = answer | alias | ...`; the first answer is the reference.
PLURALS = """
child = children
man = men
woman = women
foot = feet
goose = geese
person = people | persons
ox = oxen
louse = lice
die = dice
cactus = cacti | cactuses
fungus = fungi | funguses
nucleus = nuclei
crisis = crises
thesis = theses
analysis = analyses
phenomenon = phenomena
criterion = criteria
leaf = leaves
knife = knives
wife = wives
wolf = wolves
half = halves
loaf = loaves
shelf = shelves
thief = thieves
calf = calves
life = lives
hero = heroes
potato = potatoes
tomato = tomatoes
echo = echoes
city = cities
baby = babies
party = parties
lady = ladies
story = stories
church = churches
bus = buses | busses
glass = glasses
dish = dishes
fox = foxes
watch = watches
sheep = sheep
deer = deer
fish = fish | fishes
series = series
species = species
moose = moose
aircraft = aircraft
roof = roofs
chief = chiefs
piano = pianos
photo = photos
key = keys
toy = toys
monkey = monkeys
berry = berries
wish = wishes
quiz = quizzes
tooth = teeth
"""
PLURAL_SHOTS = (("mouse", "mice"), ("box", "boxes"), ("apple", "apples"))

PAST_TENSES = """
begin = began
break = broke
bring = brought
build = built
buy = bought
catch = caught
choose = chose
come = came
dig = dug
draw = drew
drink = drank
drive = drove
fall = fell
feed = fed
feel = felt
fight = fought
find = found
fly = flew
forget = forgot
freeze = froze
give = gave
grow = grew
hear = heard
hide = hid
hold = held
keep = kept
know = knew
lead = led
leave = left
lend = lent
lose = lost
meet = met
pay = paid
ride = rode
ring = rang
rise = rose
run = ran
sell = sold
shake = shook
shoot = shot
sing = sang
sink = sank
speak = spoke
spend = spent
stand = stood
steal = stole
swim = swam
teach = taught
tear = tore
throw = threw
wake = woke
wear = wore
write = wrote
bite = bit
seek = sought
weep = wept
walk = walked
cry = cried
stop = stopped
carry = carried
"""
PAST_SHOTS = (("go", "went"), ("take", "took"), ("jump", "jumped"))

# No capital city: the task families ask capitals.
CITIES = """
Munich = Germany
Barcelona = Spain
Milan = Italy
Porto = Portugal
Krakow = Poland
Gothenburg = Sweden
Bergen = Norway
Antwerp = Belgium
Rotterdam = Netherlands | The Netherlands | Holland
Zurich = Switzerland
Salzburg = Austria
Thessaloniki = Greece
Izmir = Turkey | Türkiye
Saint Petersburg = Russia
Kharkiv = Ukraine
Edinburgh = Scotland | United Kingdom | UK
Manchester = England | United Kingdom | UK
Cork = Ireland
Marseille = France
Seville = Spain
Naples = Italy
Hamburg = Germany
Chicago = United States | USA | US | America | United States of America
Houston = United States | USA | US | America | United States of America
Vancouver = Canada
Monterrey = Mexico
Guadalajara = Mexico
Medellin = Colombia
Rio de Janeiro = Brazil
Sao Paulo = Brazil
Rosario = Argentina
Valparaiso = Chile
Cusco = Peru
Guayaquil = Ecuador
Casablanca = Morocco
Alexandria = Egypt
Lagos = Nigeria
Johannesburg = South Africa
Mombasa = Kenya
Mumbai = India
Kolkata = India
Karachi = Pakistan
Chittagong = Bangladesh
Shanghai = China
Shenzhen = China
Busan = South Korea | Korea
Kyoto = Japan
Ho Chi Minh City = Vietnam | Viet Nam
Chiang Mai = Thailand
Cebu = Philippines | The Philippines
Surabaya = Indonesia
Melbourne = Australia
Sydney = Australia
Auckland = New Zealand
Dubai = United Arab Emirates | UAE
Jeddah = Saudi Arabia
Isfahan = Iran
Basra = Iraq
Haifa = Israel
Venice = Italy
"""
CITY_SHOTS = (("Lyon", "France"), ("Osaka", "Japan"), ("Toronto", "Canada"))

WORDS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
]
WORD_MATH_SHOTS = (("two plus three", "5"), ("nine minus four", "5"), ("three times six", "18"))
SEQUENCE_SHOTS = (("2, 4, 6, 8", "10"), ("40, 35, 30, 25", "20"), ("1, 3, 9, 27", "81"))
PER_TAG = 60


def _table(text: str) -> list[tuple[str, list[str]]]:
    rows = []
    for line in text.strip().splitlines():
        asked, answers = line.split(" = ")
        rows.append((asked.strip(), [a.strip() for a in answers.split("|")]))
    return rows


def _record(field: str, answer_field: str, shots: tuple[tuple[str, str], ...], asked: str) -> str:
    """The shots as complete records separated by blank lines, then the asked record up to its answer."""
    blocks = [f"{field}: {q}\n{answer_field}: {a}" for q, a in shots]
    return "\n\n".join([*blocks, f"{field}: {asked}\n{answer_field}:"])


def _word_math(rng: random.Random) -> list[tuple[str, str]]:
    """Distinct "seven plus five" questions with whole answers from 0 to 100, operations in turn."""
    drawn: dict[str, str] = {}
    shots = {q for q, _ in WORD_MATH_SHOTS}
    operations = [("plus", lambda a, b: a + b), ("minus", lambda a, b: a - b), ("times", lambda a, b: a * b)]
    while len(drawn) < PER_TAG:
        name, apply = operations[len(drawn) % len(operations)]
        a, b = rng.randint(2, 20), rng.randint(2, 12 if name == "times" else 20)
        if name == "minus" and b > a:
            a, b = b, a
        question = f"{WORDS[a]} {name} {WORDS[b]}"
        if question not in shots and question not in drawn:
            drawn[question] = str(apply(a, b))
    return list(drawn.items())


def _sequences(rng: random.Random) -> list[tuple[str, str]]:
    """Four terms and the fifth of a sequence that rises by a step, falls by one, multiplies by 2
    or 3, or rises by a step that grows by one each time; the kinds in turn."""
    drawn: dict[str, str] = {}
    shots = {q for q, _ in SEQUENCE_SHOTS}
    while len(drawn) < PER_TAG:
        kind = len(drawn) % 4
        if kind == 0:
            start, step = rng.randint(1, 30), rng.randint(2, 12)
            terms = [start + step * i for i in range(5)]
        elif kind == 1:
            step = rng.randint(2, 9)
            start = rng.randint(4 * step + 1, 99)
            terms = [start - step * i for i in range(5)]
        elif kind == 2:
            start, ratio = rng.randint(1, 12), rng.choice((2, 3))
            terms = [start * ratio**i for i in range(5)]
        else:
            start, step = rng.randint(1, 40), rng.randint(1, 5)
            terms = [start + step * i + i * (i - 1) // 2 for i in range(5)]
        question = ", ".join(map(str, terms[:4]))
        if question not in shots and question not in drawn:
            drawn[question] = str(terms[4])
    return list(drawn.items())


def items() -> list[dict[str, object]]:
    """Every item, tag by tag, each a labelled-items line."""
    rng = random.Random(2027)
    words = [
        ("plural", "Singular", "Plural", PLURAL_SHOTS, _table(PLURALS), "first_phrase"),
        ("past-tense", "Verb", "Past", PAST_SHOTS, _table(PAST_TENSES), "first_phrase"),
        ("country", "City", "Country", CITY_SHOTS, _table(CITIES), "first_phrase"),
    ]
    numbers = [
        ("sequence", "Sequence", "Next", SEQUENCE_SHOTS, [(q, [a]) for q, a in _sequences(rng)], "number"),
        ("word-math", "Question", "Answer", WORD_MATH_SHOTS, [(q, [a]) for q, a in _word_math(rng)], "number"),
    ]
    made = []
    for tag, field, answer_field, shots, rows, rule in words + numbers:
        assert len(rows) == PER_TAG and len({q for q, _ in rows}) == PER_TAG, tag
        for asked, answers in rows:
            line: dict[str, object] = {"id": f"{tag}:{asked}", "tag": tag}
            line |= {"prompt": _record(field, answer_field, shots, asked), "answers": answers}
            if rule != "first_phrase":
                line["rule"] = rule
            made.append(line | {"max_new_tokens": MAX_NEW_TOKENS, "stop": STOP})
    return made


def main(out: Path) -> None:
    written = items()
    out.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in written), encoding="utf-8")
    print(f"{len(written)} items in {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
