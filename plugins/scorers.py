"""Built-in scorers for generated answers: ``exact_match``, ``normalized_match`` and
``urgency_advice`` (the quickstart's triage answers: is the advice the one the urgency needs)."""

from __future__ import annotations

import re

from adapterkit import DataFormatError, Scorer, hookimpl


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


class UrgencyAdvice(Scorer):
    """The advice of a triage answer against the complaint's urgency.

    The quickstart's data (examples/make_triage_data.py) advises by urgency: an emergency now,
    an appointment in a day or two, or a routine appointment. An answer scores 1 when it gives
    the advice of the reference's urgency and no other; the reference is the urgency itself
    (``high``, ``medium``, ``low``) or a triage answer that states it (``... | Urgency: high``).
    """

    name = "urgency_advice"
    description = ("1 if a triage answer gives the advice its urgency needs (emergency / a day "
                   "or two / routine) and no other")
    #: A phrase only that urgency's advice has.
    ADVICE = {"high": "emergency", "medium": "next day or two", "low": "routine appointment"}

    def score(self, prediction: str, reference: str) -> float:
        found = re.search(r"urgency:\s*(high|medium|low)", reference, re.IGNORECASE)
        urgency = (found.group(1) if found else reference).strip().lower()
        if urgency not in self.ADVICE:
            raise DataFormatError(f"urgency_advice: the reference names no urgency (high, medium or "
                             f"low): {reference!r}")
        said = {u for u, phrase in self.ADVICE.items() if phrase in prediction.lower()}
        return float(said == {urgency})


@hookimpl
def register_scorers(register):
    register(ExactMatch())
    register(NormalizedMatch())
    register(UrgencyAdvice())
