"""Generate the offline demo dataset: is the named object's typical colour warm or cool?

Synthetic and template-generated. Each sentence mentions one everyday object whose typical colour
is warm (red, orange, yellow: label ``warm``) or cool (blue, green, purple: label ``cool``); the
colour itself is never written, so the label is grounded knowledge about the object, the kind of
knowledge MaCSC's image prototypes are meant to bring.

Train and validation share the objects but use disjoint sentence templates, so no sentence (nor
phrasing) appears in both. Deterministic: ``python tasks/demo_data/make_demo.py`` rewrites
``train.tsv`` and ``validation.tsv`` (SST-2 layout: ``sentence<TAB>label``) byte for byte.
"""

from __future__ import annotations

import random
from pathlib import Path

SEED = 20240616
TRAIN_SIZE = 800
VALIDATION_SIZE = 200

WARM = [
    "ripe tomato", "strawberry", "cherry", "fire truck", "ladybug", "banana", "lemon",
    "sunflower", "pumpkin", "carrot", "orange", "goldfish", "school bus", "ear of corn",
    "egg yolk", "candle flame", "ruby", "chili pepper", "apricot", "tangerine", "marigold",
    "canary", "cooked lobster", "stop sign", "campfire", "taxi cab", "rubber duck",
    "traffic cone", "red fox", "raspberry", "cardinal", "fire hydrant", "maple leaf in autumn",
    "basketball", "honeycomb", "sweet potato",
]  # fmt: skip
COOL = [
    "blueberry", "sapphire", "lime", "cucumber", "head of broccoli", "spinach leaf",
    "tree frog", "blade of grass", "emerald", "pine tree", "lettuce", "eggplant",
    "bunch of grapes", "lavender sprig", "plum", "violet", "pair of jeans", "blue whale",
    "pea pod", "mint leaf", "avocado", "sprig of parsley", "lilac", "amethyst", "cactus",
    "peacock feather", "kale leaf", "green apple", "jade statue", "celery stalk", "zucchini",
    "cornflower", "blue jay", "glacier lake", "bluebell", "frog",
]  # fmt: skip

TRAIN_TEMPLATES = [
    "She put {a} on the kitchen table.",
    "There was {a} in the photo he took.",
    "The child pointed at {the} and laughed.",
    "He painted a picture of {a} for his mother.",
    "{A} sat on the shelf by the window.",
    "I noticed {a} near the front door this morning.",
    "My sister drew {a} in her notebook.",
    "The teacher held up {a} for the class to see.",
    "We saw {a} at the market yesterday.",
    "Look at {the} over there.",
    "The artist chose {a} as the subject of her painting.",
    "{A} appeared in the corner of the photograph.",
    "He wrapped {the} in paper before giving it away.",
    "The museum displayed {a} behind glass.",
    "Grandpa described {a} he had seen as a boy.",
    "They placed {a} at the centre of the display.",
    "Her favourite sticker shows {a}.",
    "A cartoon of {a} was printed on the mug.",
]
VALIDATION_TEMPLATES = [
    "On the poster there was {a}.",
    "The book's cover showed a single {object}.",
    "Someone left {a} on the bench in the park.",
    "In my dream I was holding {a}.",
    "The photographer zoomed in on {the}.",
]
SIZES = ["", "small ", "big "]


def article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def sentence(template: str, size: str, obj: str) -> str:
    phrase = size + obj
    return template.format(
        a=article(phrase), A=article(phrase).capitalize(), the="the " + phrase, object=obj
    )


def examples(templates: list[str], count: int, rng: random.Random) -> list[tuple[str, str]]:
    """``count`` distinct (sentence, label) pairs, half warm and half cool."""
    by_label = {
        label: sorted(
            {(sentence(t, s, o), label) for t in templates for s in SIZES for o in objects}
        )
        for label, objects in (("warm", WARM), ("cool", COOL))
    }
    chosen = rng.sample(by_label["warm"], count // 2) + rng.sample(by_label["cool"], count // 2)
    rng.shuffle(chosen)
    return chosen


def write(path: Path, rows: list[tuple[str, str]]) -> None:
    lines = ["sentence\tlabel"] + [f"{text}\t{label}" for text, label in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_demo(folder: Path) -> None:
    """Write ``train.tsv`` and ``validation.tsv`` into ``folder``."""
    rng = random.Random(SEED)
    train = examples(TRAIN_TEMPLATES, TRAIN_SIZE, rng)
    validation = examples(VALIDATION_TEMPLATES, VALIDATION_SIZE, rng)
    write(folder / "train.tsv", train)
    write(folder / "validation.tsv", validation)


if __name__ == "__main__":
    write_demo(Path(__file__).parent)
