"""Three tasks of different shapes for the defaults sweep (sweep_defaults.py), none of them the
quickstart's: generated from a fixed seed, with held-out rows whose combinations never occur in
training, so a score measures what was learnt rather than what was read.

- ``routing``: a classification-like chat task. A customer message about a product and a
  problem → the team that handles it (``Team: billing``). Scored by exact match.
- ``listing``: a free-text style task, prompt → completion without a chat template. An item,
  its price and a tone → a one-line product listing in that tone's register. Scored by exact
  match of the whole line (the register's wording, the item and the price).
- ``gazetteer``: continued pretraining on plain text (a ``.txt`` of paragraphs). Entries of a
  made-up gazetteer in one house style; scored by the held-out entries' loss change with the
  pocket book on (negative is better: the style and vocabulary were learnt).

Besides, ``triage`` names the quickstart's own data (not written: shipped in the package).

    python benchmarks/sweep_tasks.py OUT_FOLDER   # writes each task's train and test files
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

PRODUCTS = ["laptop", "phone", "printer", "router", "tablet", "smartwatch", "headphones",
            "camera", "monitor", "keyboard", "speaker", "e-reader"]
PROBLEMS = {
    "billing": ["I was charged twice for my {p}", "the invoice for my {p} shows the wrong amount",
                "I want a refund for the {p} I sent back",
                "my card was billed for a {p} I never ordered"],
    "repairs": ["my {p} will not turn on", "the screen of my {p} is cracked",
                "my {p} makes a buzzing noise", "the battery of my {p} is empty within an hour"],
    "accounts": ["I cannot log in to register my {p}", "I forgot the password of my {p} app",
                 "someone changed the email of the account for my {p}",
                 "I want to delete the account I made for my {p}"],
    "shipping": ["my {p} has not arrived after two weeks",
                 "the {p} was delivered to the wrong address", "the box of my {p} arrived crushed",
                 "I need to change the delivery date of my {p}"],
}
OPENERS = ["Hello,", "Hi there.", "Good morning,", "Dear support,", ""]
CLOSERS = ["Please help.", "What should I do?", "Thanks.", "Can you sort this out?", ""]

ITEMS = ["mug", "lamp", "backpack", "notebook", "umbrella", "scarf", "teapot", "wallet",
         "blanket", "water bottle", "desk chair", "bike bell", "candle", "pillow", "clock"]
COLOURS = ["red", "blue", "green", "black", "white", "yellow", "grey", "orange"]
TONES = {
    "playful": "Say hello to the {c} {i}: yours for just {n} dollars!",
    "formal": "The {c} {i} is available for {n} dollars.",
    "urgent": "Last chance: the {c} {i} for only {n} dollars. Order now.",
}

TOWNS = ["Varlen", "Osmir", "Kettlebrook", "Dunmere", "Halloway", "Brisk", "Tarnholm", "Elvic",
         "Morrow", "Quillby", "Ashford", "Penlow", "Rudd", "Sallow", "Thornby", "Ulverd",
         "Wexham", "Yarrow", "Zenna", "Corrin", "Fenwick", "Glenna", "Hobb", "Isley", "Jarrow",
         "Kilby", "Lorne", "Marrick", "Nettle", "Orrin", "Pike", "Ravel", "Stirk", "Tully",
         "Umber", "Vance", "Wyke", "Alder", "Bramble", "Cask"]
RIVERS = ["Osk", "Tarn", "Wend", "Lyle", "Brae", "Corr", "Sill", "Mere"]
TRADES = ["copper", "wool", "salt", "glass", "timber", "cheese", "rope", "ink", "tin", "barley"]
FESTIVALS = ["a lantern festival", "a horse fair", "a boat race", "a cheese market",
             "a kite day", "a bell night"]
SEASONS = ["spring", "summer", "autumn", "winter"]


def _first_upper(text: str) -> str:
    return text[:1].upper() + text[1:]


def routing(rng: random.Random) -> tuple[list[dict], list[dict]]:
    """Held out: 40 of the 192 (product, problem) pairs; every product and problem is seen."""
    combos = [(p, team, text) for p in PRODUCTS for team, texts in PROBLEMS.items()
              for text in texts]
    rng.shuffle(combos)
    test, train = combos[:40], combos[40:]

    def row(p: str, team: str, text: str) -> dict:
        message = " ".join(x for x in (rng.choice(OPENERS), _first_upper(text.format(p=p)) + ".",
                                       rng.choice(CLOSERS)) if x)
        return {"prompt": f"Customer message: {message}\nWhich team handles this?",
                "completion": f"Team: {team}"}

    return [row(*c) for c in train], [row(*c) for c in test]


def listing(rng: random.Random) -> tuple[list[dict], list[dict]]:
    """Held out: 40 (colour, item) pairs never listed in training, in any tone; each of the
    other 80 pairs is listed twice (a tone and a price drawn each time)."""
    pairs = [(c, i) for c in COLOURS for i in ITEMS]
    rng.shuffle(pairs)
    test_pairs, train_pairs = pairs[:40], pairs[40:]

    def row(c: str, i: str) -> dict:
        tone, n = rng.choice(sorted(TONES)), rng.randint(5, 95)
        return {"prompt": f"Item: {c} {i}\nPrice: {n} dollars\nTone: {tone}\nListing:",
                "completion": " " + TONES[tone].format(c=c, i=i, n=n)}

    return [row(*p) for p in train_pairs for _ in range(2)], [row(*p) for p in test_pairs]


def gazetteer(rng: random.Random) -> tuple[list[str], list[str]]:
    """Held out: entries for 10 towns never described in training."""
    towns = list(TOWNS)
    rng.shuffle(towns)

    def entry(town: str) -> str:
        river, trade = rng.choice(RIVERS), rng.choice(TRADES)
        people = rng.randint(2, 60) * 500
        return (f"{town} is a market town on the river {river}, home to {people:,} people. "
                f"Its chief trade is {trade}, carried downriver on flat barges. Every "
                f"{rng.choice(SEASONS)} the town holds {rng.choice(FESTIVALS)}, and the "
                f"{trade} guild chooses a warden for the year.")

    train = [entry(t) for t in towns[10:] for _ in range(4)]  # 120 paragraphs, 30 towns
    rng.shuffle(train)
    return train, [entry(t) for t in towns[:10] for _ in range(2)]


def write(out: Path) -> dict[str, dict[str, Any]]:
    """Write every task's files under ``out``; return, per task, its files and how it is
    trained (chat template or not) and scored."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(7)
    tasks: dict[str, dict[str, Any]] = {}
    for name, make, chat in (("routing", routing, True), ("listing", listing, False)):
        train, test = make(rng)
        for split, rows in (("train", train), ("test", test)):
            (out / f"{name}_{split}.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in rows))
        tasks[name] = {"train": str(out / f"{name}_train.jsonl"),
                       "test": str(out / f"{name}_test.jsonl"), "chat": chat,
                       "score": "exact match", "rows": len(train)}
    # the quickstart's own triage chats (shipped in the package), as a fourth check of the
    # chosen defaults: not one of the sweep's unseen tasks
    from adapterkit.quickstart import data_dir

    tasks["triage"] = {"train": str(data_dir() / "triage_train.jsonl"),
                       "test": str(data_dir() / "triage_test.jsonl"), "chat": True,
                       "score": "exact match", "rows": 240}
    train_text, test_text = gazetteer(rng)
    (out / "gazetteer_train.txt").write_text("\n\n".join(train_text) + "\n")
    (out / "gazetteer_test.json").write_text(json.dumps(test_text))
    tasks["gazetteer"] = {"train": str(out / "gazetteer_train.txt"),
                          "test": str(out / "gazetteer_test.json"), "chat": False,
                          "score": "held-out loss change", "rows": len(train_text)}
    return tasks


if __name__ == "__main__":
    print(json.dumps(write(Path(sys.argv[1])), indent=2))
