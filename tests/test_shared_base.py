"""One resident base shared by sessions, ``peft_model`` and ``train``: each holds its layers
until it gives them back, and the next user is refused meanwhile — never silently computing
with the other's LoRA. Every answer is checked against plain transformers + PEFT on a fresh
load of the same folders."""

import gc

import pytest
import torch

import adapterkit
from adapterkit import ConfigError
from adapterkit.plugin_api.testing import make_peft_adapter
from adapterkit.runtime.peft_model import peft_model

IDS = torch.tensor([[5, 17, 42, 99, 3, 120, 7, 64]])


@pytest.fixture
def books(library, tiny_base, tmp_path):
    specs = {"law": dict(seed=1, r=4, target_modules=["q_proj", "v_proj"]),
             "code": dict(seed=2, r=8, target_modules="all-linear")}
    paths = {}
    for name, kw in specs.items():
        paths[name] = make_peft_adapter(tiny_base, tmp_path / name, **kw)
        library.import_peft(paths[name], name, base=str(tiny_base))
    return paths


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def reference(tiny_base, folder=None, *, quantization=None):
    """A fresh load of the base folder (plain transformers), with PEFT on it if ``folder``."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {}
    if quantization:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32, **kwargs).eval()
    if folder is not None:
        model = PeftModel.from_pretrained(model, str(folder)).eval()
    return logits(model)


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_train_on_a_resident_base_holds_it_until_result_model_unload(tiny_base, books, home,
                                                                     library, data):
    """Before: after train(base=Base), base.model answered with the new pocket book, and a
    session's off() (the plain base) and swap("law") both computed with it added."""
    base = adapterkit.load_base(str(tiny_base), home=home)
    options = adapterkit.TrainOptions(max_steps=2, batch_size=2, max_length=64, general="off",
                                      forgetting_budget=0, precision="fp32")
    result = adapterkit.train("sft", base=base, data=str(data), name="colours", options=options,
                              home=home)
    new = library.get("colours").path
    close(logits(result.model), reference(tiny_base, new))  # the result still answers
    with pytest.raises(ConfigError, match=r"train\(\)'s result.model \(colours@1\).*call "
                                          r"result.model.unload\(\) before opening a session"):
        adapterkit.open(base, home=home)
    with pytest.raises(ConfigError, match=r"result.model.unload\(\) before peft_model"):
        peft_model(base, library.get("law"), library=library)
    with pytest.raises(ConfigError, match=r"result.model.unload\(\) before training on it"):
        adapterkit.train("sft", base=base, data=str(data), name="again", options=options,
                         home=home)
    result.model.unload()
    session = adapterkit.open(base, home=home)
    session.off()
    close(logits(session.model), reference(tiny_base))
    session.swap("law")
    close(logits(session.model), reference(tiny_base, books["law"]))
    session.close()


@pytest.mark.parametrize("stop", [KeyboardInterrupt, RuntimeError])
def test_a_run_that_stops_mid_step_gives_the_base_back_in_eval_mode(tmp_path, home, data, stop):
    """A run interrupted (Ctrl-C in a notebook) or failing in a step left the caller's base in
    the trainer's train mode: on a base with dropout every later answer was random. The base
    answers as a fresh load does again (eval mode, plain layers)."""
    from transformers import TrainerCallback

    from adapterkit.plugin_api.testing import make_tiny_base

    folder = make_tiny_base(tmp_path / "dropout-base", seed=3, attention_dropout=0.3)
    base = adapterkit.load_base(str(folder), home=home)

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **_):
            raise stop("stopped")

    options = adapterkit.TrainOptions(max_steps=3, batch_size=2, max_length=64, general="off",
                                      forgetting_budget=0, precision="fp32")
    with pytest.raises(stop):
        adapterkit.train("sft", base=base, data=str(data), name="stopped", options=options,
                         home=home, callbacks=[Stop()])
    assert not base.model.training
    torch.testing.assert_close(logits(base.model), reference(folder), rtol=0, atol=0)


def test_peft_model_holds_the_base_until_unload(tiny_base, books, home, library):
    """Before: a second peft_model on the same base stacked both LoRAs (only a PEFT warning),
    and a session opened after it answered off() with the first pocket book."""
    base = adapterkit.load_base(str(tiny_base), home=home)
    first = peft_model(base, library.get("law"), library=library)
    close(logits(first), reference(tiny_base, books["law"]))
    with pytest.raises(ConfigError, match=r"peft_model\(\) returned for law@1 \(adapter "
                                          r"default\); call that model's .unload\(\) before "
                                          r"peft_model\(base, code@1\)"):
        peft_model(base, library.get("code"), library=library)
    with pytest.raises(ConfigError, match="before opening a session"):
        adapterkit.open(base, home=home)
    first.unload()
    second = peft_model(base, library.get("code"), library=library)
    close(logits(second), reference(tiny_base, books["code"]))
    second.unload()
    close(logits(base.model), reference(tiny_base))


def test_one_session_per_base_and_a_closed_session_refuses_use(tiny_base, books, home):
    """Before: a second session shared the first one's slots (s1 answered with s2's pocket
    book while s1.active named its own), and closing one turned the other into the plain
    base."""
    base = adapterkit.load_base(str(tiny_base), home=home)
    s1 = adapterkit.open(base, home=home)
    s1.swap("law")
    with pytest.raises(ConfigError, match=r"a session is open on this base \(attached: law@1; "
                                          r"active: law@1\); close it"):
        adapterkit.open(base, home=home)
    with pytest.raises(ConfigError, match="a session is open on this base"):
        peft_model(base, adapterkit.Library(home).get("code"))
    close(logits(s1.model), reference(tiny_base, books["law"]))
    s1.close()
    s1.close()  # idempotent
    with pytest.raises(ConfigError, match=r"this session is closed; open a new one"):
        s1.swap("law")
    with pytest.raises(ConfigError, match=r"this session is closed"):
        s1.generate("hi", max_new_tokens=2)
    s2 = adapterkit.open(base, home=home)
    s2.swap("code")
    close(logits(s2.model), reference(tiny_base, books["code"]))
    s2.off()
    close(logits(s2.model), reference(tiny_base))
    s2.close()


def test_a_session_dropped_without_close_gives_the_base_back(tiny_base, books, home):
    """Before: its slots stayed on the base with its pocket book bound, and the next
    session's off() answered with it."""
    base = adapterkit.load_base(str(tiny_base), home=home)
    dropped = adapterkit.open(base, home=home)
    dropped.swap("law")
    del dropped
    gc.collect()
    session = adapterkit.open(base, home=home)
    session.off()
    close(logits(session.model), reference(tiny_base))
    session.close()


def test_a_4bit_base_is_not_moved_by_peft_model_after_a_forward(tiny_base, books, home,
                                                                library):
    """On a CPU with AVX512-BF16, bitsandbytes re-lays a 4-bit weight out at its first
    forward, and the state dict PEFT takes when wrapping undid that in place, quantizing the
    scales again: the base moved (adapter off ≠ its own first answer, adapter on ≠ plain PEFT
    on a fresh 4-bit load). Elsewhere no re-layout happens and this holds trivially."""
    pytest.importorskip("bitsandbytes")
    base = adapterkit.load_base(str(tiny_base), home=home, quantization="4bit")
    first = logits(base.model)
    model = peft_model(base, library.get("code"), library=library)
    with model.disable_adapter():
        assert torch.equal(logits(model), first)
    close(logits(model), reference(tiny_base, books["code"], quantization="4bit"))


def test_training_on_a_4bit_base_relaid_out_for_inference_is_refused(tiny_base, home,
                                                                      adapterkit_data):
    """After a forward on such a CPU its scales are rounded to bf16: a run trained on another
    base than a fresh load, which its pocket book records (and every later load gives)."""
    pytest.importorskip("bitsandbytes")
    from adapterkit.base.load import relaid_for_inference

    base = adapterkit.load_base(str(tiny_base), home=home, quantization="4bit")
    assert not relaid_for_inference(base.model)
    logits(base.model)
    if not relaid_for_inference(base.model):
        pytest.skip("this CPU keeps bitsandbytes' 4-bit layout (no AVX512-BF16)")
    with pytest.raises(ConfigError, match="this 4-bit base has answered on a CPU.*load it "
                                          "again"):
        adapterkit.train("sft", base=base, data=str(adapterkit_data["prompt_completion"]),
                         name="x", home=home, options=adapterkit.TrainOptions(max_steps=1))
    assert adapterkit.Library(home).list() == []


@pytest.mark.parametrize("call,match", [
    (lambda s, b, h: adapterkit.load_base(str(b), home=h, quantization="3bit"),
     r"unknown quantization '3bit'; use one of 4bit, 8bit"),
    (lambda s, b, h: adapterkit.open(str(b), home=h, quantization="4-bit"),
     r"unknown quantization '4-bit'"),
    (lambda s, b, h: adapterkit.open(s.base, home=h, quantization="4bit"),
     r"already loaded in full precision, not 4bit"),
    (lambda s, b, h: adapterkit.load_base(str(b), home=h, device="tpu"),
     r"device 'tpu' is not a torch device"),
    (lambda s, b, h: s.swap(3), r"named by a string .* not 3"),
    (lambda s, b, h: s.generate("x", adapter=5, max_new_tokens=2),
     r"adapter must be a pocket book's name.*not 5"),
    (lambda s, b, h: s.stack(["law"]), r"stack takes a mapping .* not a list"),
    (lambda s, b, h: s.stack({}), r"stack needs at least one pocket book; call off\(\)"),
    (lambda s, b, h: s.generate(5), r"generate takes a prompt .* not 5"),
    (lambda s, b, h: s.generate("hi", max_new_tokens=0), r"max_new_tokens must be .* not 0"),
    (lambda s, b, h: s.generate("hi", temperature=-1), r"temperature must be .* not -1"),
    (lambda s, b, h: peft_model(str(b), adapterkit.Library(h).get("law")),
     r"peft_model takes a loaded base, .*adapterkit.load_base"),
    (lambda s, b, h: adapterkit.train("sft", base=str(b), data="x.jsonl", name="x", home=h,
                                      options={"r": 8}),
     r"options must be adapterkit.TrainOptions\(...\), not a dict"),
])
def test_arguments_of_the_wrong_kind_are_one_line_errors(tiny_base, books, home, call, match):
    """Before: bare ValueErrors, torch RuntimeErrors, AttributeErrors deep inside, or (the
    quantization given with a loaded base, an empty stack) silently ignored."""
    session = adapterkit.open(str(tiny_base), home=home)
    session.swap("law")
    with pytest.raises(ConfigError, match=match) as info:
        call(session, tiny_base, home)
    assert "\n" not in str(info.value)
    assert session.active == {"law@1": 1.0}  # a refused call changes nothing


def test_a_serving_engine_holds_the_base_until_close(tiny_base, books, home, library, data):
    """Before: the engine put its row layers into the base without holding it — a session, a
    peft_model or a run on the base it served computed through them (and the engine through
    theirs), and an engine was built on a base a session held."""
    from adapterkit.serving.engine import Engine

    base = adapterkit.load_base(str(tiny_base), home=home)
    engine = Engine(base, library)
    engine.preload(["law"])
    with pytest.raises(ConfigError, match=r"^a serving engine holds this base \(attached: "
                                          r"law@1; rows decoding: 0\); close it \(engine.close"
                                          r"\(\)\) before opening a session on it, or load the "
                                          r"base again$"):
        adapterkit.open(base, home=home)
    with pytest.raises(ConfigError, match=r"engine.close\(\)\) before peft_model\(base, code@1"):
        peft_model(base, library.get("code"), library=library)
    with pytest.raises(ConfigError, match=r"engine.close\(\)\) before training on it"):
        adapterkit.train("sft", base=base, data=str(data), name="x", home=home,
                         options=adapterkit.TrainOptions(max_steps=1))
    with pytest.raises(ConfigError, match=r"engine.close\(\)\) before serving it"):
        Engine(base, library)
    engine.close()
    with pytest.raises(ConfigError, match="this engine is closed; build a new Engine"):
        engine.start()  # it gave the base back
    close(logits(base.model), reference(tiny_base))
    session = adapterkit.open(base, home=home)
    with pytest.raises(ConfigError, match=r"^a session is open on this base \(attached: none; "
                                          r"active: none\); close it \(session.close\(\)\) "
                                          r"before serving it, or load the base again$"):
        Engine(base, library)
    session.close()
    model = peft_model(base, library.get("law"), library=library)
    with pytest.raises(ConfigError, match=r"call that model's .unload\(\) before serving it"):
        Engine(base, library)
    model.unload()
    Engine(base, library).close()


def test_an_engine_dropped_without_close_gives_the_base_back(tiny_base, books, home, library):
    """Before: its row layers stayed in the base, and a session opened on it wrapped its
    slots around them."""
    from adapterkit.serving.engine import Engine
    from adapterkit.serving.rows import RowLora

    base = adapterkit.load_base(str(tiny_base), home=home)
    dropped = Engine(base, library)
    dropped.preload(["law", "code"])
    del dropped
    gc.collect()
    session = adapterkit.open(base, home=home)
    assert not [m for m in base.model.modules() if isinstance(m, RowLora)]
    session.off()
    close(logits(session.model), reference(tiny_base))
    session.swap("code")
    close(logits(session.model), reference(tiny_base, books["code"]))
    session.close()
