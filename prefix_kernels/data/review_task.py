"""The packaged classification task: 400 one-sentence reviews labelled "positive" or "negative",
where the label often hangs on a negation or a contrast ("The pasta was far from delightful.", "I
expected the staff to be rude, but they were lovely."), so that the sentiment words alone do not
decide it: a linear probe on frozen sentence embeddings stays well short of 100% (see
``prefix-kernels train --task classification``).

Written out as ``review_task.jsonl`` (``{"text", "label", "split"}``; 320 train, 80 eval) by
:func:`write`; :func:`generate` rebuilds it from a fixed seed (tests check that the two agree)::

    python -m prefix_kernels.data.review_task        # rewrites review_task.jsonl
"""

from __future__ import annotations

import json
import random
from importlib import resources
from pathlib import Path

LABELS = ("negative", "positive")
SIZE, EVAL = 400, 80

# (subject, verb "was"/"were", pronoun)
SUBJECTS = [("the pasta", "was", "it"), ("the service", "was", "it"), ("the hotel room", "was", "it"),
            ("this phone", "was", "it"), ("the movie", "was", "it"), ("the concert", "was", "it"),
            ("the battery life", "was", "it"), ("the staff", "were", "they"), ("the seats", "were", "they"),
            ("the tour", "was", "it"), ("the coffee", "was", "it"), ("the novel", "was", "it"),
            ("the headphones", "were", "they"), ("the museum", "was", "it"), ("the delivery", "was", "it"),
            ("the lecture", "was", "it"), ("the app", "was", "it"), ("the desserts", "were", "they")]
POSITIVE = ["great", "wonderful", "excellent", "delightful", "superb", "lovely", "impressive", "pleasant",
            "charming", "brilliant"]
NEGATIVE = ["awful", "terrible", "disappointing", "dreadful", "mediocre", "rude", "boring", "unpleasant",
            "clumsy", "horrible"]

# (template, polarity): +1 the label is the adjective's sentiment, -1 its opposite; {b} is the
# adjective of the other sentiment (contrasts)
TEMPLATES = [
    ("{S} {v} {a}.", +1),
    ("Honestly, {s} {v} {a}.", +1),
    ("{S} {v} not {a} at all.", -1),
    ("{S} {v} far from {a}.", -1),
    ("I would never call {s} {a}.", -1),
    ("Nobody could say that {s} {v} {a}.", -1),
    ("I expected {s} to be {b}, but {p} {v} {a}.", +1),
    ("{S} {v} supposed to be {a}, but {p} {v} not.", -1),
    ("Everyone told me {s} would be {a}; {p} {v} anything but.", -1),
    ("{S} could not have been more {a}.", +1),
    ("I can't deny that {s} {v} {a}.", +1),
    ("{S} {v} {b} at first, yet in the end {p} {v} {a}.", +1),
]


def generate(seed: int = 15) -> list[dict]:
    """The task's examples: balanced labels, every template used alike, in a fixed shuffled order;
    the last :data:`EVAL` examples are marked "eval"."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < SIZE:
        template, polarity = TEMPLATES[len(rows) % len(TEMPLATES)]
        subject, verb, pronoun = rng.choice(SUBJECTS)
        good = rng.random() < 0.5
        a, b = (rng.choice(POSITIVE), rng.choice(NEGATIVE)) if good else (rng.choice(NEGATIVE), rng.choice(POSITIVE))
        text = template.format(S=subject[0].upper() + subject[1:], s=subject, v=verb, p=pronoun, a=a, b=b)
        text = text[0].upper() + text[1:]
        if text in seen:
            continue
        seen.add(text)
        rows.append({"text": text, "label": LABELS[int(good) if polarity > 0 else 1 - int(good)]})
    rng.shuffle(rows)
    return [{**row, "split": "train" if i < SIZE - EVAL else "eval"} for i, row in enumerate(rows)]


def path() -> Path:
    """The packaged JSONL file."""
    return Path(str(resources.files(__package__) / "review_task.jsonl"))


def write(target: Path | None = None) -> Path:
    target = Path(target) if target is not None else path()
    target.write_text("".join(json.dumps(row) + "\n" for row in generate()), encoding="utf-8")
    return target


if __name__ == "__main__":
    print(f"wrote {write()}")
