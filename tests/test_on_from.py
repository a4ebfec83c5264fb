"""Training on top of a pocket book (``--on``) and continuing a copy of one (``--from``)."""

import types

import pytest
import torch

import adapterkit
from adapterkit import (
    BaseMismatch,
    ConfigError,
    InvalidAdapter,
    Library,
    PocketBookNotFound,
    TrainOptions,
    train,
)
from adapterkit.plugin_api.manager import get_plugin_manager

IDS = torch.tensor([[3, 50, 60, 70, 80, 90]])
FAST = dict(max_steps=6, batch_size=4, learning_rate=3e-2, r=4, alpha=8, dropout=0.0,
            logging_steps=2)


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def stacked(tmp_path_factory, tiny_base):
    """A library with ``triage`` (sft) and ``manner`` (dpo, trained --on triage)."""
    import json

    from adapterkit.pytest_plugin import TINY_ROWS

    home = tmp_path_factory.mktemp("on-home")
    data = tmp_path_factory.mktemp("on-data")
    files = {}
    for shape, rows in TINY_ROWS.items():
        files[shape] = data / f"{shape}.jsonl"
        files[shape].write_text("".join(json.dumps(r) + "\n" for r in rows))
    pm = get_plugin_manager(env=False)
    triage = train("sft", base=str(tiny_base), data=str(files["prompt_completion"]),
                   name="triage", home=home, plugins=pm, options=TrainOptions(**FAST))
    manner = train("dpo", base=str(tiny_base), data=str(files["preference"]), name="manner",
                   home=home, plugins=pm, on="triage", options=TrainOptions(**FAST))
    return home, files, pm, triage, manner


@pytest.mark.slow
def test_on_records_parent_and_reference_is_the_parent(stacked, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    home, _, _, triage, manner = stacked
    meta = manner.pocket_book.meta
    assert meta.stacked_on == ["triage@1"] and meta.parents == ["triage@1"]
    # the new pocket book's file holds only its own LoRA, not the parent's
    from safetensors.torch import load_file

    own = load_file(str(manner.pocket_book.path / "adapter_model.safetensors"))
    parent = load_file(str(triage.pocket_book.path / "adapter_model.safetensors"))
    # both target every linear layer (14 in the tiny base): the same names, other values
    own_b = sorted(k for k in own if "lora_B" in k)
    assert len(own_b) == 14 and own.keys() == parent.keys()
    assert [k for k in own_b if torch.equal(own[k], parent[k])] == []
    assert [k for k in own_b if not own[k].abs().sum() > 0] == []  # trained, not left at 0

    # with the new pocket book switched off, the model is base + triage: the DPO reference
    only_triage = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base),
                                            triage.pocket_book.path).eval()
    with manner.model.disable_adapter():
        off = _logits(manner.model)
    assert torch.allclose(off, _logits(only_triage), atol=1e-5)
    assert not torch.allclose(_logits(manner.model), off, atol=1e-3)  # it learned something


@pytest.mark.slow
def test_loading_brings_the_stack_back(stacked, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from adapterkit import load_base, open_session
    from adapterkit.runtime.peft_model import peft_model as attach

    home, _, _, triage, manner = stacked
    expected = _logits(manner.model)
    library = Library(home)

    # adapterkit's PEFT path (eval, generate)
    attached = attach(load_base(str(tiny_base), home=home), library.get("manner"), library=library)
    assert torch.allclose(_logits(attached), expected, atol=1e-5)

    # plain PEFT, as the model card tells users: both adapters, both active
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base),
                                      triage.pocket_book.path, adapter_name="triage")
    plain.load_adapter(str(manner.pocket_book.path), adapter_name="manner")
    plain.base_model.set_adapter(["triage", "manner"], inference_mode=True)
    assert torch.allclose(_logits(plain.eval()), expected, atol=1e-5)

    # a fast session: swapping to it activates the stack
    session = open_session(str(tiny_base), home=home)
    session.swap("manner")
    assert session.active == {"triage@1": 1.0, "manner@1": 1.0}
    assert torch.allclose(_logits(session.model), expected, atol=1e-4)
    # stacked with others, it still brings what it was trained on (at weight 1)
    session.stack({"manner": 0.5})
    assert session.active == {"manner@1": 0.5, "triage@1": 1.0}


@pytest.mark.slow
def test_from_continues_a_copy(stacked, tiny_base):
    from safetensors.torch import load_file

    home, files, pm, triage, _ = stacked
    source = triage.pocket_book.path / "adapter_model.safetensors"
    before = load_file(str(source))
    copy = train("sft", base=str(tiny_base), data=str(files["prompt_completion"]),
                 name="triage-tiny-step", home=home, plugins=pm, start_from="triage",
                 options=TrainOptions(**{**FAST, "r": 16, "dropout": 0.2, "max_steps": 1,
                                         "learning_rate": 1e-12}))
    after = load_file(str(copy.pocket_book.path / "adapter_model.safetensors"))
    assert copy.pocket_book.meta.parents == ["triage@1"]
    assert copy.pocket_book.meta.stacked_on == []
    assert copy.pocket_book.meta.hyperparameters["r"] == 4  # the copy keeps its LoRA shape
    # and its dropout, which PEFT reads from the copied config: recorded as it trained
    assert copy.pocket_book.meta.hyperparameters["dropout"] == 0.0
    assert before.keys() == after.keys() and len(before) == 28  # A and B of 14 layers
    # a near-zero step from the copy: the weights are the source's (a fresh LoRA has B = 0)
    assert [k for k in before if not torch.allclose(before[k], after[k], atol=1e-6)] == []
    assert [k for k in after if "lora_B" in k and not after[k].abs().sum() > 0] == []
    assert torch.equal(load_file(str(source))["base_model.model.model.layers.0.self_attn.q_proj"
                                               ".lora_A.weight"],
                       before["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"])


@pytest.mark.slow
def test_from_a_stacked_book_keeps_its_underlay(stacked, tiny_base):
    home, files, pm, _, _ = stacked
    copy = train("dpo", base=str(tiny_base), data=str(files["preference"]), name="manner2",
                 home=home, plugins=pm, start_from="manner",
                 options=TrainOptions(**{**FAST, "max_steps": 1}))
    assert copy.pocket_book.meta.stacked_on == ["triage@1"]
    assert copy.pocket_book.meta.parents == ["manner@1"]


def test_on_refuses_bad_parents(stacked, tiny_base, other_base, tmp_path):
    home, files, pm, _, _ = stacked
    other = train("sft", base=str(other_base), data=str(files["prompt_completion"]),
                  name="elsewhere", home=home, plugins=pm,
                  options=TrainOptions(**{**FAST, "max_steps": 1}))
    before = [(b.name, b.version) for b in Library(home).list()]
    kwargs = dict(base=str(tiny_base), data=str(files["preference"]), name="new", home=home,
                  plugins=pm, options=TrainOptions(**{**FAST, "max_steps": 1}))
    with pytest.raises(BaseMismatch, match="--on: pocket book elsewhere@1 was made on base"):
        train("dpo", on="elsewhere", **kwargs)
    with pytest.raises(BaseMismatch, match="--from: pocket book elsewhere@1"):
        train("dpo", start_from="elsewhere", **kwargs)
    with pytest.raises(PocketBookNotFound):
        train("dpo", on="nothing-here", **kwargs)
    with pytest.raises(ConfigError, match="--on and --from exclude each other"):
        train("dpo", on="triage", start_from="triage", **kwargs)
    assert [(b.name, b.version) for b in Library(home).list()] == before
    assert other.pocket_book.ref == "elsewhere@1"


def test_card_tells_plain_peft_users_to_load_the_stack(stacked):
    home, *_ = stacked
    card = (Library(home).get("manner").path / "README.md").read_text()
    assert "trained on top of (frozen, active underneath): `triage@1`" in card
    assert "set_adapter(['under0', 'top'], inference_mode=True)" in card


@pytest.mark.slow
def test_qlora_dpo_on_top_of_a_pocket_book(stacked, tiny_base):
    """--method qlora with --on: the parent is folded into the 4-bit layers exactly."""
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel

    from adapterkit import load_base

    home, files, pm, triage, _ = stacked
    result = train("dpo", base=str(tiny_base), data=str(files["preference"]), name="q-manner",
                   home=home, plugins=pm, on="triage",
                   options=TrainOptions(**{**FAST, "method": "qlora", "max_steps": 4}))
    assert result.pocket_book.meta.method == "qlora"
    assert result.pocket_book.meta.stacked_on == ["triage@1"]
    from adapterkit.base.load import keep_4bit_layout

    q4 = load_base(str(tiny_base), home=home, quantization="4bit").model
    keep_4bit_layout(q4)  # as the training run held it
    only_triage = PeftModel.from_pretrained(q4, triage.pocket_book.path).eval()
    with result.model.disable_adapter():
        off = _logits(result.model)
    assert torch.allclose(off, _logits(only_triage), atol=1e-5)


def test_cli_on_and_from_flags(stacked, tiny_base, adapterkit_cli, monkeypatch):
    home, files, *_ = stacked
    monkeypatch.setenv("ADAPTERKIT_HOME", str(home))
    out = adapterkit_cli("train", "sft", "--base", str(tiny_base), "--data",
                         str(files["prompt_completion"]), "--name", "cli-top", "--on", "triage",
                         "--max-steps", "1", "-r", "4")
    assert out.exit_code == 0, out.output
    assert "Saved cli-top@1 (on top of triage@1)" in out.output
    bad = adapterkit_cli("train", "sft", "--base", str(tiny_base), "--data",
                         str(files["prompt_completion"]), "--name", "cli-bad", "--on", "triage",
                         "--from", "triage")
    assert bad.exit_code != 0
    assert bad.output.strip().splitlines()[-1].startswith("Error: --on and --from exclude")
    assert "Traceback" not in bad.output
    assert "--on BOOK" in adapterkit_cli("train", "--help").output


def test_rm_refuses_a_pocket_book_others_are_trained_on(stacked, adapterkit_cli, monkeypatch):
    home, *_ = stacked
    monkeypatch.setenv("ADAPTERKIT_HOME", str(home))
    out = adapterkit_cli("rm", "triage@1")
    assert out.exit_code != 0
    assert "triage@1 is needed by" in out.output and "manner@1" in out.output
    assert Library(home).get("triage@1")  # still there
    shown = adapterkit_cli("show", "manner")
    assert "on top of:   triage@1" in shown.output


def test_flatten_and_merge_refuse_to_drop_what_a_book_is_trained_on(stacked, tiny_base):
    from adapterkit.lora.combine import merge, stack

    home, files, pm, *_ = stacked
    library = Library(home)
    train("sft", base=str(tiny_base), data=str(files["prompt_completion"]), name="plain-one",
          home=home, plugins=pm, options=TrainOptions(**{**FAST, "max_steps": 1}))
    with pytest.raises(ConfigError, match="manner@1 is trained on top of triage@1, which "
                                          "flattening would leave out"):
        stack(library, ["manner"], None, name="flat", flatten=True)
    with pytest.raises(ConfigError, match="which the merge would leave out"):
        merge(library, ["manner", "plain-one"], None, method="linear", name="merged")
    flat = stack(library, ["triage", "manner"], None, name="flat", flatten=True)
    assert flat.meta.kind == "adapter"


def test_a_book_is_never_put_on_another_pocket_book_under_the_name_it_was_trained_on(
        stacked, tiny_base, tmp_path):
    """``manner`` records the weights of the ``triage@1`` it was trained on. In a library whose
    ``triage@1`` is another pocket book (a pull of ``manner`` into someone else's library, as
    here), every path that brings ``manner``'s underlay back refuses it, naming both hashes;
    before, each attached whatever was called ``triage@1``."""
    from adapterkit.library.metadata import WEIGHTS_FILE
    from adapterkit.plugin_api.testing import make_peft_adapter
    from adapterkit.runtime.peft_model import members_of
    from adapterkit.serving.names import resolve

    home, _, _, triage, manner = stacked
    recorded = manner.pocket_book.meta.stacked_on_sha256
    assert recorded == {"triage@1": triage.pocket_book.meta.files[WEIGHTS_FILE]}
    assert [b.ref for b, _ in members_of(Library(home), manner.pocket_book)] == [
        "triage@1", "manner@1"]  # the library it was trained in: as before

    other = Library(tmp_path / "elsewhere")
    other.import_peft(make_peft_adapter(tiny_base, tmp_path / "t", seed=7, r=4,
                                        target_modules="all-linear"), "triage",
                      base=str(tiny_base))
    other.import_peft(manner.pocket_book.path, "manner", base=str(tiny_base))
    other.update_meta("manner@1", lambda meta: (setattr(meta, "stacked_on", ["triage@1"]),
                                                setattr(meta, "stacked_on_sha256", recorded)))
    pulled = other.get("manner")
    held = other.get("triage@1").meta.files[WEIGHTS_FILE]
    message = f"trained on top of triage@1 with weights {recorded['triage@1'][:12]}"
    with pytest.raises(InvalidAdapter, match=message) as info:
        members_of(other, pulled)  # eval, generate, verify, export: through plain PEFT
    assert held[:12] in str(info.value)
    base = types.SimpleNamespace(fingerprint=pulled.meta.base_fingerprint)
    with pytest.raises(ConfigError, match=message):
        resolve(other, base, "manner", base_id="base")  # the server
    session = adapterkit.open(str(tiny_base), home=other.home)
    with pytest.raises(InvalidAdapter, match=message):
        session.swap("manner")  # sessions: chat, swap
    assert session.books == {}
    from adapterkit.lora.combine import merge, stack

    with pytest.raises(InvalidAdapter, match=message):  # folded into one adapter: never
        stack(other, ["triage", "manner"], None, name="flat", flatten=True)
    with pytest.raises(InvalidAdapter, match=message):
        merge(other, ["triage", "manner"], None, name="merged", method="linear")
    assert [b.name for b in other.list()] == ["manner", "triage"]

    # a namesake saved before hashes were recorded is hashed from its file
    other.update_meta("triage@1", lambda meta: meta.files.clear())
    with pytest.raises(InvalidAdapter, match=message):
        members_of(other, other.get("manner"))


def test_reward_from_continues_a_reward_pocket_book_and_refuses_a_policy(stacked, tiny_base,
                                                                          adapterkit_cli):
    """Before: ``reward --from`` a reward pocket book was refused as "name a policy pocket
    book", and ``--from`` a policy ended in TRL's ``num_labels`` traceback. The copy a run
    continues scores as plain PEFT's sequence-classification model with that adapter does."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from adapterkit.training.build import attach_new

    home, files, pm, triage, _ = stacked
    scorer = train("reward", base=str(tiny_base), data=str(files["preference"]), name="scorer",
                   home=home, plugins=pm, options=TrainOptions(**FAST))
    base = adapterkit.load_base(str(tiny_base), home=home)
    copy = attach_new(base, pm.method("lora"), TrainOptions(), start=scorer.pocket_book,
                      head="reward")
    plain = AutoModelForSequenceClassification.from_pretrained(
        tiny_base, num_labels=1, pad_token_id=base.tokenizer.pad_token_id)
    plain = PeftModel.from_pretrained(plain, str(scorer.pocket_book.path)).eval()
    torch.testing.assert_close(_logits(copy.eval()), _logits(plain), rtol=1e-5, atol=1e-6)

    more = train("reward", base=str(tiny_base), data=str(files["preference"]), name="scorer2",
                 home=home, plugins=pm, start_from="scorer", options=TrainOptions(**FAST))
    assert more.pocket_book.meta.kind == "adapter"
    with pytest.raises(ConfigError, match=r"^--from triage@1 is a policy pocket book \(it "
                                          r"generates text, it has no reward head to continue\): "
                                          r"name a reward pocket book, or train a new reward "
                                          r"head on top of it with --on triage@1$"):
        train("reward", base=str(tiny_base), data=str(files["preference"]), name="x",
              home=home, plugins=pm, start_from="triage", options=TrainOptions(**FAST))
    with pytest.raises(ConfigError, match=r"^--from scorer@1 is a reward pocket book .*; name a "
                                          r"policy pocket book$"):
        train("dpo", base=str(tiny_base), data=str(files["preference"]), name="x",
              home=home, plugins=pm, start_from="scorer", options=TrainOptions(**FAST))
    assert not Library(home).exists("x")


def test_a_recipe_stage_refuses_the_parents_the_command_refuses(stacked, tmp_path):
    """A ``reward`` stage ``from:`` a policy was let through to TRL's traceback; from: a
    reward pocket book is what it can continue."""
    import json

    from adapterkit.training.pipeline import load_recipe

    home, files, pm, _, _ = stacked
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"base": "unused-here", "max_steps": 1, "stages": [
        {"name": "r", "trainer": "reward", "data": str(files["preference"]), "from": "triage"},
        {"name": "d", "trainer": "dpo", "data": str(files["preference"]), "on": "manner"}]}))
    with pytest.raises(ConfigError, match=r"has a problem; .*\(1\) stage 1 \(r\): from: triage@1 "
                                          r"is a policy pocket book .* with on: triage@1$"):
        load_recipe(recipe, home=home, plugins=pm)


def test_a_session_names_the_removed_pocket_book_a_book_was_trained_on(stacked, tiny_base,
                                                                       tmp_path):
    """Sessions said "no pocket book named 'triage'" when asked for manner (trained --on
    triage, removed since with rm --force), where every other path names both."""
    import shutil

    home = tmp_path / "home"
    shutil.copytree(stacked[0], home)
    Library(home).remove("triage", force=True)
    session = adapterkit.open(str(tiny_base), home=home)
    for call in (lambda: session.swap("manner"), lambda: session.stack({"manner": 1.0})):
        with pytest.raises(InvalidAdapter, match=r"manner@1 .* triage@1, which this library no "
                                                 r"longer holds \(removed with `rm --force`\?\)"):
            call()
    session.close()
