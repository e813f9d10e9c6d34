"""A synthetic human-vs-machine demo corpus, so the default job runs on a fresh machine with no data.

The texts are generated from templates: "machine" rows use the even, hedged, list-like register
of chat-model prose; "human" rows are informal, uneven, with typos and asides. It is a demo that
shows the pipeline working, not a benchmark: real detection needs real data (see the README).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from detector.atomic import write_text

TOPICS = [
    "the city budget",
    "a new coffee shop",
    "climate policy",
    "the football match",
    "remote work",
    "a hiking trip",
    "electric cars",
    "the school board",
    "a sourdough recipe",
    "space launches",
    "the local library",
    "online privacy",
    "a jazz concert",
    "house prices",
    "the flu season",
]
MACHINE_OPENERS = [
    "It is important to note that",
    "In conclusion,",
    "Overall,",
    "Furthermore,",
    "Additionally,",
    "In today's fast-paced world,",
    "Ultimately,",
    "Moreover,",
]
MACHINE_CLAIMS = [
    "{t} presents both opportunities and challenges for the community.",
    "{t} plays a crucial role in shaping a sustainable and inclusive future.",
    "stakeholders should carefully consider the various factors surrounding {t}.",
    "{t} highlights the need for a balanced and comprehensive approach.",
    "a nuanced understanding of {t} can foster meaningful dialogue.",
    "{t} serves as a testament to the importance of collaboration.",
]
HUMAN_OPENERS = ["honestly", "ok so", "lol", "tbh", "Well,", "So yesterday", "ugh,", "Not gonna lie,"]
HUMAN_CLAIMS = [
    "{t} was kinda a mess but whatever",
    "my neighbour wont stop talking about {t}",
    "i dunno why everyone cares so much about {t}??",
    "{t} cost me way more than i thought",
    "we argued about {t} for like an hour at dinner",
    "{t}... still not sure what to think",
    "saw a thing about {t} on the bus, pretty wild",
    "{t} is overrated if u ask me",
]
HUMAN_TAILS = ["anyway.", "haha", "!!", "idk", "- will update later", ":)", "smh", ""]


def _machine_text(rng: random.Random) -> str:
    topic = rng.choice(TOPICS)
    sentences = [
        f"{rng.choice(MACHINE_OPENERS)} {rng.choice(MACHINE_CLAIMS).format(t=topic)}"
        for _ in range(rng.randint(2, 4))
    ]
    return " ".join(sentence[0].upper() + sentence[1:] for sentence in sentences)


def _human_text(rng: random.Random) -> str:
    topic = rng.choice(TOPICS)
    parts = [
        f"{rng.choice(HUMAN_OPENERS)} {rng.choice(HUMAN_CLAIMS).format(t=topic)}"
        for _ in range(rng.randint(1, 3))
    ]
    text = " ".join(parts) + " " + rng.choice(HUMAN_TAILS)
    if rng.random() < 0.4:  # a typo: two letters swapped
        i = rng.randrange(1, len(text) - 1)
        text = text[: i - 1] + text[i] + text[i - 1] + text[i + 1 :]
    return text.strip()


def demo_rows(n: int, seed: int) -> list[dict[str, object]]:
    """``n`` rows (about a third human) with text, label, source, generator and id."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        machine = rng.random() < 0.65
        text = _machine_text(rng) if machine else _human_text(rng)
        rows.append(
            {
                "id": f"demo-{seed}-{i}",
                "text": text,
                "label": int(machine),
                "source": "demo",
                "generator": "template-llm" if machine else "human",
            }
        )
    return rows


def write_demo_corpus(
    folder: str | Path, seed: int = 0, sizes: dict[str, int] | None = None
) -> dict[str, Path]:
    """Write ``train``/``val``/``test`` JSONL files of the demo corpus into ``folder``; return their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sizes = sizes or {"train": 1200, "val": 300, "test": 300}
    paths = {}
    for offset, (split, size) in enumerate(sorted(sizes.items())):
        path = folder / f"{split}.jsonl"
        rows = demo_rows(size, seed * 1000 + offset)
        # Atomic: under DDP every rank writes the same file while others may already read it.
        write_text(path, "".join(json.dumps(row) + "\n" for row in rows))
        paths[split] = path
    return paths
