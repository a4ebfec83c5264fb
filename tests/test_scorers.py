"""The built-in scorers, on answers written by hand."""

from __future__ import annotations

import pytest

from adapterkit import DataFormatError
from adapterkit.plugin_api.manager import get_plugin_manager


@pytest.fixture(scope="module")
def scorers():
    return get_plugin_manager(env=False).scorers


HIGH = ("Specialist: Cardiology | Urgency: high\nI'm sorry you are dealing with this. Please call "
        "emergency services or go to the nearest emergency department now.")
MEDIUM = ("Specialist: ENT | Urgency: medium\nI'm sorry you are dealing with this. Please book an "
          "appointment in the next day or two, and seek care sooner if it worsens.")
LOW = ("Specialist: ENT | Urgency: low\nI'm sorry you are dealing with this. A routine "
       "appointment is fine; note when it happens so you can tell the doctor.")


@pytest.mark.parametrize("answer,reference,score", [
    (HIGH, "high", 1.0), (MEDIUM, "medium", 1.0), (LOW, "low", 1.0),
    (HIGH, "medium", 0.0),                      # an emergency for a medium complaint: wrong
    (MEDIUM, "Specialist: ENT | Urgency: medium", 1.0),  # the urgency read off a triage answer
    (LOW, "Specialist: ENT | Urgency: HIGH", 0.0),
    (MEDIUM + " If it is an emergency, call now.", "medium", 0.0),  # two pieces of advice
    ("Specialist: ENT | Urgency: medium", "medium", 0.0),           # no advice at all
    ("Not my problem, figure it out.", "low", 0.0),
])
def test_urgency_advice(scorers, answer, reference, score):
    assert scorers.get("urgency_advice").score(answer, reference) == score


def test_urgency_advice_refuses_a_reference_without_an_urgency(scorers):
    with pytest.raises(DataFormatError, match="names no urgency"):
        scorers.get("urgency_advice").score(HIGH, "Cardiology")


def test_exact_and_normalized_match(scorers):
    assert scorers.get("exact_match").score(" red ", "red") == 1.0
    assert scorers.get("exact_match").score("Red", "red") == 0.0
    assert scorers.get("normalized_match").score("Red!", " red") == 1.0


@pytest.mark.parametrize("returned", [None, "0.5", float("nan"), 7.0, -0.1])
def test_a_score_outside_the_contract_is_refused_naming_the_scorer(tiny_base, returned):
    """A scorer returning None or a string gave a traceback from adapterkit's own sum; NaN or
    7.0 printed "nan%" or "700.0%". A score is a number in [0, 1]: anything else is the
    scorer's fault, said in one line."""
    from adapterkit import PluginError, Scorer, load_base
    from adapterkit.training.metrics import accuracy

    class Odd(Scorer):
        name = "odd"

        def score(self, prediction, reference):
            return returned

    base = load_base(str(tiny_base))
    rows = [{"prompt": "hi", "completion": "there"}]
    with pytest.raises(PluginError, match=r"^scorer 'odd' returned .* for row 1, not a number "
                                          r"in \[0, 1\]; nothing was reported"):
        accuracy(base.model, base.tokenizer, rows, chat=False, scorer=Odd().score,
                 max_new_tokens=2)
    import numpy as np

    for fine in (True, np.float32(1.0), np.bool_(True), np.int64(1)):  # 1, as numbers
        good = accuracy(base.model, base.tokenizer, rows, chat=False,
                        scorer=lambda a, r, fine=fine: fine, max_new_tokens=2)
        assert good[0] == 1.0
