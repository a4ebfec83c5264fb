"""LoRA slots: a layer with no active pocket book costs nothing, and answers like the base."""

from __future__ import annotations

import pytest
import torch

from adapterkit.plugin_api.testing import make_peft_adapter

IDS = torch.tensor([[1, 5, 9, 17, 33, 65]])


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture
def session(tmp_path, tiny_base, library):
    from adapterkit import open_session

    folder = make_peft_adapter(tiny_base, tmp_path / "a", target_modules=["q_proj", "v_proj"])
    library.import_peft(folder, "a", base=str(tiny_base))
    session = open_session(str(tiny_base), home=library.home)
    plain = _logits(session.model)
    session.attach("a")
    return session, plain


def _poison_zeros(session):
    """Make the shared 'no pocket book' factors NaN: any matmul that still uses them shows."""
    for slot in session.slots.values():
        for tensor in slot.zeros[:2]:
            tensor.fill_(float("nan"))


def test_off_skips_the_lora_matmuls_and_answers_like_the_base(session):
    session, plain = session
    session.swap("a")
    session.off()
    _poison_zeros(session)
    got = _logits(session.model)
    assert torch.isfinite(got).all(), "off() still multiplied by the zero factors"
    assert torch.equal(got, plain)


def test_layers_a_pocket_book_does_not_touch_are_skipped(session, tmp_path, tiny_base):
    session, _ = session
    folder = make_peft_adapter(tiny_base, tmp_path / "q", target_modules=["q_proj"])
    session.library.import_peft(folder, "q", base=str(tiny_base))
    session.swap("q")  # v_proj slots exist (for "a") but "q" does not touch them
    reference = _logits(session.model)
    _poison_zeros(session)
    got = _logits(session.model)
    assert torch.isfinite(got).all()
    assert torch.equal(got, reference)
