"""Built-in causal-LM tasks, generated from bundled data only (nothing downloads).

Every task is a deterministic generator of prompt/completion pairs with disjoint train and
test splits, scored by exact match of the first generated line (the sentiment task is then a
classification accuracy). Prompts carry no task id: a learned model has to tell the tasks
apart from the text alone, and so does the expert routing.

- arithmetic: one-step word problems with small numbers ("... How many ...?" -> "12").
- uppercase:  a short phrase rewritten in capital letters.
- dates:      a written date in ISO 8601 ("March 5, 2021" -> "2021-03-05").
- units:      metric conversions by a power of ten ("7 kilograms" in grams -> "7000").
- sentiment:  templated restaurant reviews labelled "positive" or "negative".
- reverse:    the words of a phrase in reverse order.
- code:       the next line of a Python standard-library function (`inspect.getsource`).

`DEFAULT_TASKS` is the sequence `mora eval --suite lm` learns; every task can be exported.
"""

from __future__ import annotations

import inspect
import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from mora_runtime.learn.data import LMExample

TRAIN_SIZE = 240
TEST_SIZE = 40
MAX_TEST_SIZE = 100  # train examples avoid the first this-many test prompts

_NAMES = ("Lena", "Omar", "Mia", "Ravi", "Sofia", "Jonas", "Ada", "Kenji", "Nora", "Tariq")
_ITEMS = ("apples", "pencils", "stickers", "marbles", "books", "coins", "shells", "cards")
_WORDS = (
    *("quiet", "river", "stone", "green", "window", "cloud", "silver", "morning", "garden"),
    *("bright", "yellow", "paper", "forest", "small", "candle", "winter", "market", "ocean"),
    *("gentle", "bridge", "orange", "tower", "purple", "music", "summer", "light", "quick"),
    *("brown", "simple", "planet", "happy", "coffee", "mountain", "little", "dream", "north"),
    *("warm", "table"),
)
_MONTHS = (
    *("January", "February", "March", "April", "May", "June", "July", "August"),
    *("September", "October", "November", "December"),
)
_UNITS = (  # (from, to, factor)
    ("kilometers", "meters", 1000),
    ("kilograms", "grams", 1000),
    ("liters", "milliliters", 1000),
    ("meters", "centimeters", 100),
    ("centimeters", "millimeters", 10),
)
_FOODS = ("pasta", "soup", "pizza", "curry", "salad", "bread", "coffee", "dessert")
_GOOD = ("delicious", "wonderful", "fresh", "excellent", "tasty", "perfect")
_BAD = ("bland", "awful", "cold", "terrible", "stale", "disappointing")
_STAFF_GOOD = ("friendly", "kind", "helpful", "attentive")
_STAFF_BAD = ("rude", "slow", "careless", "unfriendly")
# Small, stable pure-Python modules whose source ships with every CPython.
_CODE_MODULES = ("textwrap", "fnmatch", "colorsys", "bisect", "heapq", "shlex", "calendar")


@dataclass(frozen=True)
class LMTask:
    """A built-in task: `examples(split, n, seed)` is deterministic, splits are disjoint."""

    name: str
    description: str
    make: Callable[[random.Random], LMExample]

    def examples(self, split: str, n: int | None = None, seed: int = 0) -> list[LMExample]:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        n = n if n is not None else (TRAIN_SIZE if split == "train" else TEST_SIZE)
        if split == "test" and n > MAX_TEST_SIZE:
            raise ValueError(f"at most {MAX_TEST_SIZE} test examples per task, asked {n}")
        held_out = set()
        if split == "train":
            held_out = {e.prompt for e in self.examples("test", MAX_TEST_SIZE, seed)}
        rng = random.Random(zlib.crc32(f"{self.name}/{split}/{seed}".encode()))
        out: list[LMExample] = []
        seen: set[str] = set()
        for _ in range(200 * n):
            if len(out) == n:
                break
            example = self.make(rng)
            if example.prompt not in held_out and example.prompt not in seen:
                seen.add(example.prompt)
                out.append(example)
        if len(out) < n:
            raise ValueError(f"task {self.name!r} has only {len(out)} distinct {split} examples")
        return out


def _arithmetic(rng: random.Random) -> LMExample:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    if rng.random() < 0.5:
        verb = rng.choice(("finds", "buys", "gets", "is given"))
        question = (
            f"{name} has {a} {item} and {verb} {b} more. How many {item} does {name} have now?"
        )
        answer = a + b
    else:
        a, b = max(a, b), min(a, b)
        verb = rng.choice(("gives away", "loses", "sells"))
        question = f"{name} has {a} {item} and {verb} {b}. How many {item} are left?"
        answer = a - b
    return LMExample(f"Question: {question}\nAnswer:", f" {answer}")


def _phrase(rng: random.Random) -> list[str]:
    return rng.sample(_WORDS, rng.randint(2, 3))


def _uppercase(rng: random.Random) -> LMExample:
    words = " ".join(_phrase(rng))
    return LMExample(f"Rewrite in capital letters: {words}\nResult:", f" {words.upper()}")


def _reverse(rng: random.Random) -> LMExample:
    words = _phrase(rng)
    return LMExample(
        f"Say these words backwards: {' '.join(words)}\nResult:", f" {' '.join(words[::-1])}"
    )


def _dates(rng: random.Random) -> LMExample:
    month, day, year = rng.randint(1, 12), rng.randint(1, 28), rng.randint(1990, 2030)
    written = f"{_MONTHS[month - 1]} {day}, {year}"
    return LMExample(f"The date {written} in ISO format is", f" {year}-{month:02d}-{day:02d}")


def _units(rng: random.Random) -> LMExample:
    source, target, factor = rng.choice(_UNITS)
    value = rng.randint(2, 99)
    return LMExample(f"How many {target} are in {value} {source}?\nAnswer:", f" {value * factor}")


def _sentiment(rng: random.Random) -> LMExample:
    food, good = rng.choice(_FOODS), rng.random() < 0.5
    taste = rng.choice(_GOOD if good else _BAD)
    staff = rng.choice(_STAFF_GOOD if good else _STAFF_BAD)
    if rng.random() < 0.5:
        review = f"The {food} was {taste} and the staff were {staff}."
    else:
        review = f"Our waiter was {staff}, and the {food} tasted {taste}."
    label = "positive" if good else "negative"
    return LMExample(f"Review: {review}\nSentiment:", f" {label}")


@lru_cache(maxsize=1)
def _code_lines() -> tuple[tuple[str, ...], ...]:
    """Source lines of every top-level function of `_CODE_MODULES` (deterministic order)."""
    import importlib

    functions = []
    for module_name in _CODE_MODULES:
        module = importlib.import_module(module_name)
        for _, obj in sorted(vars(module).items()):
            if inspect.isfunction(obj) and obj.__module__ == module_name:
                try:
                    lines = tuple(inspect.getsource(obj).splitlines())
                except (OSError, TypeError):
                    continue
                if 4 <= len(lines) <= 60:
                    functions.append(lines)
    return tuple(functions)


def _code(rng: random.Random) -> LMExample:
    lines = rng.choice(_code_lines())
    candidates = [k for k in range(1, len(lines)) if lines[k].strip()]
    k = rng.choice(candidates)
    context = "\n".join(lines[max(0, k - 6) : k])
    return LMExample(f"{context}\n", lines[k].rstrip())


TASKS: dict[str, LMTask] = {
    t.name: t
    for t in (
        LMTask("arithmetic", "one-step arithmetic word problems", _arithmetic),
        LMTask("uppercase", "rewrite a phrase in capital letters", _uppercase),
        LMTask("dates", "written dates to ISO 8601", _dates),
        LMTask("units", "metric unit conversions", _units),
        LMTask("sentiment", "templated review sentiment (positive/negative)", _sentiment),
        LMTask("reverse", "reverse the order of words", _reverse),
        LMTask("code", "next line of Python standard-library source", _code),
    )
}
DEFAULT_TASKS: tuple[str, ...] = ("arithmetic", "uppercase", "dates", "units", "sentiment")


def get_task(name: str) -> LMTask:
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown LM task {name!r}; known: {', '.join(TASKS)}") from None


def score(prediction: str, reference: str) -> bool:
    """Exact match of the first non-empty generated line (whitespace-trimmed)."""
    lines = [line.strip() for line in prediction.strip().splitlines()]
    first = lines[0] if lines else ""
    return first == reference.strip()
