"""`train sft` with lora and qlora on a tiny random base: every data shape, errors, resume."""

import json

import pytest
import torch

from adapterkit import (
    ConfigError,
    DataFormatError,
    NameTaken,
    PluginError,
    RunStateError,
    TargetModuleError,
    TrainOptions,
    train,
)
from adapterkit.plugin_api.manager import get_plugin_manager

SHAPES = {
    "text": [{"text": f"The river {w} flows past the old mill and the bridge."} for w in
             ("north", "south", "east", "west")] * 4,
    "prompt_completion": [{"prompt": f"Colour of item {i}?", "completion": f"Answer: {c}"}
                          for i, c in enumerate(["red", "blue", "green", "red"] * 4)],
    "messages": [{"messages": [{"role": "user", "content": f"Name {i}?"},
                               {"role": "assistant", "content": f"It is {n}."}]}
                 for i, n in enumerate(["Ada", "Bob", "Cy", "Dee"] * 4)],
    "alpaca": [{"instruction": f"Double {i}", "input": "", "output": str(2 * i)}
               for i in range(16)],
}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def pm():
    return get_plugin_manager(env=False)


def fast(**kw):
    base = dict(max_steps=40, learning_rate=3e-2, batch_size=4, logging_steps=2, save_steps=10,
                r=8, alpha=16, dropout=0.0)
    base.update(kw)
    return TrainOptions(**base)


def reload_logits(base_folder, adapter_path, ids, quantization=None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    kwargs = {}
    if quantization:
        from adapterkit.base.load import quantization_config

        kwargs = {"quantization_config": quantization_config(quantization, torch.float32),
                  "device_map": {"": "cpu"}}
    from adapterkit.base.load import keep_4bit_layout

    plain = AutoModelForCausalLM.from_pretrained(base_folder, **kwargs)
    keep_4bit_layout(plain)  # no bitsandbytes CPU repacking (it rounds; see adapterkit/base/load.py)
    model = PeftModel.from_pretrained(plain, adapter_path).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.slow
@pytest.mark.parametrize("shape", list(SHAPES))
def test_sft_lora_each_shape_learns_and_reloads_in_peft(shape, tiny_base, home, tmp_path, pm):
    data = write_jsonl(tmp_path / f"{shape}.jsonl", SHAPES[shape])
    # no guard: the logged loss would include its KL term, which at this learning rate on a
    # tiny base can outweigh what the task loss lost (the subject here is the data shapes)
    result = train("sft", base=str(tiny_base), data=str(data), name=f"b-{shape}",
                   options=fast(forgetting_budget=0), home=home, plugins=pm)
    m = result.metrics
    assert m["train_loss_final"] < 0.9 * m["train_loss_first"], m
    book = result.pocket_book
    assert book.meta.trainer == "sft" and book.meta.data["shape"] == (
        "prompt_completion" if shape == "alpaca" else shape)
    assert book.meta.data["format"] == shape
    assert (book.path / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    # the curve as numbers too: each logged step's loss, first and last as reported
    history = book.meta.metrics["loss_history"]
    assert [s for s, _ in history] == sorted({s for s, _ in history}) and len(history) > 1
    assert (history[0][1], history[-1][1]) == (m["train_loss_first"], m["train_loss_final"])
    assert "base_model" not in (book.path / "README.md").read_text().split("---")[1]  # local base
    config = json.loads((book.path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny"  # never a local path
    ids = torch.tensor([[3, 50, 60, 70, 80, 90]])
    with torch.no_grad():
        trained = result.model(input_ids=ids).logits
    assert torch.equal(reload_logits(tiny_base, book.path, ids), trained)


@pytest.mark.slow
def test_qlora_trains_on_4bit_base_and_reloads(tiny_base, home, tmp_path, pm):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    data = write_jsonl(tmp_path / "pc.jsonl", SHAPES["prompt_completion"])
    result = train("sft", base=str(tiny_base), data=str(data), name="q",
                   options=fast(method="qlora", forgetting_budget=0),  # as above
                   home=home, plugins=pm)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in result.model.modules())
    m = result.metrics
    assert m["train_loss_final"] < 0.9 * m["train_loss_first"], m
    assert result.pocket_book.meta.method == "qlora"
    ids = torch.tensor([[3, 50, 60, 70, 80, 90]])
    with torch.no_grad():
        trained = result.model(input_ids=ids).logits
    assert torch.equal(reload_logits(tiny_base, result.pocket_book.path, ids, "4bit"), trained)


@pytest.fixture
def pc_file(tmp_path):
    return write_jsonl(tmp_path / "pc.jsonl", SHAPES["prompt_completion"])


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(data="missing.jsonl"), DataFormatError, "does not exist"),
    (dict(trainer="nope"), PluginError, "unknown trainer 'nope'; known: .*sft"),
    (dict(options=dict(method="nope")), PluginError, "unknown method 'nope'; known: lora, qlora"),
    (dict(options=dict(target_modules="qkv")), TargetModuleError, "qkv match no linear layer"),
    (dict(options=dict(max_length=8)), ConfigError, "max_length 8 is not longer than prompt 1"),
])
def test_bad_input_writes_nothing(kwargs, error, match, tiny_base, home, pc_file, pm, tmp_path):
    from adapterkit import Library

    args = dict(trainer="sft", data=str(pc_file), options={})
    args.update(kwargs)
    if args["data"] == "missing.jsonl":
        args["data"] = str(tmp_path / "missing.jsonl")
    with pytest.raises(error, match=match):
        train(args["trainer"], base=str(tiny_base), data=args["data"], name="x",
              options=fast(**args["options"]), home=home, plugins=pm)
    assert Library(home).list() == []


@pytest.mark.parametrize("content,match", [
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a",\n', "line 2: invalid JSON"),
    ('{"question": "a", "answer": "b"}\n', "missing required columns.*the data has answer, question"),
    ('{"prompt": "", "completion": "b"}\n{"prompt": "a", "completion": "  "}\n',
     "no usable rows left"),
    ('[1, 2]\n', "line 1: expected a JSON object"),
    ('', "has no rows"),
])
def test_bad_data_files(content, match, tiny_base, home, tmp_path, pm):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    with pytest.raises(DataFormatError, match=match):
        train("sft", base=str(tiny_base), data=str(bad), name="x", options=fast(), home=home,
              plugins=pm)


def test_prompts_alone_are_their_own_shape_tried_after_plugin_formats(tiny_base, home,
                                                                        tmp_path, pm):
    """``{"prompt"}`` rows are online RL's data; a trainer that learns from answers refuses them
    naming what it reads, and a plugin format with a prompt column keeps its files."""
    from adapterkit import DataFormat
    from adapterkit.training.data import detect_shape

    assert detect_shape({"prompt"})[0] == "prompt"
    assert detect_shape({"prompt", "completion", "id"})[0] == "prompt_completion"
    assert detect_shape({"prompt", "chosen", "rejected"})[0] == "preference"

    class PromptResponse(DataFormat):
        name, columns, shape = "pr", ("prompt", "response"), "prompt_completion"

    shape, fmt = detect_shape({"prompt", "response"}, [PromptResponse()])
    assert (shape, fmt.name) == ("prompt_completion", "pr")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    with pytest.raises(DataFormatError, match=r"is prompt data \(columns prompt\); this trainer "
                                              r"reads .*prompt_completion rows"):
        train("sft", base=str(tiny_base), data=str(prompts), name="x", options=fast(),
              home=home, plugins=pm)


def test_name_taken_is_refused_before_training(tiny_base, home, pc_file, pm, monkeypatch):
    from adapterkit import Library

    lib = Library(home)
    with lib.draft() as staged:
        (staged / "adapter_config.json").write_text("{}")
        (staged / "adapter_model.safetensors").write_bytes(b"x")
        from adapterkit import PocketBookMeta

        lib.commit(staged, PocketBookMeta(name="taken", version=1))
    monkeypatch.setattr("adapterkit.training.run.load_for_method", lambda *a: pytest.fail("trained anyway"))
    with pytest.raises(NameTaken, match="--name taken@2"):
        train("sft", base=str(tiny_base), data=str(pc_file), name="taken", options=fast(),
              home=home, plugins=pm)


def test_4bit_without_bitsandbytes_is_a_clear_error(tiny_base, home, pc_file, pm, monkeypatch):
    import sys

    from adapterkit import MissingDependency

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(MissingDependency, match="pip install 'adapterkit\\[quant\\]'"):
        train("sft", base=str(tiny_base), data=str(pc_file), name="x",
              options=fast(method="qlora"), home=home, plugins=pm)


@pytest.mark.slow
def test_a_failed_run_names_the_checkpoint_it_kept(tiny_base, home, pc_file, pm, monkeypatch):
    """A run that failed mid-way (here a callback's RuntimeError after step 3's checkpoint)
    kept that checkpoint without a word; the next plain run was then refused beside it. It
    says which, and what --resume and --restart do; a checkpoint of the last step (the run
    failed as it was measured or saved) is one to --restart, as a resume refuses it."""
    from transformers import TrainerCallback

    class Fail(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                raise RuntimeError("disk full")

    said: list[str] = []
    with pytest.raises(RuntimeError, match="disk full"):
        train("sft", base=str(tiny_base), data=str(pc_file), name="f",
              options=fast(max_steps=8, save_steps=3), home=home, plugins=pm,
              callbacks=[Fail()], progress=said.append)
    assert said[-1] == ("The run's last checkpoint is checkpoint-3: once the cause is fixed "
                        "(a resume keeps the run's options), the same command with --resume "
                        "continues from it; --restart discards it."), said
    with pytest.raises(RunStateError, match="pass --resume to continue it"):  # as it says
        train("sft", base=str(tiny_base), data=str(pc_file), name="f",
              options=fast(max_steps=8, save_steps=3), home=home, plugins=pm)
    said.clear()
    with pytest.raises(RuntimeError, match="disk full"):  # before any checkpoint: nothing said
        train("sft", base=str(tiny_base), data=str(pc_file), name="g",
              options=fast(max_steps=8, save_steps=6), home=home, plugins=pm,
              callbacks=[Fail()], progress=said.append)
    assert not any("checkpoint" in line for line in said), said

    def full_disk(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("adapterkit.training.run._save", full_disk)
    said.clear()
    with pytest.raises(RuntimeError, match="disk full"):
        train("sft", base=str(tiny_base), data=str(pc_file), name="h",
              options=fast(max_steps=4, save_steps=2), home=home, plugins=pm,
              progress=said.append)
    assert said[-1] == ("Training had finished (checkpoint-4) when the run failed: run the same "
                        "command with --restart to train it again."), said
    monkeypatch.undo()
    with pytest.raises(RunStateError, match="had trained all its 4 steps .* pass --restart"):
        train("sft", base=str(tiny_base), data=str(pc_file), name="h",
              options=fast(max_steps=4, save_steps=2), home=home, plugins=pm, resume=True)


@pytest.mark.slow
def test_interrupt_leaves_no_entry_and_resume_finishes(tiny_base, home, pc_file, pm):
    from transformers import TrainerCallback

    from adapterkit import Library

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 25:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train("sft", base=str(tiny_base), data=str(pc_file), name="r", options=fast(),
              home=home, plugins=pm, callbacks=[Interrupt()])
    assert Library(home).list() == []
    staging = Library(home).staging
    assert not staging.exists() or list(staging.iterdir()) == []
    with pytest.raises(ConfigError, match="pass --resume to continue it or --restart"):
        train("sft", base=str(tiny_base), data=str(pc_file), name="r", options=fast(),
              home=home, plugins=pm)

    class Steps(TrainerCallback):
        def __init__(self):
            self.seen = []

        def on_step_end(self, args, state, control, **kwargs):
            self.seen.append(state.global_step)

    steps = Steps()
    result = train("sft", base=str(tiny_base), data=str(pc_file), name="r", options=fast(),
                   home=home, plugins=pm, resume=True, callbacks=[steps])
    assert result.metrics["steps"] == 40
    assert steps.seen == list(range(21, 41))  # from the last checkpoint (step 20), not over
    assert not (home / "runs" / "r").exists()
    # it finishes the same run: the weights a run that was never interrupted ends with
    from safetensors.torch import load_file

    straight = train("sft", base=str(tiny_base), data=str(pc_file), name="straight",
                     options=fast(), home=home, plugins=pm)
    resumed = load_file(str(result.pocket_book.path / "adapter_model.safetensors"))
    reference = load_file(str(straight.pocket_book.path / "adapter_model.safetensors"))
    assert resumed.keys() == reference.keys() and len(reference) > 0
    assert [k for k in reference
            if not torch.allclose(resumed[k], reference[k], rtol=0, atol=1e-6)] == []
    # and reports the loss where that run ends
    assert result.metrics["train_loss_final"] == pytest.approx(
        straight.metrics["train_loss_final"], rel=1e-5)
    with pytest.raises(ConfigError, match="no interrupted run"):
        train("sft", base=str(tiny_base), data=str(pc_file), name="r@2", options=fast(),
              home=home, plugins=pm, resume=True)


def test_recipe_file_and_overrides(tmp_path):
    from adapterkit import build_options

    recipe = tmp_path / "r.yaml"
    recipe.write_text("r: 4\nlearning_rate: 1e-3\ntarget_modules: [q_proj, v_proj]\n"
                      "forgetting_budget: 1%\n")
    opts = build_options(recipe, {"r": 8, "seed": None})
    assert (opts.r, opts.learning_rate, opts.target_modules, opts.forgetting_budget) == (
        8, 1e-3, "q_proj,v_proj", 1.0)
    recipe.write_text("rank: 4\nlr: x\nepochs: -1\nbatch_size: 2.5\n")
    with pytest.raises(ConfigError) as err:
        build_options(recipe)
    text = str(err.value)
    assert "unknown option(s) lr, rank" in text and "epochs: must be positive" in text
    assert "batch_size: expected an integer" in text


@pytest.mark.parametrize("suffix", ["csv", "parquet", "json"])
def test_csv_parquet_and_json_files(suffix, tiny_base, home, tmp_path, pm):
    from datasets import Dataset

    rows = SHAPES["prompt_completion"]
    path = tmp_path / f"data.{suffix}"
    if suffix == "json":
        path.write_text(json.dumps(rows))
    else:
        getattr(Dataset.from_list(rows), f"to_{suffix}")(str(path))
    result = train("sft", base=str(tiny_base), data=str(path), name=f"f-{suffix}",
                   options=fast(max_steps=4), home=home, plugins=pm)
    assert result.pocket_book.meta.data["rows"] == len(rows)
    assert result.pocket_book.meta.data["shape"] == "prompt_completion"


def test_packing_and_eval_split(tiny_base, home, tmp_path, pm):
    data = write_jsonl(tmp_path / "text.jsonl", SHAPES["text"])
    result = train("sft", base=str(tiny_base), data=str(data), name="packed",
                   options=fast(max_steps=6, packing=True, eval_split=0.25, max_length=64),
                   home=home, plugins=pm)
    m = result.metrics
    assert m["eval"]["tokens"] > 0 and m["eval"]["loss"] > 0
    assert result.pocket_book.meta.hyperparameters["packing"] is True
    one = write_jsonl(tmp_path / "one.jsonl", SHAPES["text"][:1])
    with pytest.raises(ConfigError, match="eval_split 0.5 leaves no training rows out of 1"):
        train("sft", base=str(tiny_base), data=str(one), name="bad",
              options=fast(eval_split=0.5), home=home, plugins=pm)


@pytest.mark.slow
def test_a_resume_keeps_the_epochs_the_interrupted_run_set_out_for(tiny_base, home, pc_file, pm):
    """Epochs left to min_steps are resolved when a run starts; a resume whose options would
    resolve others (here min_steps 8 → 3 epochs) goes on with the interrupted run's (2)."""
    from transformers import TrainerCallback

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt

    rows = len(pc_file.read_text().splitlines())
    per_epoch = -(-rows // 4)
    two = dict(max_steps=-1, save_steps=2, min_steps=per_epoch + 1, forgetting_budget=0)
    with pytest.raises(KeyboardInterrupt):
        train("sft", base=str(tiny_base), data=str(pc_file), name="e", home=home, plugins=pm,
              options=fast(**two), callbacks=[Interrupt()])
    three = {**two, "min_steps": 2 * per_epoch + 1}
    result = train("sft", base=str(tiny_base), data=str(pc_file), name="e", home=home,
                   plugins=pm, options=fast(**three), resume=True)
    assert result.metrics["steps"] == 2 * per_epoch
    assert result.pocket_book.meta.hyperparameters["epochs"] == 2.0
