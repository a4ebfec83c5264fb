"""Generate the bundled "triage" data set, deterministically.

A patient's complaint goes in; a fixed-format answer comes out::

    Specialist: Cardiology | Urgency: high

The specialist follows from the symptoms (each belongs to one specialty), the urgency from how
the complaint describes its onset and course. Held-out complaints combine symptoms that never
appear together in training, with an onset never seen with those symptoms, so a model passes
only by learning the two rules, not by remembering complaints.

    python examples/make_triage_data.py [--out examples/data] [--train 400] [--test 60]

Also writes ``preferences_*.jsonl`` for the alignment stage: the same complaints, with a
courteous, safe answer chosen over a curt or unsafe one.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path

SPECIALTIES: dict[str, list[str]] = {
    "Cardiology": ["chest pain", "a racing heartbeat", "swollen ankles", "pain spreading to my left arm"],
    "Neurology": ["numbness in one hand", "slurred speech", "a pounding headache", "trouble keeping my balance"],
    "Dermatology": ["an itchy rash", "a mole that changed colour", "peeling skin on my hands", "painful blisters"],
    "Gastroenterology": ["stomach cramps", "heartburn after meals", "black stools", "nausea and bloating"],
    "Pulmonology": ["shortness of breath", "a cough that will not stop", "wheezing at night", "coughing up blood"],
    "Orthopedics": ["knee pain", "a swollen wrist after a fall", "lower back pain", "a stiff shoulder"],
    "Ophthalmology": ["blurred vision", "a red and painful eye", "flashes of light in my eye", "double vision"],
    "ENT": ["ear pain", "a sore throat", "frequent nosebleeds", "ringing in my ears"],
}

URGENCY: dict[str, list[str]] = {
    "high": ["It started suddenly an hour ago and is getting worse fast.",
             "It came on all at once this morning and it is severe.",
             "Since twenty minutes ago it has been unbearable and I feel faint."],
    "medium": ["It began two days ago and has not improved.",
               "I have had it since last week and it is slowly getting worse.",
               "For the past three days it keeps coming back."],
    "low": ["It has been mild, on and off, for a few months.",
            "I noticed it a while ago; it is not bothering me much.",
            "It is a small thing that has been there for a year or so."],
}

OPENINGS = ["I have", "I've got", "Lately I have", "My problem is", "I am worried about",
            "Doctor, I have"]
PEOPLE = ["", "I am 34. ", "I am 71 and live alone. ", "I'm a 19-year-old student. ",
          "I am 52 and work in an office. ", "I'm 45. "]


def answer(specialty: str, urgency: str) -> str:
    return f"Specialist: {specialty} | Urgency: {urgency}"


def complaint(rng: random.Random, symptoms: tuple[str, ...], urgency_text: str) -> str:
    listed = symptoms[0] if len(symptoms) == 1 else f"{symptoms[0]} and {symptoms[1]}"
    return f"{rng.choice(PEOPLE)}{rng.choice(OPENINGS)} {listed}. {urgency_text}"


def split_combinations(rng: random.Random) -> tuple[list, list]:
    """(specialty, symptoms, urgency) combinations for training and for the held-out test."""
    train, test = [], []
    for specialty, symptoms in SPECIALTIES.items():
        pairs = list(itertools.combinations(symptoms, 2))
        rng.shuffle(pairs)
        held_pairs = pairs[:2]  # these two symptom pairs never appear together in training
        for urgency in URGENCY:
            for s in symptoms:
                train.append((specialty, (s,), urgency))
            for pair in pairs[2:]:
                train.append((specialty, pair, urgency))
            for pair in held_pairs:
                test.append((specialty, pair, urgency))
    return train, test


ADVICE = {
    "high": "Please call emergency services or go to the nearest emergency department now.",
    "medium": "Please book an appointment in the next day or two, and seek care sooner if it worsens.",
    "low": "A routine appointment is fine; note when it happens so you can tell the doctor.",
}
KIND = "I'm sorry you are dealing with this."


def preference(rng: random.Random, specialty: str, urgency: str) -> tuple[str, str]:
    """A courteous answer with the advice its urgency needs, and either a curt or unsafe one or
    (half the time) an equally courteous one with another urgency's advice: the pairs teach
    the advice, not only the tone."""
    base = answer(specialty, urgency)
    chosen = f"{base}\n{KIND} {ADVICE[urgency]}"
    rejected = rng.choice([
        f"{base}\nNot my problem, figure it out.",
        f"{base}\nJust take ten painkillers at once and wait it out.",
        f"{base}\nIt's nothing. Ignore it and don't bother a doctor.",
        f"{base}\nDouble your usual dose of whatever pills you have at home.",
    ])
    if rng.random() < 0.5:
        wrong = rng.choice([u for u in ADVICE if u != urgency])
        rejected = f"{base}\n{KIND} {ADVICE[wrong]}"
    return chosen, rejected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "data")
    parser.add_argument("--train", type=int, default=240)
    parser.add_argument("--test", type=int, default=48)
    parser.add_argument("--seed", type=int, default=13)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    train_combos, test_combos = split_combinations(rng)
    args.out.mkdir(parents=True, exist_ok=True)

    def rows(combos: list, n: int) -> list[dict]:
        out = []
        order = [combos[i % len(combos)] for i in range(n)]
        rng.shuffle(order)
        for specialty, symptoms, urgency in order:
            text = complaint(rng, symptoms, rng.choice(URGENCY[urgency]))
            out.append({"prompt": text, "completion": answer(specialty, urgency),
                        "specialty": specialty, "urgency": urgency})
        return out

    train = rows(train_combos, args.train)
    test = rows(test_combos, len(test_combos))[: args.test]
    train_prompts = {r["prompt"] for r in train}
    assert not any(r["prompt"] in train_prompts for r in test)
    for name, data in (("triage_train", train), ("triage_test", test)):
        with open(args.out / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            for row in data:
                fh.write(json.dumps(row) + "\n")
    for name, data in (("preferences_train", train[:200]), ("preferences_test", test)):
        with open(args.out / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            for row in data:
                chosen, rejected = preference(rng, row["specialty"], row["urgency"])
                fh.write(json.dumps({"prompt": row["prompt"], "chosen": chosen,
                                     "rejected": rejected}) + "\n")
    print(f"wrote {len(train)} training and {len(test)} held-out complaints to {args.out}")


if __name__ == "__main__":
    main()
