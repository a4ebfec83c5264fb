"""Bad input is refused in one line on stderr, with a non-zero exit and nothing saved (#17):
input that used to end in a traceback, and input that used to be accepted and silently
misread (a version that overflows, ``--max-steps 0``, ``--lr nan``, a rank no layer can hold,
rows dropped without a word, a negative temperature)."""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import pytest


def refused(result, *words: str, alone: bool = True) -> str:
    """The one ``Error:`` line of a refused command (``alone``: nothing else on stderr)."""
    assert result.exit_code not in (0, None), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    if alone:
        assert lines == errors, result.stderr
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def rewrite_header(path: Path, change) -> None:
    """Rewrite the JSON header of the safetensors file ``path`` with ``change(header)``; the
    data offsets are relative to the data section, so the tensors stay where they were."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    change(header)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def drop_shape(header: dict) -> None:
    first = next(k for k in sorted(header) if k != "__metadata__")
    del header[first]["shape"]


@pytest.fixture
def train_args(tiny_base, adapterkit_data):
    """``train sft`` on the tiny base with small prompt/completion data; add flags after."""
    return ["train", "sft", "--base", tiny_base, "--data", adapterkit_data["prompt_completion"],
            "--name", "x"]


# -- tracebacks on bad input ----------------------------------------------------------------

@pytest.mark.parametrize("ref,words", [
    ("x@99999999999999999999999", ["versions go from 1 to 1000000000"]),
    ("x@" + "9" * 5000, ["versions go from 1 to 1000000000"]),  # past int()'s digit limit
    ("x@١", ["ASCII digits"]),  # an Arabic-Indic 1: int() reads it, but it is not "1"
])
def test_import_refuses_versions_that_overflow_or_are_not_ascii(ref, words, adapterkit_cli,
                                                                 peft_adapter, library):
    refused(adapterkit_cli("import", peft_adapter, "--name", ref), *words)
    assert library.list(all_versions=True) == []


@pytest.mark.parametrize("ref", ["x@²", "x@١", "x@99999999999999999999999"])
def test_show_refuses_bad_versions_in_one_line(ref, adapterkit_cli, home):
    refused(adapterkit_cli("show", ref), "invalid version")


def test_base_with_a_header_entry_without_shape_is_named(tiny_base, adapterkit_cli, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    rewrite_header(base / "model.safetensors", drop_shape)
    refused(adapterkit_cli("base", "show", base), "model.safetensors", "malformed header",
            "no 'shape'", alone=False)


def test_adapter_with_a_header_entry_without_shape_is_named(peft_adapter, adapterkit_cli,
                                                            library, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(peft_adapter, adapter)
    rewrite_header(adapter / "adapter_model.safetensors", drop_shape)
    refused(adapterkit_cli("import", adapter, "--name", "x"), "adapter_model.safetensors",
            alone=False)
    assert library.list(all_versions=True) == []


def test_adapter_config_with_an_invalid_target_pattern_is_named(peft_adapter, adapterkit_cli,
                                                                library, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(peft_adapter, adapter)
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["target_modules"] = "(["
    config_path.write_text(json.dumps(config))
    refused(adapterkit_cli("import", adapter, "--name", "x"), "'(['",
            "not a valid regular expression", alone=False)
    assert library.list(all_versions=True) == []


def test_train_target_modules_that_look_like_a_pattern_are_refused(train_args, adapterkit_cli,
                                                                   library):
    refused(adapterkit_cli(*train_args, "--target-modules", "(["), "([",
            "match no linear layer", alone=False)
    assert library.list(all_versions=True) == []


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".txt", ".csv"])
def test_non_utf8_data_file_names_the_file_and_the_offset(suffix, tiny_base, adapterkit_cli,
                                                          library, tmp_path):
    data = tmp_path / f"latin1{suffix}"
    good = {".jsonl": b'{"text": "ok"}\n', ".json": b'[{"text": "ok"},\n',
            ".txt": b"ok\n", ".csv": b"text,n\n"}[suffix]
    data.write_bytes(good + "café".encode("latin-1"))  # 0xe9 is not UTF-8 on its own
    offset = len(good) + 3
    refused(adapterkit_cli("train", "sft", "--base", tiny_base, "--data", data, "--name", "x"),
            f"latin1{suffix}", "not UTF-8", "0xe9", f"offset {offset}", "line 2")
    assert library.list(all_versions=True) == []


def test_non_utf8_recipe_is_refused_in_one_line(train_args, adapterkit_cli, library, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes("rank: 8 # café\n".encode("latin-1"))
    refused(adapterkit_cli(*train_args, "--config", recipe), "recipe.yaml", "not UTF-8",
            "offset 13")
    assert library.list(all_versions=True) == []


@pytest.mark.parametrize("lr", ["nan", "inf", "-inf", "0", "-1e-4"])
def test_learning_rate_must_be_a_positive_finite_number(lr, train_args, adapterkit_cli, library):
    refused(adapterkit_cli(*train_args, "--lr", lr), "learning_rate")
    assert library.list(all_versions=True) == []


# -- accepted and silently wrong ------------------------------------------------------------

@pytest.mark.parametrize("trainer,data", [("sft", "prompt_completion"), ("reward", "preference")])
def test_trainers_without_options_refuse_set(trainer, data, tiny_base, adapterkit_data,
                                             adapterkit_cli, library):
    result = adapterkit_cli("train", trainer, "--base", tiny_base, "--data",
                            adapterkit_data[data], "--name", "x", "--set", "nosuchkey=1")
    refused(result, f"the {trainer} trainer takes no trainer options", "nosuchkey")
    assert library.list(all_versions=True) == []


@pytest.mark.parametrize("trainer", ["dpo", "reward"])
@pytest.mark.parametrize("value", ["0.05", "0.3"])
def test_a_given_dropout_is_refused_where_the_trainer_drops_nothing_out(
        trainer, value, tiny_base, adapterkit_data, adapterkit_cli, library, tmp_path):
    """``train dpo --dropout 0.05`` was recorded as 0 without a word: the value given is the
    default's, which the options could not tell from no flag. Given, it is refused like any
    other value (as flag or in a --config recipe); 0 is accepted."""
    args = ("train", trainer, "--base", tiny_base, "--data", adapterkit_data["preference"],
            "--name", "x")
    refused(adapterkit_cli(*args, "--dropout", value),
            f"the {trainer} trainer trains with dropout off", f"a dropout of {float(value):g}",
            "leave --dropout out")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"dropout: {value}\n")
    refused(adapterkit_cli(*args, "--config", recipe), f"invalid training options in {recipe}",
            f"a dropout of {float(value):g} would do nothing")
    assert library.list(all_versions=True) == []


def test_unknown_trainer_option_lists_the_known_ones(tiny_base, adapterkit_data, adapterkit_cli):
    result = adapterkit_cli("train", "dpo", "--base", tiny_base, "--data",
                            adapterkit_data["preference"], "--name", "x", "--set", "nosuchkey=1")
    refused(result, "unknown dpo option(s) nosuchkey", "known: beta")


@pytest.mark.parametrize("flag,value,option", [
    ("--max-steps", "0", "max_steps"), ("--max-steps", "-2", "max_steps"),
    ("--epochs", "0", "epochs"), ("--epochs", "-1", "epochs"), ("--epochs", "nan", "epochs"),
    ("--batch-size", "0", "batch_size"), ("--rank", "0", "r"), ("--alpha", "0", "alpha"),
    ("--grad-accum", "0", "grad_accum"), ("--max-length", "0", "max_length"),
    ("--save-steps", "0", "save_steps"), ("--logging-steps", "0", "logging_steps"),
    ("--seed", "-1", "seed"), ("--seed", str(2**32), "seed"),
    ("--dropout", "1", "dropout"), ("--dropout", "nan", "dropout"),
    ("--eval-split", "1", "eval_split"), ("--guard-weight", "-1", "guard_weight"),
    ("--early-stopping", "-1", "early_stopping"), ("--early-stopping", "2", "early_stopping"),
    ("--guard-weight", "inf", "guard_weight"), ("--forgetting-budget", "-1", "forgetting_budget"),
    ("--forgetting-budget", "nan", "forgetting_budget"),
])
def test_every_numeric_train_option_is_range_checked(flag, value, option, train_args,
                                                     adapterkit_cli, library):
    refused(adapterkit_cli(*train_args, flag, value), f"{option}:")
    assert library.list(all_versions=True) == []


def test_all_option_problems_are_reported_together(train_args, adapterkit_cli):
    error = refused(adapterkit_cli(*train_args, "--max-steps", "0", "--lr", "nan",
                                   "--batch-size", "0"))
    assert all(word in error for word in ("max_steps", "learning_rate", "batch_size"))


def test_options_built_in_python_are_range_checked_too(tiny_base, adapterkit_data, home):
    from adapterkit import Library, TrainOptions, train
    from adapterkit.errors import ConfigError

    with pytest.raises(ConfigError, match=r"learning_rate: expected a finite number, got nan; "
                                          r"max_steps: must be at least 1 \(or -1"):
        train("sft", base=str(tiny_base), data=str(adapterkit_data["prompt_completion"]),
              name="x", options=TrainOptions(max_steps=0, learning_rate=float("nan")), home=home)
    assert Library(home).list(all_versions=True) == []


@pytest.mark.parametrize("key,value", [("beta", "nan"), ("temperature", "inf")])
def test_trainer_options_must_be_finite(key, value, tiny_base, adapterkit_data, adapterkit_cli):
    result = adapterkit_cli("train", "rlhf", "--base", tiny_base, "--data",
                            adapterkit_data["preference"], "--name", "x", "--set",
                            f"{key}={value}", "--batch-size", "4")
    refused(result, key, "finite")


@pytest.mark.parametrize("targets,layer,limit", [
    (None, "k_proj (64 → 32 features)", 32),  # all-linear: the narrowest layer bounds it
    ("q_proj", "q_proj (64 → 64 features)", 64),
])
def test_rank_above_the_smallest_targeted_layer_is_refused(targets, layer, limit, train_args,
                                                           adapterkit_cli, library, home,
                                                           monkeypatch):
    monkeypatch.setattr("adapterkit.training.run.attach_new",
                        lambda *a, **k: pytest.fail("a LoRA was built"))
    extra = ["--target-modules", targets] if targets else []
    refused(adapterkit_cli(*train_args, "--rank", "100000", *extra), "rank 100000", layer,
            f"at most {limit}", alone=False)
    assert library.list(all_versions=True) == []
    assert not (home / "runs" / "x@1").exists()


def test_rank_at_the_limit_is_accepted(train_args, adapterkit_cli, library):
    result = adapterkit_cli(*train_args, "--rank", "32", "--max-steps", "1")
    assert result.exit_code == 0, result.output
    assert library.get("x").meta.hyperparameters["r"] == 32


BAD_ROWS = [{"prompt": "Colour of item 1?", "completion": "red"},
            {"prompt": "", "completion": "blue"},             # empty prompt
            {"text": "a row of another shape"},                # no prompt, no completion
            {"prompt": "Colour of item 4?", "completion": "green"},
            {"prompt": "Colour of item 5?", "completion": ["not", "a", "string"]}]


@pytest.fixture
def bad_rows(tmp_path) -> Path:
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in BAD_ROWS))
    return path


def test_rows_of_the_wrong_shape_are_named_and_stop_the_run(bad_rows, tiny_base,
                                                            adapterkit_cli, library):
    result = adapterkit_cli("train", "sft", "--base", tiny_base, "--data", bad_rows,
                            "--name", "x")
    refused(result, "mixed.jsonl", "3 of 5 rows", "row(s) 2, 3, 5", "--skip-bad-rows")
    assert library.list(all_versions=True) == []


def test_skip_bad_rows_trains_on_the_others_and_says_how_many(bad_rows, tiny_base,
                                                              adapterkit_cli, library):
    result = adapterkit_cli("train", "sft", "--base", tiny_base, "--data", bad_rows,
                            "--name", "x", "--skip-bad-rows", "--max-steps", "1")
    assert result.exit_code == 0, result.output
    assert "Skipped 3 row(s) of the wrong shape (--skip-bad-rows): row(s) 2, 3, 5" in result.stderr
    data = library.get("x").meta.data
    assert (data["rows"], data["skipped_rows"]) == (2, 3)


def test_columns_a_run_does_not_read_are_named(tiny_base, adapterkit_cli, library, tmp_path):
    """A ``system`` column beside prompt/completion was dropped without a word: the book
    learnt the answers without the instructions the user meant it to see. The run names
    every column the data's shape does not keep."""
    rows = [{"prompt": f"q{i}", "completion": f"a{i}", "system": "be brief", "id": i}
            for i in range(4)]
    path = tmp_path / "extra.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = adapterkit_cli("train", "sft", "--base", tiny_base, "--max-steps", "1",
                            "--general", "off", "--data", path, "--name", "x")
    assert result.exit_code == 0, result.output
    assert ("Dropped as the data was read: column(s) id, system (prompt_completion rows keep "
            "only prompt/completion)") in result.stderr


def test_the_columns_a_shape_keeps_are_not_named(tmp_path):
    """Only columns the shape drops are named: none for plain rows of each shape, a
    preference file without a prompt column (the prompt is the pairs' shared start), a text
    file, or a plugin's format (which reads what it converts)."""
    from adapterkit.plugin_api.manager import get_plugin_manager
    from adapterkit.training.data import load_data

    def data(name: str, rows: list) -> str:
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    plain = {
        "pc.jsonl": [{"prompt": "q", "completion": "a"}] * 2,
        "m.jsonl": [{"messages": chat}] * 2,
        "p.jsonl": [{"prompt": "q", "chosen": "good", "rejected": "bad"}] * 2,
        "implicit.jsonl": [{"chosen": [chat[0], {"role": "assistant", "content": "a"}],
                            "rejected": [chat[0], {"role": "assistant", "content": "b"}]}] * 2,
        "alpaca.jsonl": [{"instruction": "q", "input": "", "output": "a"}] * 2,
    }
    formats = get_plugin_manager(env=False).data_formats
    for name, rows in plain.items():
        loaded = load_data(data(name, rows), formats=formats)
        assert loaded.unread == [] and loaded.unread_note() is None, (name, loaded.unread)
    (tmp_path / "t.txt").write_text("some prose\n\nmore prose\n")
    assert load_data(str(tmp_path / "t.txt")).unread == []
    tools = load_data(data("tools.jsonl", [{"messages": chat, "tools": []}] * 2))
    assert tools.unread == ["tools"]
    assert tools.unread_note() == ("Dropped as the data was read: column(s) tools (messages "
                                   "rows keep only messages)")


def test_skip_bad_rows_is_documented(adapterkit_cli):
    result = adapterkit_cli("train", "--help")
    assert result.exit_code == 0 and "--skip-bad-rows" in result.output


def test_a_conversation_without_an_assistant_turn_is_a_bad_row(tiny_base, adapterkit_cli,
                                                               tmp_path):
    data = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello"}]},
            {"messages": [{"role": "user", "content": "Anyone?"}]},
            {"messages": "not a conversation"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    refused(adapterkit_cli("train", "sft", "--base", tiny_base, "--data", data, "--name", "x"),
            "row(s) 2, 3")


@pytest.mark.parametrize("args,words", [
    (["generate", "hi", "--base", "b", "--temperature", "-1"], ["--temperature", "-1"]),
    (["generate", "hi", "--base", "b", "--temperature", "nan"], ["--temperature", "nan"]),
    (["generate", "hi", "--base", "b", "--max-new-tokens", "0"], ["--max-new-tokens"]),
    (["eval", "x", "--data", "d.jsonl", "--max-new-tokens", "0"], ["--max-new-tokens"]),
    (["chat", "--base", "b", "--max-new-tokens", "-5"], ["--max-new-tokens"]),
    (["swap", "x", "--prompt", "p", "--max-new-tokens", "0"], ["--max-new-tokens"]),
])
def test_sampling_options_are_checked_before_anything_loads(args, words, adapterkit_cli, home):
    # the base "b", the book "x" and d.jsonl do not exist: the options are refused first
    refused(adapterkit_cli(*args), *words)


def test_invalid_yaml_recipe_is_one_line_with_its_place(train_args, adapterkit_cli, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("rank: 8\nlr: [unclosed\n")
    refused(adapterkit_cli(*train_args, "--config", recipe), "recipe.yaml", "not valid YAML",
            "line 3, column 1")


def test_yaml_true_is_not_read_as_a_number(train_args, adapterkit_cli, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("r: true\nlearning_rate: yes\n")
    refused(adapterkit_cli(*train_args, "--config", recipe), "r: expected an integer, got True",
            "learning_rate: expected a number, got True")


def test_eval_names_bad_rows_too_and_can_skip_them(bad_rows, adapterkit_cli, home):
    # the data is read before the pocket book: "ghost" need not exist to see the refusal
    refused(adapterkit_cli("eval", "ghost", "--data", bad_rows), "row(s) 2, 3, 5",
            "--skip-bad-rows")
    result = adapterkit_cli("eval", "ghost", "--data", bad_rows, "--skip-bad-rows")
    assert "Skipped 3 row(s) of the wrong shape" in result.stderr
    refused(result, "ghost", alone=False)


# -- options that would have done nothing -------------------------------------------------------

@pytest.mark.parametrize("trainer,data", [("dpo", "preference"), ("reward", "preference")])
def test_packing_is_refused_by_trainers_that_do_not_pack(trainer, data, tiny_base,
                                                         adapterkit_data, adapterkit_cli,
                                                         library):
    result = adapterkit_cli("train", trainer, "--base", tiny_base, "--data",
                            adapterkit_data[data], "--name", "x", "--packing")
    refused(result, f"the {trainer} trainer does not pack sequences", "drop --packing")
    assert library.list(all_versions=True) == []


@pytest.mark.parametrize("flags", [["--forgetting-budget", "off"],
                                   ["--forgetting-budget", "0", "--guard-weight", "0"]])
def test_an_anchor_without_a_guard_is_refused(flags, train_args, adapterkit_cli, library,
                                              tmp_path):
    anchor = tmp_path / "anchor.txt"
    anchor.write_text("Some prose to stay near.\n")
    result = adapterkit_cli(*train_args, *flags, "--anchor", str(anchor))
    refused(result, "--anchor is the forgetting guard's anchor text", "no guard")
    assert library.list(all_versions=True) == []


def test_a_missing_anchor_file_is_named_before_the_base_loads(adapterkit_data, adapterkit_cli,
                                                              library, tmp_path):
    # (the base does not exist: a refusal that came after loading it would name the base)
    result = adapterkit_cli("train", "sft", "--base", str(tmp_path / "no-base"), "--data",
                            adapterkit_data["prompt_completion"], "--name", "x", "--anchor",
                            str(tmp_path / "missing.txt"))
    refused(result, "missing.txt")
    assert library.list(all_versions=True) == []


def test_resume_and_restart_together_are_refused(train_args, adapterkit_cli, library):
    result = adapterkit_cli(*train_args, "--resume", "--restart")
    refused(result, "--resume continues", "--restart discards", "give one")


def without_chat_template(base: Path, copy: Path) -> Path:
    """A copy of ``base`` whose tokenizer has no chat template (the same weights)."""
    shutil.copytree(base, copy)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    for template in copy.glob("chat_template.*"):
        template.unlink()
    return copy


def test_chat_on_a_base_without_a_chat_template_is_refused(tiny_base, adapterkit_data,
                                                           adapterkit_cli, library, tmp_path):
    plain = without_chat_template(tiny_base, tmp_path / "plain-base")
    result = adapterkit_cli("train", "sft", "--base", str(plain), "--data",
                            adapterkit_data["prompt_completion"], "--name", "x", "--chat",
                            "--max-steps", "1")
    refused(result, "--chat renders prompts with the base's chat template", "has none",
            alone=False)
    assert library.list(all_versions=True) == []


def test_general_is_refused_for_a_reward_head(tiny_base, adapterkit_data, adapterkit_cli,
                                              library):
    result = adapterkit_cli("train", "reward", "--base", tiny_base, "--data",
                            adapterkit_data["preference"], "--name", "x", "--general", "general")
    refused(result, "the reward trainer makes a reward head", "drop --general")
    assert library.list(all_versions=True) == []


def test_a_recipe_stage_where_a_shared_option_would_do_nothing_is_refused_before_any_stage(
        tiny_base, adapterkit_data, adapterkit_cli, library, tmp_path):
    """The recipe's shared general: applies to every stage; a reward stage cannot measure it,
    and is refused with the recipe's other problems — before the first stage trains."""
    import yaml

    pairs, chats = adapterkit_data["preference"], adapterkit_data["prompt_completion"]
    recipe = {"base": str(tiny_base), "max_steps": 1, "general": "general",
              "stages": [{"name": "first", "trainer": "sft", "data": str(chats)},
                         {"name": "judge", "trainer": "reward", "data": str(pairs)},
                         {"name": "judge2", "trainer": "reward", "data": str(pairs),
                          "general": None, "on": "first"}]}  # (not on the reward head judge)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    result = adapterkit_cli("pipeline", str(path))
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "judge" in result.output and "general: null in a recipe's stage" in result.output
    assert "judge2" not in result.output  # general: null turns it off for that stage
    assert library.list(all_versions=True) == []


def test_rlhf_refuses_reward_steps_with_a_reward_book(tiny_base, adapterkit_data,
                                                      adapterkit_cli, library):
    result = adapterkit_cli("train", "rlhf", "--base", tiny_base, "--data",
                            adapterkit_data["preference"], "--name", "x", "--reward", "judge",
                            "--set", "reward_steps=3")
    refused(result, "reward_steps 3 sets the length of the reward stage", "--reward judge")


@pytest.mark.parametrize("flags", [["-r", "32"], ["--alpha", "8", "--dropout", "0.2"],
                                   ["--target-modules", "q_proj"]])
def test_lora_shape_flags_are_refused_with_from(flags, train_args, adapterkit_cli, library):
    """--from continues a copy with the copied pocket book's LoRA shape: the flags would be
    overridden by it."""
    result = adapterkit_cli(*train_args, "--from", "someone", *flags)
    refused(result, "--from someone continues a copy of that pocket book", "drop " + flags[0])


def test_epochs_beside_max_steps_are_refused(train_args, adapterkit_cli, library):
    result = adapterkit_cli(*train_args, "--epochs", "2", "--max-steps", "5")
    refused(result, "--max-steps sets the run's length", "ignores --epochs", "give one")


def test_epochs_beside_max_steps_are_refused_in_python_too(tiny_base, adapterkit_data, home):
    """The Python API trained max_steps and ignored epochs, as transformers does."""
    from adapterkit import Library, TrainOptions, train
    from adapterkit.errors import ConfigError

    with pytest.raises(ConfigError, match=r"max_steps sets the run's length, and the trainer "
                                          r"ignores epochs beside it: give one"):
        train("sft", base=str(tiny_base), data=str(adapterkit_data["prompt_completion"]),
              name="x", options=TrainOptions(max_steps=5, epochs=2.0), home=home)
    assert Library(home).list(all_versions=True) == []


def test_a_trainers_default_epochs_yield_to_max_steps():
    """A plugin's ``defaults`` may give epochs; beside a run's max_steps they would do nothing."""
    from types import SimpleNamespace

    from adapterkit.training.options import TrainOptions, with_defaults

    trainer = SimpleNamespace(name="t", defaults={"epochs": 3.0})
    assert with_defaults(trainer, TrainOptions(max_steps=5)).epochs is None
    assert with_defaults(trainer, TrainOptions()).epochs == 3.0


def test_a_run_of_max_steps_records_the_epochs_it_trained_not_one(train_args, adapterkit_cli,
                                                                   library):
    """16 rows, batch 4, 6 steps: 1.5 passes over the data; no epochs were set."""
    result = adapterkit_cli(*train_args, "--max-steps", "6", "--batch-size", "4",
                            "--forgetting-budget", "off", "--general", "off")
    assert result.exit_code == 0, result.output
    meta = library.get("x").meta
    assert meta.hyperparameters["epochs"] is None
    assert meta.metrics["epochs_trained"] == 6 * 4 / 16


@pytest.mark.parametrize("text,words", [("{bad", "is not valid JSON"),
                                        ("[1, 2]", "holds a JSON list, not an object")])
def test_a_model_folder_with_a_broken_config_is_named(text, words, tiny_base, adapterkit_cli,
                                                     tmp_path):
    broken = tmp_path / "broken-base"
    shutil.copytree(tiny_base, broken)
    (broken / "config.json").write_text(text)
    refused(adapterkit_cli("base", "show", str(broken)), "config.json", words)


def test_chat_looks_the_pocket_book_up_before_loading_the_base(adapterkit_cli, home, tmp_path):
    # (the base does not exist: a lookup after loading it would name the base)
    result = adapterkit_cli("chat", "--base", str(tmp_path / "no-base"), "--adapter", "nosuch")
    refused(result, "nosuch", alone=False)
    assert "no-base" not in result.stderr


def test_eval_refuses_a_general_file_without_text_rows(adapterkit_cli, adapterkit_data, home):
    result = adapterkit_cli("eval", "nosuch", "--data", adapterkit_data["prompt_completion"],
                            "--general", adapterkit_data["preference"])
    refused(result, "has no text rows for a general-text check")


def test_eval_names_the_rows_it_reads(adapterkit_cli, adapterkit_data, home):
    """Its --data help said "same shapes as training", and the refusal "this trainer reads"."""
    for shape in ("preference", "prompt"):
        result = adapterkit_cli("eval", "nosuch", "--data", adapterkit_data[shape])
        refused(result, f"is {shape} data", "eval reads text rows (text) or prompt_completion "
                                            "rows (prompt/completion) or messages rows")
    help_text = adapterkit_cli("eval", "--help").output
    assert "same shapes as training" not in help_text


def test_eval_refuses_what_would_do_nothing_or_fail_on_its_rows(adapterkit_cli, adapterkit_data,
                                                                library, peft_adapter,
                                                                tiny_base, tmp_path):
    """--scorer/--max-new-tokens on rows without answers were ignored; messages rows with
    --no-chat, or on a base without a chat template, ended in a transformers traceback."""
    library.import_peft(peft_adapter, "pe", base=str(tiny_base))
    for shape in ("text", "messages"):
        result = adapterkit_cli("eval", "pe", "--data", adapterkit_data[shape],
                                "--scorer", "normalized_match", "--max-new-tokens", "7")
        refused(result, "--scorer and --max-new-tokens score generated answers",
                f"{shape} rows")
    result = adapterkit_cli("eval", "pe", "--data", adapterkit_data["messages"], "--no-chat")
    refused(result, "--no-chat: messages rows are chat turns")
    plain = without_chat_template(tiny_base, tmp_path / "plain-base")
    result = adapterkit_cli("eval", "pe", "--base", str(plain), "--data",
                            adapterkit_data["messages"])
    refused(result, "has no chat template, and messages rows are chat turns", alone=False)


def test_a_stack_with_a_4bit_trained_member_loads_its_base_in_4_bits_on_every_path(
        adapterkit_cli, adapterkit_data, library, peft_adapter, tiny_base, monkeypatch):
    """``eval q`` loaded the base in 4 bits, ``eval qs`` (a saved stack of q) in float32:
    the stack's figures, and its "plain base" ones, came from another model than q's."""
    import adapterkit.base.load as load
    from adapterkit.errors import BaseNotFound
    from adapterkit.lora.combine import stack

    library.import_peft(peft_adapter, "q", base=str(tiny_base))
    library.import_peft(peft_adapter, "b", base=str(tiny_base))
    library.update_meta("q", lambda meta: setattr(meta, "method", "qlora"))
    stack(library, ["q", "b"], [1.0, 0.5], name="qs")
    asked = []

    def stop(spec, *, quantization=None, **kwargs):
        asked.append(quantization)
        raise BaseNotFound("stopped here by the test")

    monkeypatch.setattr(load, "load_base", stop)
    for args in (("eval", "qs", "--data", adapterkit_data["text"]),
                 ("generate", "hi", "--adapter", "qs"),
                 ("eval", "b", "--data", adapterkit_data["text"])):
        refused(adapterkit_cli(*args), "stopped here by the test", alone=False)
    assert asked == ["4bit", "4bit", None]


def test_search_refuses_what_the_recipe_sets_and_it_varies(train_args, adapterkit_cli,
                                                           tmp_path):
    recipe = tmp_path / "c.yaml"
    recipe.write_text("learning_rate: 5.0e-4\nbatch_size: 4\n")
    result = adapterkit_cli(*train_args, "--config", str(recipe), "--search", "lr,r")
    refused(result, "sets learning_rate, which --search lr,r varies")


def test_a_recipes_general_file_without_text_rows_is_refused_before_any_stage(
        tiny_base, adapterkit_data, adapterkit_cli, library, tmp_path):
    import yaml

    recipe = {"base": str(tiny_base), "max_steps": 1,
              "stages": [{"name": "first", "trainer": "sft",
                          "data": str(adapterkit_data["prompt_completion"])},
                         {"name": "second", "trainer": "sft",
                          "data": str(adapterkit_data["prompt_completion"]),
                          "general": str(adapterkit_data["preference"])}]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    result = adapterkit_cli("pipeline", str(path))
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "has no text rows for a general-text check" in result.output
    assert library.list(all_versions=True) == []


@pytest.mark.parametrize("setup,args,words", [
    (None, ["--reward", "nosuch"], ["nosuch"]),
    ("policy", ["--reward", "policy"], ["--reward policy@1 is a policy pocket book"]),
    ("x-reward", [], ["the rlhf run of x saves a pocket book under the name x-reward besides "
                      "its own, and the library holds x-reward already: remove it (adapterkit "
                      "rm x-reward); or pick another name"]),  # (a policy: not to reuse)
])
def test_rlhf_refuses_its_reward_book_problems_before_the_base_loads(
        setup, args, words, adapterkit_data, adapterkit_cli, library, peft_adapter, tiny_base,
        tmp_path):
    """(the run's base does not exist: a refusal after loading it would name the base)"""
    if setup:
        library.import_peft(peft_adapter, setup, base=str(tiny_base))
    result = adapterkit_cli("train", "rlhf", "--base", str(tmp_path / "no-base"), "--data",
                            adapterkit_data["preference"], "--name", "x", *args)
    refused(result, *words)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes: Python 3.11+")
def test_rlhf_whose_reward_name_holds_a_reward_book_is_told_what_to_leave_out(
        adapterkit_data, adapterkit_cli, library, tiny_base, tmp_path):
    """rlhf's own refusal said "pass --reward x-reward" alone: the same command with it was
    refused again for --set reward_steps, then for --eval-split. adapterkit refuses a name a
    run saves besides its own itself (``also_saves``), for every trainer, and the command
    line says below it every flag to leave out; followed, the reward checks pass (what is
    refused next is the missing base)."""
    from adapterkit import TrainOptions, train

    train("reward", base=str(tiny_base), data=str(adapterkit_data["preference"]),
          name="x-reward", home=library.home,
          options=TrainOptions(max_steps=1, batch_size=2, r=4, alpha=8))
    args = ["train", "rlhf", "--base", str(tmp_path / "no-base"), "--data",
            adapterkit_data["preference"], "--name", "x"]
    result = adapterkit_cli(*args, "--set", "reward_steps=2", "--eval-split", "0.25")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines()[-2:] == [
        "Error: the rlhf run of x saves a pocket book under the name x-reward besides its "
        "own, and the library holds x-reward already: to use it instead of training one, set "
        "the trainer option reward to x-reward, leave out reward_steps, eval_split; or "
        "remove it (adapterkit rm x-reward); or pick another name",
        "On the command line: add --reward x-reward and leave out --set reward_steps, "
        "--eval-split."], result.stderr
    refused(adapterkit_cli(*args, "--reward", "x-reward"), "unknown base", alone=False)  # (as said)


def test_a_run_whose_reward_name_the_library_refuses_is_told_to_take_another_name(
        adapterkit_data, adapterkit_cli, library, peft_adapter, tiny_base, tmp_path):
    """``X-reward`` held: rlhf's ``x-reward`` differs from it only in case, which the library
    refuses, saying "use that name" — of the reward book, which the user does not name. The
    refusal says why, and the name the user gives: the run's."""
    library.import_peft(peft_adapter, "X-reward", base=str(tiny_base))
    result = adapterkit_cli("train", "rlhf", "--base", str(tmp_path / "no-base"), "--data",
                            adapterkit_data["preference"], "--name", "x")
    said = refused(result)
    assert said == ("Error: the rlhf run of x saves a pocket book under the name x-reward "
                    "besides its own, which the library refuses ('x-reward' differs from the "
                    "pocket book 'X-reward' only in case, which some file systems do not tell "
                    "apart): give the run another name"), said


def test_a_run_whose_only_checkpoint_was_cut_off_is_run_again_not_resumed(train_args,
                                                                           adapterkit_cli, home):
    """A run killed while writing its first checkpoint leaves checkpoint-N without its
    trainer_state.json, which transformers would fail to read once the base had loaded. It is
    no run to resume; a plain rerun (once refused too: a third try) starts afresh."""
    partial = home / "runs" / "x" / "checkpoint-5"
    partial.mkdir(parents=True)
    (partial / "adapter_model.safetensors").write_bytes(b"")
    result = adapterkit_cli(*train_args, "--resume")
    refused(result, "there is no interrupted run of x to resume (its only checkpoint, "
                    "checkpoint-5, was cut off while it was written); start it without --resume")
    result = adapterkit_cli(*train_args, "--max-steps", "2", "--save-steps", "1000")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("flags,words,budget", [
    ([], ", guard: budget 1%, KL weight 3", 1.0),  # sft's default guard
    (["--guard-weight", "0"], ", no guard", None),  # the default guard yields to a weight of 0
    (["--forgetting-budget", "2%", "--guard-weight", "0"], ", guard: budget 2%, no KL term", 2.0),
    (["--forgetting-budget", "off", "--guard-weight", "3"], ", guard: no budget, KL weight 3",
     None),  # a KL term alone: the line crashed on the missing budget, after the save
])
def test_the_forgetting_line_says_how_the_guard_acted(flags, words, budget, train_args,
                                                      adapterkit_cli, library):
    """It read the same with sft's default guard and with none (--guard-weight 0 turns that
    guard off); the metadata had the difference, the console did not."""
    result = adapterkit_cli(*train_args, "--max-steps", "2", "--batch-size", "2", *flags)
    assert result.exit_code == 0, result.output
    line = next(x for x in result.stdout.splitlines() if x.startswith("Forgetting:"))
    assert words in line, line
    assert (library.get("x").meta.metrics.get("guard") or {}).get("budget_pct") == budget
