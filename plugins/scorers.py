"""Built-in scorers for generated answers: ``exact_match`` and ``normalized_match``."""

from __future__ import annotations

import re

from adapterkit import Scorer, hookimpl


class ExactMatch(Scorer):
    name = "exact_match"
    description = "1 if the answer equals the reference (surrounding whitespace ignored)"

    def score(self, prediction: str, reference: str) -> float:
        return float(prediction.strip() == reference.strip())


class NormalizedMatch(Scorer):
    name = "normalized_match"
    description = "1 if equal after lower-casing and collapsing whitespace and punctuation"

    def score(self, prediction: str, reference: str) -> float:
        def norm(text: str) -> str:
            return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())

        return float(norm(prediction) == norm(reference))


@hookimpl
def register_scorers(register):
    register(ExactMatch())
    register(NormalizedMatch())
