"""Sessions: swap, stack and off on one resident base, checked against PEFT."""

import gc
import weakref

import pytest
import torch

import adapterkit
from adapterkit import BaseMismatch, ConfigError, PocketBookNotFound
from adapterkit.plugin_api.testing import make_peft_adapter

IDS = torch.tensor([[5, 17, 42, 99, 3, 120, 7, 64]])


@pytest.fixture
def books(library, tiny_base, tmp_path):
    specs = {"law": dict(seed=1, r=4, target_modules=["q_proj", "v_proj"]),
             "code": dict(seed=2, r=8, target_modules="all-linear"),
             "chem": dict(seed=3, r=2, target_modules=["o_proj", "down_proj"], lora_alpha=5)}
    paths = {}
    for name, kw in specs.items():
        path = make_peft_adapter(tiny_base, tmp_path / name, **kw)
        library.import_peft(path, name, base=str(tiny_base))
        paths[name] = path
    return paths


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def peft_logits(tiny_base, paths, weights=None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    names = list(paths)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base),
                                      paths[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(paths[name], adapter_name=name)
    if weights is None:
        model.set_adapter(names[0])
    else:
        model.add_weighted_adapter(names, [weights[n] for n in names], "mix",
                                   combination_type="cat")
        model.set_adapter("mix")
    return logits(model.eval())


def test_swap_matches_peft_and_off_is_the_plain_base(tiny_base, books, home):
    session = adapterkit.open(str(tiny_base), home=home, attach=["law", "code", "chem"])
    plain = logits(adapterkit.load_base(str(tiny_base), home=home).model)
    for name in ("law", "code", "chem", "law"):
        session.swap(name)
        torch.testing.assert_close(logits(session.model), peft_logits(tiny_base, {name: books[name]}),
                                   rtol=1e-5, atol=1e-5)
    session.off()
    assert torch.equal(logits(session.model), plain)
    assert session.active == {}


def test_stack_is_the_exact_weighted_sum(tiny_base, books, home):
    session = adapterkit.open(str(tiny_base), home=home)
    session.stack({"law": 1.0, "code": 0.5})
    assert session.active == {"law@1": 1.0, "code@1": 0.5}
    expected = peft_logits(tiny_base, {"law": books["law"], "code": books["code"]},
                           {"law": 1.0, "code": 0.5})
    torch.testing.assert_close(logits(session.model), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weights,match", [
    ({"law": float("inf")}, "weight for law must be a finite number, got inf"),
    ({"law": 1.0, "code": float("-inf")}, "weight for code must be a finite number, got -inf"),
    ({"law": float("nan")}, "weight for law must be a finite number, got nan"),
    ({"law": 1.0, "law@1": 2.0}, "law@1 is named twice in the stack; name it once, with the "
                                 "sum of its weights \\(3\\)"),
])
def test_stack_refuses_weights_it_cannot_apply(tiny_base, books, home, weights, match):
    """Before: an infinite weight was stacked (inf logits), and ``a`` + ``a@1`` kept only
    the last weight."""
    session = adapterkit.open(str(tiny_base), home=home)
    with pytest.raises(ConfigError, match=match):
        session.stack(weights)
    assert session.active == {}


def test_per_call_adapter_choice_restores_the_active_one(tiny_base, books, home):
    session = adapterkit.open(str(tiny_base), home=home, attach=["law", "code"])
    session.swap("law")
    with_law = logits(session.model)
    with session.using("code"):
        torch.testing.assert_close(logits(session.model),
                                   peft_logits(tiny_base, {"code": books["code"]}),
                                   rtol=1e-5, atol=1e-5)
    assert torch.equal(logits(session.model), with_law)
    text = session.generate("hello", adapter=None, max_new_tokens=3)
    assert isinstance(text, str) and session.active == {"law@1": 1.0}


def test_unknown_and_foreign_pocket_books(tiny_base, other_base, books, home, library, tmp_path):
    session = adapterkit.open(str(tiny_base), home=home)
    with pytest.raises(PocketBookNotFound):
        session.swap("ghost")
    foreign = make_peft_adapter(other_base, tmp_path / "foreign")
    library.import_peft(foreign, "foreign", base=str(other_base))
    # the way on names the commands that have --force (chat, eval and serve have none)
    with pytest.raises(BaseMismatch, match=r"was made on base other.*; load other instead \(only "
                                           r"if you know the weights are compatible, `generate` "
                                           r"and `swap` attach it anyway with --force\)"):
        session.attach("foreign")
    session.attach("law")
    with pytest.raises(PocketBookNotFound, match="attached: law@1"):
        session.detach("code")


def test_a_stack_refused_for_a_member_of_another_base_attaches_nothing(
        tiny_base, other_base, books, home, library, tmp_path):
    """Before: ``law`` stayed attached (and its slots wrapped) by a stack that was refused
    for its second member; a refused stack changes nothing."""
    library.import_peft(make_peft_adapter(other_base, tmp_path / "foreign"), "foreign",
                        base=str(other_base))
    session = adapterkit.open(str(tiny_base), home=home, attach=["chem"])
    session.swap("chem")
    rank, slots = session.rank, set(session.slots)
    with pytest.raises(BaseMismatch, match="foreign@1 was made on base other"):
        session.stack({"code": 1.0, "foreign": 1.0})  # code: a higher rank, more layers
    assert set(session.books) == {"chem@1"} and session.active == {"chem@1": 1.0}
    assert (session.rank, set(session.slots)) == (rank, slots)  # its layers given back
    wrapped = {n for n, m in session.model.named_modules() if type(m).__name__ == "LoraSlot"}
    assert wrapped == slots
    torch.testing.assert_close(logits(session.model),
                               peft_logits(tiny_base, {"chem": books["chem"]}),
                               rtol=1e-5, atol=1e-5)


def test_attaching_a_larger_pocket_book_keeps_the_active_one_answering(tiny_base, books, home):
    """Before: attaching a pocket book of a higher rank (or on more layers) padded every layer
    and bound zeros to it: the plain base answered while ``active`` still named law."""
    session = adapterkit.open(str(tiny_base), home=home)
    session.swap("law")
    session.attach("code")  # rank 8 on every linear layer, law is rank 4 on two
    assert session.active == {"law@1": 1.0}
    torch.testing.assert_close(logits(session.model), peft_logits(tiny_base, {"law": books["law"]}),
                               rtol=1e-5, atol=1e-5)
    session.close()
    session = adapterkit.open(str(tiny_base), home=home)
    session.stack({"law": 1.0, "chem": 0.5})
    session.attach("code")  # and under a stack
    expected = peft_logits(tiny_base, {"law": books["law"], "chem": books["chem"]},
                           {"law": 1.0, "chem": 0.5})
    torch.testing.assert_close(logits(session.model), expected, rtol=1e-5, atol=1e-5)
    session.close()


def test_detach_frees_the_tensors(tiny_base, books, home):
    session = adapterkit.open(str(tiny_base), home=home, attach=["law", "code"])
    session.swap("code")
    ref = weakref.ref(session.books["code@1"].factors["model.layers.0.mlp.up_proj"].a)
    session.detach("code")
    gc.collect()
    assert ref() is None and session.active == {}
    assert list(session.books) == ["law@1"]


def test_swap_cost_does_not_depend_on_attached_count(tiny_base, books, home, library, tmp_path,
                                                    monkeypatch):
    from adapterkit.lora.slots import LoraSlot

    extras = []
    for i, targets in enumerate([["q_proj"], ["k_proj", "up_proj"], "all-linear", ["gate_proj"],
                                 ["o_proj", "v_proj"]]):
        name = f"extra{i}"
        path = make_peft_adapter(tiny_base, tmp_path / name, seed=10 + i, r=2 + 2 * i,
                                 target_modules=targets)
        library.import_peft(path, name, base=str(tiny_base))
        extras.append(name)
    rebound = []  # every tensor rebinding in a slot, whoever asks for it
    real_bind = LoraSlot.bind

    def counting_bind(self, a, b, scale):
        rebound.append(self)
        return real_bind(self, a, b, scale)

    monkeypatch.setattr(LoraSlot, "bind", counting_bind)
    one = adapterkit.open(str(tiny_base), home=home, attach=["code"])
    many = adapterkit.open(str(tiny_base), home=home, attach=["code", "law", "chem", *extras])
    assert len(many.books) == 8
    # "code" targets every linear layer, so both sessions have the same slots: a fair comparison
    assert set(one.slots) == set(many.slots) and len(one.slots) == 14
    counts = {}
    for label, session in (("one", one), ("many", many)):
        session.swap("law")
        rebound.clear()
        session.swap("code")
        counts[label] = len(rebound)
        assert set(map(id, rebound)) == {id(s) for s in session.slots.values()}
    assert counts["one"] == counts["many"] == 14, counts  # one rebinding per slot, no more
    # and the swapped-in pocket book is really the one PEFT computes, with seven others attached
    torch.testing.assert_close(logits(many.model), peft_logits(tiny_base, {"code": books["code"]}),
                               rtol=1e-5, atol=1e-5)
    rebound.clear()
    many.swap("extra4")
    assert len(rebound) == 14
    torch.testing.assert_close(logits(many.model),
                               peft_logits(tiny_base, {"extra4": tmp_path / "extra4"}),
                               rtol=1e-5, atol=1e-5)


def test_swaps_do_not_recompile(tiny_base, books, home):
    import torch._dynamo

    session = adapterkit.open(str(tiny_base), home=home, attach=["law", "code", "chem"])
    torch._dynamo.reset()
    compiled = torch.compile(session.model, backend="eager", dynamic=False)
    session.swap("law")
    with torch.no_grad():
        compiled(input_ids=IDS)
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        for name in ("code", "chem", "law"):
            session.swap(name)
            out = compiled(input_ids=IDS).logits
            torch.testing.assert_close(out, logits(session.model), rtol=1e-5, atol=1e-5)
        session.stack({"law": 1.0, "chem": 1.0})  # rank 4+2 ≤ 8: same padded shapes
        compiled(input_ids=IDS)
        session.off()
        compiled(input_ids=IDS)


@pytest.mark.parametrize("name,attached", [("law", ["law"]), ("code", ["code"]),
                                            ("law", ["law", "code", "chem"])],
                         ids=["law-alone", "code-alone", "law-padded-to-rank-8"])
def test_one_pocket_book_equals_peft_bit_for_bit(tiny_base, books, home, name, attached):
    """The README's claim, held to ``torch.equal`` (the other tests allow 1e-5): one pocket
    book swapped in, in float32 on the CPU, gives plain PEFT's logits exactly — on its own,
    and padded with zeros to the rank of a larger one attached beside it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    session = adapterkit.open(str(tiny_base), home=home, attach=attached)
    try:
        session.swap(name)
        assert session.base.model.dtype == torch.float32 and session.model.device.type == "cpu"
        fresh = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
        expected = logits(PeftModel.from_pretrained(fresh, str(books[name])).eval())
        assert torch.equal(logits(session.model), expected)
    finally:
        session.close()


def test_a_stack_refused_late_or_interrupted_gives_everything_back(tiny_base, other_base, books,
                                                                   home, library, tmp_path,
                                                                   monkeypatch):
    """Found in review: a weight the factors cannot carry was refused after its members were
    attached and their layers wrapped; layers wrapped at the same rank kept stale entries; and
    a Ctrl-C between padding and rebinding left the plain base answering for ``law``."""
    library.import_peft(make_peft_adapter(other_base, tmp_path / "foreign"), "foreign",
                        base=str(other_base))
    session = adapterkit.open(str(tiny_base), home=home)
    session.swap("law")  # rank 4 on q_proj, v_proj
    law = peft_logits(tiny_base, {"law": books["law"]})
    state = (set(session.books), session.rank, set(session.slots))

    def unchanged():
        assert (set(session.books), session.rank, set(session.slots)) == state
        assert session.active == {"law@1": 1.0}
        torch.testing.assert_close(logits(session.model), law, rtol=1e-5, atol=1e-5)

    with pytest.raises(ConfigError, match="code"):
        session.stack({"law": 1.0, "code": 1e300})  # refused once combined
    unchanged()
    with pytest.raises(BaseMismatch):  # chem: rank 2 on new layers, same session rank
        session.stack({"chem": 1.0, "foreign": 1.0})
    unchanged()
    real, calls = session._bind_active, []

    def interrupted():
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        real()

    monkeypatch.setattr(session, "_bind_active", interrupted)
    with pytest.raises(KeyboardInterrupt):
        session.stack({"code": 1.0})  # raises the rank: pads (zeros bound), then rebinds
    unchanged()
    session.close()


def test_a_swap_interrupted_between_two_layers_leaves_one_pocket_book_answering(
        tiny_base, books, home, monkeypatch):
    """Ctrl-C (a notebook's interrupt) while a swap bound its layers left some layers on the
    new pocket book and some on the old, with ``active`` naming the old: answers from
    neither. The binding is finished before the interruption goes on; a binding that fails
    outright leaves the plain base, and ``active`` says so."""
    from adapterkit.lora.slots import LoraSlot

    session = adapterkit.open(str(tiny_base), home=home, attach=["law", "code"])
    plain = logits(adapterkit.load_base(str(tiny_base), home=home).model)
    session.swap("law")
    real = LoraSlot.bind

    def failing(*faults):
        """bind, raising ``faults[i]`` at call 3 + i."""
        calls = []

        def bind(self, a, b, scale):
            calls.append(1)
            if 3 <= len(calls) < 3 + len(faults):
                raise faults[len(calls) - 3]
            real(self, a, b, scale)
        return bind

    monkeypatch.setattr(LoraSlot, "bind", failing(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        session.swap("code")
    monkeypatch.setattr(LoraSlot, "bind", real)
    assert session.active == {"code@1": 1.0}
    torch.testing.assert_close(logits(session.model),
                               peft_logits(tiny_base, {"code": books["code"]}),
                               rtol=1e-5, atol=1e-5)

    monkeypatch.setattr(LoraSlot, "bind", failing(KeyboardInterrupt(), RuntimeError("no")))
    with pytest.raises(RuntimeError, match="no"):
        session.swap("law")
    monkeypatch.setattr(LoraSlot, "bind", real)
    assert session.active == {}
    assert torch.equal(logits(session.model), plain)
    session.close()
