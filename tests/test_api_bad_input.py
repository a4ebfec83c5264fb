"""Bad input to the Python API ends in one ``AdapterkitError`` line, never a traceback from
deep inside adapterkit, and a value of the wrong type is never accepted silently: training
options typed as no parser typed them, references and filters that are not strings, a home
that is a file, a library that is not a :class:`Library`, and weights that are bools."""

from __future__ import annotations

import math

import pytest

import adapterkit
from adapterkit import AdapterkitError, ConfigError, InvalidName, Library, TrainOptions
from adapterkit.lora.combine import concatenate, merge, stack
from adapterkit.training.options import build_options, build_trainer_options, check_options


def one_line(info: pytest.ExceptionInfo[BaseException], kind: type[AdapterkitError],
             *words: str) -> str:
    """The refusal's message, checked: of ``kind``, on one line, naming each of ``words``."""
    assert isinstance(info.value, kind), repr(info.value)
    message = str(info.value)
    assert "\n" not in message and message.strip(), message
    for word in words:
        assert word in message, message
    return message


@pytest.fixture
def books(library, tiny_base, peft_adapter):
    """A library holding two single pocket books, ``a`` and ``b``, of the tiny base."""
    for name in ("a", "b"):
        library.import_peft(peft_adapter, name, base=str(tiny_base))
    return library


# -- training options built in Python ------------------------------------------------------

@pytest.mark.parametrize("given,words", [
    ({"r": "8"}, ["r: expected an integer, got '8'"]),
    ({"r": True}, ["r: expected an integer, got True"]),  # a bool is not an integer here
    ({"max_steps": 2.5}, ["max_steps: expected an integer, got 2.5"]),
    ({"learning_rate": "1e-3"}, ["learning_rate: expected a number, got '1e-3'"]),
    ({"dropout": False}, ["dropout: expected a number, got False"]),
    ({"packing": "yes"}, ["packing: expected true or false, got 'yes'"]),
    ({"chat": 1}, ["chat: expected true or false, got 1"]),
    ({"target_modules": [3]}, ["target_modules: expected a string, got [3]"]),
    ({"general": False}, ["general: expected a string"]),
    ({"precision": "fp16"}, ["precision: expected one of auto, bf16, fp32, got 'fp16'"]),
    ({"report_to": [3]}, ["report_to: expected a list"]),
    ({"trainer_options": [("beta", 0.1)]}, ["trainer_options: expected a mapping"]),
    # every problem at once: a wrong type beside a value out of range
    ({"r": "8", "alpha": 0}, ["r: expected an integer, got '8'", "alpha: must be positive"]),
])
def test_options_of_the_wrong_type_are_refused_naming_the_field_and_type(given, words):
    with pytest.raises(AdapterkitError) as info:
        check_options(TrainOptions(**given))
    one_line(info, ConfigError, "invalid training options", *words)


@pytest.mark.parametrize("given", [
    {"epochs": 2, "dropout": 0, "forgetting_budget": 1, "guard_weight": 0},  # int for float
    {"learning_rate": 1e-3, "epochs": 1.5, "chat": None, "general": None},
    {"report_to": []}, {"report_to": None}, {"trainer_options": None},  # read as empty
    {"target_modules": ["q_proj", "v_proj"]},  # a list, as PEFT's LoraConfig takes them
])
def test_options_of_the_types_the_cli_gives_are_accepted(given):
    check_options(TrainOptions(**given))


def test_train_refuses_a_string_rank_before_any_work(tiny_base, adapterkit_data, home):
    with pytest.raises(AdapterkitError) as info:
        adapterkit.train("sft", base=str(tiny_base), data=str(adapterkit_data["prompt_completion"]),
                         name="x", options=TrainOptions(r="8"), home=home)
    one_line(info, ConfigError, "r: expected an integer, got '8'")
    assert Library(home).list(all_versions=True) == []


@pytest.mark.parametrize("call,words", [
    (lambda: check_options({"r": 8}), ["options must be adapterkit.TrainOptions(...), not a dict", "TrainOptions(r=8, ...)"]),
    (lambda: build_options(5), ["recipe must be the path of a YAML file, got 5"]),
    (lambda: build_options(None, [("r", 8)]), ["overrides must be a dict"]),
    (lambda: build_trainer_options(adapterkit.default_plugin_manager().trainers.get("dpo"),
                                   TrainOptions(trainer_options=["beta"])),
     ["trainer_options: expected a mapping"]),
])
def test_option_builders_refuse_what_is_not_options(call, words):
    with pytest.raises(AdapterkitError) as info:
        call()
    one_line(info, ConfigError, *words)


# -- the library ---------------------------------------------------------------------------

@pytest.mark.parametrize("ref", [5, None, 1.5, b"a"])
@pytest.mark.parametrize("verb", ["get", "exists", "remove"])
def test_a_reference_that_is_not_a_string_is_refused(books, verb, ref):
    with pytest.raises(AdapterkitError) as info:
        getattr(books, verb)(ref)
    one_line(info, InvalidName, "must be a string", repr(ref))
    assert books.exists("a") and books.exists("b")


def test_parse_ref_refuses_what_str_would_turn_into_a_name():
    with pytest.raises(AdapterkitError) as info:
        adapterkit.parse_ref(5)  # str(5) is the valid name "5"
    one_line(info, InvalidName, "must be a string", "got 5")
    with pytest.raises(AdapterkitError) as info:
        adapterkit.validate_name(None)
    one_line(info, InvalidName, "must be a string", "got None")


@pytest.mark.parametrize("label", ["tag", "base"])
def test_a_list_filter_that_is_not_a_string_is_refused(books, label):
    with pytest.raises(AdapterkitError) as info:
        books.list(**{label: 3})
    one_line(info, ConfigError, f"the {label} filter must be a string, got 3")


def test_a_tag_that_is_not_a_string_says_so(books):
    with pytest.raises(AdapterkitError) as info:
        books.tag("a", 7)
    assert one_line(info, InvalidName) == "a tag must be a string, got 7"
    assert books.get("a").meta.tags == []


def test_a_home_that_is_no_folder_is_refused(tmp_path):
    with pytest.raises(AdapterkitError) as info:
        Library(home=5)  # type: ignore[arg-type]
    one_line(info, ConfigError, "home must be the path of a folder", "got 5")
    afile = tmp_path / "notes.txt"
    afile.write_text("not a home", encoding="utf-8")
    with pytest.raises(AdapterkitError) as info:
        Library(home=afile).list()
    one_line(info, ConfigError, f"the adapterkit home {afile} is a file")
    with pytest.raises(AdapterkitError) as info:
        Library(home=afile / "below").list()
    one_line(info, ConfigError, f"lies under {afile}, which is a file")
    assert afile.read_text(encoding="utf-8") == "not a home"


def test_paths_that_are_not_paths_are_refused(books, tiny_base, peft_adapter):
    with pytest.raises(AdapterkitError) as info:
        books.export("a", 5)
    one_line(info, ConfigError, "dest must be a path", "got 5")
    with pytest.raises(AdapterkitError) as info:
        books.import_peft(5, "c")
    one_line(info, ConfigError, "folder must be a path", "got 5")
    with pytest.raises(AdapterkitError) as info:
        books.import_peft(peft_adapter, "c", base=3)
    one_line(info, ConfigError, "base must be", "got 3")
    assert not books.exists("c")


# -- merge and stack -----------------------------------------------------------------------

@pytest.mark.parametrize("call,words", [
    (lambda lib: stack(lib, [], None, name="x"), ["stack needs at least one pocket book"]),
    (lambda lib: stack(lib, "a", None, name="x"), ["list of pocket-book references (['a'])"]),
    (lambda lib: merge(lib, "ab", None, method="cat", name="x"),
     ["list of pocket-book references (['ab'])"]),
    (lambda lib: merge("lib", ["a", "b"], None, method="cat", name="x"),
     ["merge takes the library first", "got 'lib'"]),
    (lambda lib: stack(str(lib.home), ["a", "b"], None, name="x"),
     ["stack takes the library first"]),
    (lambda lib: merge(lib, ["a", "b"], None, method="svd", rank="4", name="x"),
     ["rank must be an integer, got '4'"]),
    (lambda lib: merge(lib, ["a", "b"], None, method="svd", rank=True, name="x"),
     ["rank must be an integer, got True"]),
    (lambda lib: merge(lib, ["a", "b"], None, method="ties", density="0.5", name="x"),
     ["density must be a number in (0, 1], got '0.5'"]),
    (lambda lib: stack(lib, ["a", "b"], 0.5, name="x"), ["weights must be a list", "got 0.5"]),
    (lambda lib: stack(lib, ["a", "b"], [], name="x"), ["2 pocket books but 0 weights"]),
    (lambda lib: merge(lib, ["a", "b"], [], method="cat", name="x"),
     ["2 pocket books but 0 weights"]),
], ids=["stack-empty", "stack-str-refs", "merge-str-refs", "merge-str-library",
        "stack-str-library", "rank-str", "rank-bool", "density-str", "weights-float",
        "stack-no-weights", "merge-no-weights"])
def test_bad_combine_arguments_are_refused_in_one_line(books, call, words):
    with pytest.raises(AdapterkitError) as info:
        call(books)
    one_line(info, ConfigError, *words)
    assert not books.exists("x")


@pytest.mark.parametrize("weights,bad", [([True, 1], "True"), ([1, False], "False"),
                                         ([1.0, math.nan], "nan"), (["1", 1], "'1'")],
                         ids=["true", "false", "nan", "str"])
def test_every_combining_path_refuses_the_same_weights(books, weights, bad):
    """A saved stack, a flattened one, a merge and :func:`concatenate` (what plugins call)
    share one rule: a bool is no weight (``True`` would silently mean 1)."""
    for call in (lambda: stack(books, ["a", "b"], weights, name="x"),
                 lambda: stack(books, ["a", "b"], weights, name="x", flatten=True),
                 lambda: merge(books, ["a", "b"], weights, method="cat", name="x"),
                 lambda: concatenate([None, None], weights)):  # type: ignore[list-item]
        with pytest.raises(AdapterkitError) as info:
            call()
        one_line(info, ConfigError, bad)
    assert not books.exists("x")


# -- peft_model's weights ------------------------------------------------------------------

@pytest.fixture
def on_top(top_on_under):
    """``top`` trained on top of ``under``, and a saved stack ``both`` of them."""
    stack(top_on_under, ["under", "top"], [1.0, 0.5], name="both")
    return top_on_under


@pytest.fixture
def resident(tiny_base, home):
    return adapterkit.load_base(str(tiny_base), home=home)


@pytest.mark.parametrize("weights,words", [
    # a book trained on another, weighed without it: it answered without its underlay
    (lambda b: [(b["top"], 0.5)], ["weights leaves out under@1, which top@1 was trained on",
                                   "adapterkit.members_of(library, 'top@1') gives the whole list"]),
    # the book asked for is not in the list: another book answered under its name
    (lambda b: [(b["under"], 1.0)], ["weights leaves out top@1, the pocket book asked for"]),
    (lambda b: [(b["under"], 1.0), (b["top"], math.nan)],
     ["the weight of top@1 must be a finite number, not nan"]),
    (lambda b: [(b["under"], 1.0), (b["top"], "0.5")],
     ["the weight of top@1 must be a finite number, not '0.5'"]),
    (lambda b: [(b["under"], 1.0), (b["top"], True)], ["not True"]),
    (lambda b: [(b["both"], 1.0), (b["under"], 1.0), (b["top"], 1.0)],
     ["both@1 is a saved stack; list its members"]),
    (lambda b: [(b["under"], 1.0), (b["under"], 1.0), (b["top"], 1.0)],
     ["weights names under@1 more than once"]),
    (lambda b: [], ["weights must be a non-empty list"]),
    (lambda b: [b["top"]], ["weights takes (pocket book, weight) pairs"]),
])
def test_peft_model_refuses_weights_it_would_answer_wrongly_with(on_top, resident, weights,
                                                                 words):
    """``peft_model(base, book, weights=...)`` loaded the list as given: without ``book``'s
    underlay (5.8 off in the logits), another book under ``book``'s name, a NaN weight (NaN
    logits); a string weight or a saved stack failed deep inside. Each is refused now, and
    the base is left unwrapped."""
    from adapterkit.runtime.peft_model import peft_model

    books = {name: on_top.get(name) for name in ("under", "top", "both")}
    with pytest.raises(AdapterkitError) as info:
        peft_model(resident, books["top"], library=on_top, weights=weights(books))
    one_line(info, ConfigError, *words)
    model = peft_model(resident, books["top"], library=on_top)  # the base is free
    model.unload()


def test_peft_model_weights_as_members_of_gives_them_equals_plain_peft(on_top, resident,
                                                                       tiny_base):
    """The whole list, as ``members_of`` gives it, with a weight changed: plain PEFT of the
    same two folders, the top one's scale halved by hand."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from adapterkit.runtime.peft_model import peft_model

    under, top = on_top.get("under"), on_top.get("top")
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    model = peft_model(resident, top, library=on_top, weights=[(under, 1.0), (top, 0.5)])
    with torch.no_grad():
        got = model(input_ids=ids).logits
    model.unload()
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base),
                                      str(under.path), adapter_name="u")
    plain.load_adapter(str(top.path), adapter_name="t")
    plain.base_model.set_adapter(["u", "t"], inference_mode=True)
    for module in plain.modules():
        if isinstance(getattr(module, "scaling", None), dict) and "t" in module.scaling:
            module.scaling["t"] *= 0.5
    with torch.no_grad():
        want = plain.eval()(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
