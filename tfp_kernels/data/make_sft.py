"""Generates the bundled default SFT dataset ``sft_default.jsonl.gz`` (synthetic, seeded, CC0).

Alpaca-format records (``instruction``, ``input``, ``output``, plus a ``topic`` field) on eight distinct
topics, written from templates filled by a seeded ``random.Random``; 5% of the records are planted
near-duplicates (another record's instruction with a small edit, same answer), the pairs TFP keeps
apart. The answers are computed (arithmetic, conversions, dates) or taken from small fact tables, so
they are correct.

A duplicate-heavy variant (:func:`make_duplicate_heavy_records`, ``--duplicate-fraction``): a fraction of the
records share one instruction ("Summarize the following text.") with differing inputs, as in Alpaca, where
embedding the instruction makes them exact duplicates; TFP's walk runs out of valid neighbours on such data.

Usage::

    python -m tfp_kernels.data.make_sft                       # regenerate the bundled file
    python -m tfp_kernels.data.make_sft --num 100000 --out big.jsonl   # a bigger set (.jsonl or .jsonl.gz)
    python -m tfp_kernels.data.make_sft --num 3000 --duplicate-fraction 0.2 --out dup.jsonl  # 600 share one

The same ``--num`` and ``--seed`` give the same bytes on every machine (Python's ``random.Random``
with integer seeds is stable across platforms and versions; gzip headers carry no name or time).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random

NUM_RECORDS = 4000
SEED = 20240817
NEAR_DUPLICATE_FRACTION = 0.05
DEFAULT_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sft_default.jsonl.gz")

TOPICS = ("arithmetic", "python", "geography", "cooking", "units", "grammar", "animals", "calendar")

# ----------------------------------------------------------------------------------------- arithmetic

_NAMES = (
    "Ana",
    "Ben",
    "Chen",
    "Dara",
    "Eli",
    "Fatima",
    "Goran",
    "Hana",
    "Ivan",
    "Jia",
    "Kofi",
    "Lena",
    "Mateo",
    "Nora",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sami",
    "Tariq",
    "Uma",
    "Viktor",
    "Wen",
    "Yara",
)
_ITEMS = ("apples", "pencils", "stickers", "marbles", "books", "cookies", "stamps", "shells", "cards", "eggs")


def _arithmetic(rng: random.Random) -> tuple[str, str, str]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    kind = rng.randrange(5)
    if kind == 0:
        a, b = rng.randint(5, 90), rng.randint(5, 90)
        q = f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?"
        return (
            q,
            "",
            f"{name} starts with {a} {item} and adds {b}: {a} + {b} = {a + b}.\nThe answer is {a + b}.",
        )
    if kind == 1:
        a = rng.randint(20, 120)
        b = rng.randint(1, a - 1)
        q = f"{name} had {a} {item} and gave {b} of them to a friend. How many {item} are left?"
        return q, "", f"{name} gives away {b} of {a} {item}: {a} - {b} = {a - b}.\nThe answer is {a - b}."
    if kind == 2:
        boxes, per = rng.randint(2, 12), rng.randint(3, 25)
        q = f"A shop packs {per} {item} into each box. How many {item} are in {boxes} boxes?"
        return (
            q,
            "",
            f"Each of the {boxes} boxes holds {per} {item}: {boxes} x {per} = {boxes * per}.\nThe answer is {boxes * per}.",
        )
    if kind == 3:
        per, groups = rng.randint(2, 15), rng.randint(2, 12)
        total = per * groups
        q = f"{name} shares {total} {item} equally among {groups} friends. How many {item} does each friend get?"
        return (
            q,
            "",
            f"Dividing {total} {item} into {groups} equal shares: {total} / {groups} = {per}.\nThe answer is {per}.",
        )
    price, count, paid = rng.randint(2, 9), rng.randint(2, 8), 0
    cost = price * count
    paid = cost + rng.randint(1, 30)
    q = (
        f"{name} buys {count} {item} at {price} dollars each and pays with {paid} dollars. "
        f"How much change does {name} get?"
    )
    a = (
        f"The {item} cost {count} x {price} = {cost} dollars.\nThe change is {paid} - {cost} = {paid - cost} dollars.\n"
        f"The answer is {paid - cost}."
    )
    return q, "", a


# --------------------------------------------------------------------------------------------- python

_PY_TASKS = (
    (
        "returns the sum of a list of numbers",
        "total",
        ("def {f}(numbers):\n    total = 0\n    for x in numbers:\n        total += x\n    return total"),
        "[1, 2, 3]",
        "6",
    ),
    (
        "returns the largest number in a list",
        "largest",
        (
            "def {f}(numbers):\n    best = numbers[0]\n"
            "    for x in numbers[1:]:\n        if x > best:\n            best = x\n    return best"
        ),
        "[4, 9, 2]",
        "9",
    ),
    ("reverses a string", "reversed_text", "def {f}(text):\n    return text[::-1]", "'abc'", "'cba'"),
    (
        "counts the vowels in a string",
        "vowels",
        ("def {f}(text):\n    return sum(1 for ch in text.lower() if ch in 'aeiou')"),
        "'banana'",
        "3",
    ),
    (
        "checks whether a number is prime",
        "is_prime",
        (
            "def {f}(n):\n    if n < 2:\n        return False\n"
            "    i = 2\n    while i * i <= n:\n        if n % i == 0:\n            return False\n        i += 1\n"
            "    return True"
        ),
        "7",
        "True",
    ),
    (
        "computes the factorial of n",
        "factorial",
        (
            "def {f}(n):\n    result = 1\n    for k in range(2, n + 1):\n"
            "        result *= k\n    return result"
        ),
        "5",
        "120",
    ),
    (
        "returns the n-th Fibonacci number",
        "fib",
        ("def {f}(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a"),
        "10",
        "55",
    ),
    (
        "removes duplicates from a list while keeping the order",
        "unique",
        (
            "def {f}(items):\n    seen = set()\n"
            "    out = []\n    for x in items:\n        if x not in seen:\n            seen.add(x)\n"
            "            out.append(x)\n    return out"
        ),
        "[3, 1, 3, 2, 1]",
        "[3, 1, 2]",
    ),
    (
        "flattens a list of lists",
        "flatten",
        "def {f}(lists):\n    return [x for inner in lists for x in inner]",
        "[[1, 2], [3]]",
        "[1, 2, 3]",
    ),
    (
        "counts how often each word occurs in a sentence",
        "word_counts",
        (
            "def {f}(sentence):\n    counts = {{}}\n"
            "    for word in sentence.split():\n        counts[word] = counts.get(word, 0) + 1\n    return counts"
        ),
        "'a b a'",
        "{{'a': 2, 'b': 1}}",
    ),
    (
        "checks whether a string is a palindrome",
        "is_palindrome",
        (
            "def {f}(text):\n    clean = "
            "''.join(ch.lower() for ch in text if ch.isalnum())\n    return clean == clean[::-1]"
        ),
        "'Level'",
        "True",
    ),
    (
        "returns the average of a list of numbers",
        "mean",
        (
            "def {f}(numbers):\n    if not numbers:\n"
            "        raise ValueError('empty list')\n    return sum(numbers) / len(numbers)"
        ),
        "[2, 4, 9]",
        "5.0",
    ),
)
_PY_ASK = (
    "Write a Python function that {task}.",
    "Implement a Python function which {task}.",
    "Show me Python code for a function that {task}.",
    "In Python, write a function that {task}.",
)
_PY_SUFFIX = ("", "_of", "_value", "_result")


def _python(rng: random.Random) -> tuple[str, str, str]:
    task, stem, body, example_in, example_out = rng.choice(_PY_TASKS)
    f = stem + rng.choice(_PY_SUFFIX)
    q = rng.choice(_PY_ASK).format(task=task)
    inp = f"Name the function {f}." if rng.random() < 0.5 else ""
    code = body.format(f=f)
    a = f"```python\n{code}\n```\n\nExample: `{f}({example_in})` returns `{example_out}`.".replace(
        "{{", "{"
    ).replace("}}", "}")
    return q, inp, a


# ------------------------------------------------------------------------------------------ geography

_COUNTRIES = (
    ("France", "Paris", "Europe"),
    ("Germany", "Berlin", "Europe"),
    ("Italy", "Rome", "Europe"),
    ("Spain", "Madrid", "Europe"),
    ("Portugal", "Lisbon", "Europe"),
    ("Poland", "Warsaw", "Europe"),
    ("Sweden", "Stockholm", "Europe"),
    ("Norway", "Oslo", "Europe"),
    ("Greece", "Athens", "Europe"),
    ("Austria", "Vienna", "Europe"),
    ("Japan", "Tokyo", "Asia"),
    ("China", "Beijing", "Asia"),
    ("India", "New Delhi", "Asia"),
    ("Thailand", "Bangkok", "Asia"),
    ("Vietnam", "Hanoi", "Asia"),
    ("South Korea", "Seoul", "Asia"),
    ("Indonesia", "Jakarta", "Asia"),
    ("Egypt", "Cairo", "Africa"),
    ("Kenya", "Nairobi", "Africa"),
    ("Nigeria", "Abuja", "Africa"),
    ("Ghana", "Accra", "Africa"),
    ("Morocco", "Rabat", "Africa"),
    ("Ethiopia", "Addis Ababa", "Africa"),
    ("Canada", "Ottawa", "North America"),
    ("Mexico", "Mexico City", "North America"),
    ("Cuba", "Havana", "North America"),
    ("Brazil", "Brasilia", "South America"),
    ("Argentina", "Buenos Aires", "South America"),
    ("Peru", "Lima", "South America"),
    ("Chile", "Santiago", "South America"),
    ("Colombia", "Bogota", "South America"),
    ("Australia", "Canberra", "Oceania"),
    ("New Zealand", "Wellington", "Oceania"),
    ("Fiji", "Suva", "Oceania"),
)


def _geography(rng: random.Random) -> tuple[str, str, str]:
    country, capital, continent = rng.choice(_COUNTRIES)
    kind = rng.randrange(3)
    if kind == 0:
        q = rng.choice(
            (
                "What is the capital of {c}?",
                "Name the capital city of {c}.",
                "Which city is the capital of {c}?",
            )
        ).format(c=country)
        return q, "", f"The capital of {country} is {capital}. {country} is in {continent}."
    if kind == 1:
        q = rng.choice(("On which continent is {c}?", "Which continent is {c} part of?")).format(c=country)
        return q, "", f"{country} is in {continent}; its capital is {capital}."
    q = rng.choice(("{k} is the capital of which country?", "Which country has {k} as its capital?")).format(
        k=capital
    )
    return q, "", f"{capital} is the capital of {country}, in {continent}."


# -------------------------------------------------------------------------------------------- cooking

_DISHES = (
    (
        "pancakes",
        ["flour", "milk", "eggs", "a pinch of salt", "butter for the pan"],
        [
            "Whisk the flour, milk, eggs and salt into a smooth batter.",
            "Let the batter rest for ten minutes.",
            "Heat a little butter in a pan over medium heat.",
            "Pour in a ladle of batter and cook until bubbles form.",
            "Flip and cook the other side for one minute.",
        ],
    ),
    (
        "tomato soup",
        ["tomatoes", "an onion", "garlic", "vegetable stock", "olive oil"],
        [
            "Soften the chopped onion and garlic in olive oil.",
            "Add the chopped tomatoes and the stock.",
            "Simmer for twenty minutes.",
            "Blend until smooth and season to taste.",
        ],
    ),
    (
        "fried rice",
        ["cooked rice", "eggs", "peas", "spring onions", "soy sauce", "oil"],
        [
            "Heat oil in a wok until very hot.",
            "Scramble the eggs and set them aside.",
            "Stir-fry the rice and peas for three minutes.",
            "Add the eggs, spring onions and soy sauce and toss.",
        ],
    ),
    (
        "guacamole",
        ["ripe avocados", "lime juice", "salt", "chopped onion", "coriander"],
        [
            "Mash the avocados with a fork.",
            "Stir in lime juice, salt, onion and coriander.",
            "Taste and adjust the seasoning; serve at once.",
        ],
    ),
    (
        "banana bread",
        ["ripe bananas", "flour", "sugar", "butter", "eggs", "baking soda"],
        [
            "Heat the oven to 175 C and grease a loaf tin.",
            "Mash the bananas and mix in melted butter and sugar.",
            "Beat in the eggs, then fold in the flour and baking soda.",
            "Bake for about 60 minutes.",
        ],
    ),
    (
        "a vegetable omelette",
        ["eggs", "peppers", "spinach", "cheese", "butter"],
        [
            "Beat the eggs with a pinch of salt.",
            "Soften the peppers and spinach in butter.",
            "Pour the eggs over the vegetables and cook gently.",
            "Add cheese, fold and serve.",
        ],
    ),
    (
        "lentil curry",
        ["red lentils", "an onion", "curry paste", "coconut milk", "spinach"],
        [
            "Fry the onion with the curry paste.",
            "Add rinsed lentils, coconut milk and water.",
            "Simmer until the lentils are soft, about 20 minutes.",
            "Stir in spinach until it wilts.",
        ],
    ),
)
_SUBSTITUTES = (
    ("buttermilk", "milk with a spoon of lemon juice"),
    ("eggs in baking", "mashed banana or apple sauce"),
    ("butter", "the same weight of margarine or three quarters of the weight in oil"),
    ("fresh herbs", "a third of the amount of dried herbs"),
    ("brown sugar", "white sugar with a little molasses"),
)


def _cooking(rng: random.Random) -> tuple[str, str, str]:
    kind = rng.randrange(3)
    if kind < 2:
        dish, ingredients, steps = rng.choice(_DISHES)
        serves = rng.randint(2, 6)
        q = rng.choice(
            ("How do I make {d}?", "Give me a simple recipe for {d}.", "What are the steps to cook {d}?")
        ).format(d=dish)
        inp = f"It should serve {serves} people." if kind == 1 else ""
        lines = [f"Ingredients: {', '.join(ingredients)}."] + [f"{i + 1}. {s}" for i, s in enumerate(steps)]
        if kind == 1:
            lines.append(f"Scale the amounts for {serves} servings.")
        return q, inp, "\n".join(lines)
    what, sub = rng.choice(_SUBSTITUTES)
    q = rng.choice(("What can I use instead of {w}?", "Suggest a substitute for {w}.")).format(w=what)
    return q, "", f"You can replace {what} with {sub}."


# ---------------------------------------------------------------------------------------------- units

_CONVERSIONS = (
    ("kilometres", "miles", lambda x: x * 0.621371),
    ("miles", "kilometres", lambda x: x * 1.609344),
    ("kilograms", "pounds", lambda x: x * 2.204623),
    ("pounds", "kilograms", lambda x: x * 0.45359237),
    ("litres", "US gallons", lambda x: x * 0.264172),
    ("inches", "centimetres", lambda x: x * 2.54),
    ("degrees Celsius", "degrees Fahrenheit", lambda x: x * 9 / 5 + 32),
    ("degrees Fahrenheit", "degrees Celsius", lambda x: (x - 32) * 5 / 9),
)


def _units(rng: random.Random) -> tuple[str, str, str]:
    src, dst, f = rng.choice(_CONVERSIONS)
    x = rng.randint(1, 250)
    q = rng.choice(
        ("Convert {x} {s} to {d}.", "How many {d} are {x} {s}?", "What is {x} {s} in {d}?")
    ).format(x=x, s=src, d=dst)
    return q, "", f"{x} {src} is about {f(x):.2f} {dst}."


# -------------------------------------------------------------------------------------------- grammar

_SUBJECTS = (
    ("She", "he/she/it"),
    ("He", "he/she/it"),
    ("My brother", "he/she/it"),
    ("The dog", "he/she/it"),
    ("Our teacher", "he/she/it"),
)
_VERBS = (
    ("go", "goes"),
    ("watch", "watches"),
    ("play", "plays"),
    ("study", "studies"),
    ("have", "has"),
    ("do", "does"),
    ("fix", "fixes"),
    ("read", "reads"),
)
_PLACES = (
    "to school every day",
    "football on Sundays",
    "the news in the evening",
    "math after dinner",
    "a lot of homework",
    "the dishes at night",
    "old bikes in the garage",
    "a book before bed",
)
_PLURALS = (
    ("child", "children"),
    ("mouse", "mice"),
    ("goose", "geese"),
    ("man", "men"),
    ("tooth", "teeth"),
    ("foot", "feet"),
    ("person", "people"),
    ("cactus", "cacti"),
    ("sheep", "sheep"),
    ("leaf", "leaves"),
)


def _grammar(rng: random.Random) -> tuple[str, str, str]:
    if rng.random() < 0.6:
        subject, _ = rng.choice(_SUBJECTS)
        i = rng.randrange(len(_VERBS))
        base, third = _VERBS[i]
        rest = _PLACES[i]
        wrong, right = f"{subject} {base} {rest}.", f"{subject} {third} {rest}."
        q = rng.choice(
            (
                "Correct the grammar in the following sentence.",
                "Fix the grammatical error in this sentence.",
                "Rewrite the sentence so that it is grammatically correct.",
            )
        )
        return (
            q,
            wrong,
            f"{right}\nThe subject '{subject}' is third person singular, so the verb is '{third}'.",
        )
    noun, plural = rng.choice(_PLURALS)
    q = rng.choice(("What is the plural of '{n}'?", "Give the plural form of the noun '{n}'.")).format(n=noun)
    return q, "", f"The plural of '{noun}' is '{plural}'."


# -------------------------------------------------------------------------------------------- animals

_ANIMALS = (
    ("dolphin", "mammal", "fish and squid"),
    ("whale shark", "fish", "plankton"),
    ("bat", "mammal", "insects or fruit"),
    ("penguin", "bird", "fish and krill"),
    ("crocodile", "reptile", "fish and larger animals"),
    ("frog", "amphibian", "insects"),
    ("owl", "bird", "small mammals"),
    ("koala", "mammal", "eucalyptus leaves"),
    ("salmon", "fish", "small fish and insects"),
    ("turtle", "reptile", "plants or small animals, by species"),
    ("salamander", "amphibian", "worms and insects"),
    ("giraffe", "mammal", "leaves of tall trees"),
    ("eagle", "bird", "fish and small mammals"),
    ("snake", "reptile", "rodents and eggs"),
)


def _animals(rng: random.Random) -> tuple[str, str, str]:
    animal, cls, food = rng.choice(_ANIMALS)
    if rng.random() < 0.5:
        q = rng.choice(
            (
                "Is a {a} a mammal, bird, reptile, amphibian or fish?",
                "To which class of vertebrates does the {a} belong?",
            )
        ).format(a=animal)
        return q, "", f"The {animal} is a {cls}."
    q = rng.choice(("What does a {a} eat?", "Describe the diet of the {a}.")).format(a=animal)
    return q, "", f"The {animal} ({cls}) mainly eats {food}."


# ------------------------------------------------------------------------------------------- calendar

_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = (
    ("January", 31),
    ("February", 28),
    ("March", 31),
    ("April", 30),
    ("May", 31),
    ("June", 30),
    ("July", 31),
    ("August", 31),
    ("September", 30),
    ("October", 31),
    ("November", 30),
    ("December", 31),
)


def _calendar(rng: random.Random) -> tuple[str, str, str]:
    if rng.random() < 0.6:
        d, n = rng.randrange(7), rng.randint(1, 400)
        q = rng.choice(
            (
                "What day of the week is it {n} days after a {d}?",
                "If today is {d}, which weekday will it be in {n} days?",
            )
        ).format(n=n, d=_DAYS[d])
        return (
            q,
            "",
            (
                f"{n} days is {n // 7} weeks and {n % 7} days; {n % 7} days after {_DAYS[d]} is "
                f"{_DAYS[(d + n) % 7]}."
            ),
        )
    m = rng.randrange(12)
    name, days = _MONTHS[m]
    q = rng.choice(("How many days does {m} have?", "How many days are there in {m}?")).format(m=name)
    extra = " (29 in a leap year)" if name == "February" else ""
    return q, "", f"{name} has {days} days{extra}."


_GENERATORS = {
    "arithmetic": _arithmetic,
    "python": _python,
    "geography": _geography,
    "cooking": _cooking,
    "units": _units,
    "grammar": _grammar,
    "animals": _animals,
    "calendar": _calendar,
}


def _near_duplicate(rng: random.Random, text: str) -> str:
    """A small edit of ``text``: the pairs TFP must not put side by side."""
    kind = rng.randrange(4)
    if kind == 0:
        return "Please " + text[0].lower() + text[1:]
    if kind == 1:
        return text.rstrip(".?") + ("?" if text.endswith(".") else ".")
    if kind == 2:
        return text + " Thanks!"
    return text.replace(" ", "  ", 1)


_NOTES = (
    "Let me know if you would like a more detailed explanation.",
    "I hope this helps.",
    "Feel free to ask a follow-up question.",
    "A quick way to check such an answer is to work it out a second way.",
    "If anything is unclear, I can go through it step by step.",
    "This kind of question often comes up in exercises and quizzes.",
    "Writing the steps down makes mistakes easier to spot.",
    "It is worth double-checking the details before relying on them.",
    "Similar questions can be answered in the same way.",
    "Short, clear answers are usually the easiest to remember.",
    "You can try a few more examples on your own to practise.",
    "Good luck with the rest of your work!",
)


def _notes(rng: random.Random) -> str:
    """0 to 8 closing sentences, so that lengths vary inside every topic (not a topic fingerprint)."""
    k = rng.choice((0, 0, 0, 1, 2, 3, 5, 8))
    return "".join("\n" + rng.choice(_NOTES) for _ in range(k))


def make_records(num: int = NUM_RECORDS, seed: int = SEED) -> list[dict]:
    """``num`` alpaca records (``instruction``, ``input``, ``output``, ``topic``), shuffled across topics;
    about ``NEAR_DUPLICATE_FRACTION`` of them are near-duplicates of another record."""
    rng = random.Random(seed)
    records = []
    for _ in range(num):
        if records and rng.random() < NEAR_DUPLICATE_FRACTION:
            src = records[rng.randrange(len(records))]
            records.append({**src, "instruction": _near_duplicate(rng, src["instruction"])})
            continue
        topic = rng.choice(TOPICS)
        instruction, inp, output = _GENERATORS[topic](rng)
        output += _notes(rng)
        records.append({"instruction": instruction, "input": inp, "output": output, "topic": topic})
    return records


#: The instruction that :func:`make_duplicate_heavy_records` gives to its shared records.
SHARED_INSTRUCTION = "Summarize the following text."

_PASSAGE_SUBJECTS = (
    "The town council", "A small bakery", "The research team", "Our neighbour", "The school choir",
    "A local farmer", "The museum", "The football club", "A young engineer", "The library",
)
_PASSAGE_EVENTS = (
    "opened a new branch near the river", "changed its opening hours for the winter",
    "won a regional prize after years of work", "started a weekly course for beginners",
    "raised money to repair the old bridge", "moved to a larger building in the centre",
    "published a short guide for visitors", "planted two hundred trees along the main road",
    "held an open day that drew a large crowd", "replaced its heating with solar panels",
)
_PASSAGE_DETAILS = (
    "Many people said the change was overdue.", "The cost was shared with two nearby villages.",
    "Volunteers helped on every weekend.", "A second phase is planned for next spring.",
    "Local newspapers covered the story in detail.", "Some residents worried about the noise.",
    "The plan was approved by a large majority.", "Children from the primary school took part.",
    "The work finished two weeks ahead of schedule.", "Visitors can find more details online.",
)


def _passage(rng: random.Random) -> tuple[str, str]:
    """A short text of 2 to 4 sentences and its one-sentence summary."""
    subject, event = rng.choice(_PASSAGE_SUBJECTS), rng.choice(_PASSAGE_EVENTS)
    details = rng.sample(_PASSAGE_DETAILS, rng.randint(1, 3))
    text = f"{subject} {event} in {rng.randint(1990, 2024)}. " + " ".join(details)
    return text, f"{subject} {event}."


def make_duplicate_heavy_records(num: int, duplicate_fraction: float, seed: int = SEED,
                                 instruction: str = SHARED_INSTRUCTION) -> list[dict]:
    """``num`` alpaca records of which ``round(duplicate_fraction * num)`` share ``instruction`` (topic
    ``"summary"``), each with its own ``input`` text and summary; the others are :func:`make_records`' records.
    Shuffled with the same seed; the same arguments give the same records.

    Args:
        num: number of records (>= 0); duplicate_fraction: in [0, 1]; seed: of the generator.
    """
    if isinstance(num, bool) or not isinstance(num, int) or num < 0:
        raise ValueError(f"num must be an int >= 0, got {num!r}")
    if isinstance(duplicate_fraction, bool) or not isinstance(duplicate_fraction, (int, float)) or not (
            0.0 <= duplicate_fraction <= 1.0):
        raise ValueError(f"duplicate_fraction must be a number in [0, 1], got {duplicate_fraction!r}")
    shared = round(duplicate_fraction * num)
    rng = random.Random(seed + 1)
    records = make_records(num - shared, seed)
    for _ in range(shared):
        text, summary = _passage(rng)
        records.append({"instruction": instruction, "input": text, "output": summary + _notes(rng),
                        "topic": "summary"})
    rng.shuffle(records)
    return records


def write_jsonl(records: list[dict], path: str) -> None:
    """Write one JSON object per line (gzip when ``path`` ends in ``.gz``, with no name or time in the header)."""
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    if path.endswith(".gz"):
        with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
            f.write(data)
    else:
        with open(path, "wb") as f:
            f.write(data)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m tfp_kernels.data.make_sft", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--num", type=int, default=NUM_RECORDS, help="number of records")
    p.add_argument("--seed", type=int, default=SEED, help="seed of the generator")
    p.add_argument(
        "--out", default=DEFAULT_FILE, help="output .jsonl or .jsonl.gz (default: the bundled file)"
    )
    p.add_argument(
        "--duplicate-fraction", type=float, default=None, metavar="F",
        help=f"a duplicate-heavy set: the fraction F of the records share the instruction {SHARED_INSTRUCTION!r} "
        "with differing inputs (e.g. 0.2)",
    )
    args = p.parse_args(argv)
    if args.duplicate_fraction is not None and args.out == DEFAULT_FILE:
        p.error("--duplicate-fraction needs --out (the bundled file is the plain set)")
    if args.duplicate_fraction is None:
        records = make_records(args.num, args.seed)
    else:
        try:
            records = make_duplicate_heavy_records(args.num, args.duplicate_fraction, args.seed)
        except ValueError as err:
            p.error(str(err))
    write_jsonl(records, args.out)
    print(f"wrote {args.num} records to {args.out}")


if __name__ == "__main__":
    main()
