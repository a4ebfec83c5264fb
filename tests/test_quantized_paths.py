"""A pocket book answers on the base it was trained on, on every path: a qlora one (trained on
a 4-bit base) in 4 bits in `swap`, `chat`, `serve` and `adapterkit.open()` as in `generate`
and `eval` — or it is refused, saying which base it needs. It once answered on the
full-precision base in a session and on the server, differently, without a word."""

from __future__ import annotations

import json
import re

import httpx
import pytest
from click.testing import CliRunner

import adapterkit
from adapterkit.base.load import load_base
from adapterkit.cli import build_cli
from adapterkit.errors import ConfigError, InexactAdapter
from adapterkit.plugin_api.manager import get_plugin_manager
from adapterkit.plugin_api.testing import make_peft_adapter

pytest.importorskip("bitsandbytes")

PROMPT = "The patient reports chest pain."


@pytest.fixture
def books(library, tiny_base, tmp_path):
    """``q4``, as if trained with --method qlora (on the 4-bit base), and ``law``, trained on
    the full-precision one."""
    for name, seed in (("q4", 3), ("law", 1)):
        library.import_peft(make_peft_adapter(tiny_base, tmp_path / name, seed=seed,
                                              target_modules="all-linear"),
                            name, base=str(tiny_base))
    library.update_meta("q4", lambda meta: setattr(meta, "method", "qlora"))
    return library


@pytest.fixture
def cli(home):
    return build_cli(get_plugin_manager(env=False))


def run(cli, *args, code=0, input=None, stdout=False):
    out = CliRunner().invoke(cli, [str(a) for a in args], input=input)
    assert out.exit_code == code, out.output
    return out.stdout if stdout else out.output


def test_swap_answers_a_qlora_book_as_generate_does(cli, books, tiny_base):
    said = run(cli, "generate", "--adapter", "q4", PROMPT, "--max-new-tokens", 12, stdout=True)
    out = run(cli, "swap", "q4", "--prompt", PROMPT, "--max-new-tokens", 12, "--json")
    assert f"Loading base {tiny_base} in 4bit, as q4 was trained..." in out
    answer = json.loads(out[out.index("{"):])["pocket_books"][0]["answer"]
    assert answer == said.removesuffix("\n")


def test_generate_and_its_plain_base_load_as_the_pocket_book_was_trained(cli, books,
                                                                          tiny_base):
    """``generate --adapter q4 --no-adapter`` (the base q4 was made on, for comparison) loaded
    the full-precision one; neither loading line said the precision."""
    from adapterkit import load_base
    from adapterkit.training.metrics import generate

    out = run(cli, "generate", "--adapter", "q4", "--no-adapter", PROMPT, "--max-new-tokens", 12)
    assert f"Loading base {tiny_base} in 4bit, as q4@1 was trained..." in out
    plain = load_base(str(tiny_base), quantization="4bit")
    expected = generate(plain.model, plain.tokenizer, [PROMPT], chat=True, max_new_tokens=12)[0]
    assert out.rstrip("\n").endswith(expected)
    out = run(cli, "generate", "--adapter", "law", PROMPT, "--max-new-tokens", 2)
    assert f"Loading base {tiny_base} in float32..." in out


def test_chat_loads_the_base_as_its_pocket_book_was_trained(cli, books, tiny_base):
    out = run(cli, "chat", "--adapter", "q4", "--max-new-tokens", 3,
              input="/swap law\n/stack q4=1 law=0.5\n/quit\n")
    assert f"Loading base {tiny_base} in 4bit, as q4 was trained..." in out
    assert "Error: law@1 was trained on a full-precision base and this session holds a 4bit " \
           "one" in out
    assert "stacked {'q4@1': 1.0, 'law@1': 0.5}" in out  # on the 4-bit base, as eval has it
    out = run(cli, "chat", "--adapter", "law", "--max-new-tokens", 3, input="/swap q4\n/quit\n")
    assert f"Loading base {tiny_base} in float32..." in out
    assert "Error: q4@1 was trained on a 4bit base and this session holds a full-precision " \
           "one" in out


def test_pocket_books_needing_different_bases_are_refused_together(cli, books):
    out = run(cli, "swap", "q4", "law", "--prompt", PROMPT, code=1)
    assert "q4 needs a 4bit base and law a full-precision one (as each was trained)" in out
    assert "Loading base" not in out  # refused before minutes of loading
    # an inline stack answers on one base, its 4-bit member's, as `eval q4+law` does
    out = run(cli, "swap", "q4+law", "--prompt", PROMPT, "--max-new-tokens", 2)
    assert "in 4bit, as q4+law was trained" in out


def test_open_loads_the_base_as_attach_was_trained(books, tiny_base, home):
    session = adapterkit.open(str(tiny_base), attach=["q4"])
    try:
        assert session.base.quantization == "4bit"
        with pytest.raises(InexactAdapter, match="law@1 was trained on a full-precision base"):
            session.swap("law")
        session.stack({"q4": 1.0, "law": 0.5})  # the rule of eval: a 4-bit member, 4 bits
    finally:
        session.close()
    with pytest.raises(ConfigError, match="q4 needs a 4bit base and law a full-precision one"):
        adapterkit.open(str(tiny_base), attach=["q4", "law"])


def test_a_loaded_base_refuses_a_pocket_book_trained_on_another(books, tiny_base, home):
    """The advice once read ``adapterkit.open(base, attach=['q4@1'])``: the caller's ``base``
    is the full-precision one this session still holds, so following it was refused again."""
    session = adapterkit.open(load_base(str(tiny_base), home=home))
    try:
        with pytest.raises(InexactAdapter, match=(
                r"q4@1 was trained on a 4bit base and this session holds a full-precision one"
                r".*; close this session and open one that loads the base as q4@1 was trained: "
                rf"adapterkit.open\({re.escape(repr(str(tiny_base.resolve())))}, "
                r"attach=\['q4@1'\]\)")):
            session.swap("q4")
        assert not session.books  # refused before its file was read
        with pytest.raises(InexactAdapter, match="trained on a 4bit base"):
            session.generate(PROMPT, adapter={"law": 1.0, "q4": 1.0})
    finally:
        session.close()
    # asked for in so many words: on this base, as plain PEFT on it answers
    session = adapterkit.open(load_base(str(tiny_base), home=home), any_quantization=True)
    try:
        session.swap("q4")
        assert session.active == {"q4@1": 1.0}
    finally:
        session.close()


def wrapped(session) -> list[str]:
    """The module paths of the base's layers wrapped in session slots."""
    from adapterkit.lora.slots import LoraSlot

    return sorted(name for name, module in session.model.named_modules()
                  if isinstance(module, LoraSlot))


def state(session) -> tuple:
    return list(session.books), session.rank, wrapped(session), dict(session.active)


def test_a_refused_swap_or_stack_on_a_4bit_base_changes_nothing(books, tiny_base, tmp_path):
    """Before: a plain LoRA was attached to the 4-bit session first and refused after — left
    attached, the layers it targets wrapped and the session's rank raised (4 → 8)."""
    books.import_peft(make_peft_adapter(tiny_base, tmp_path / "wide", seed=4, r=8,
                                        target_modules="all-linear"), "wide", base=str(tiny_base))
    books.import_peft(make_peft_adapter(tiny_base, tmp_path / "q4v", seed=5), "q4v",
                      base=str(tiny_base))  # q_proj and v_proj, rank 4
    books.update_meta("q4v", lambda meta: setattr(meta, "method", "qlora"))
    session = adapterkit.open(str(tiny_base), attach=["q4v"])
    try:
        session.swap("q4v")
        before = state(session)
        assert before[1] == 4 and len(before[2]) == 4
        with pytest.raises(InexactAdapter, match=r"wide@1 was trained on a full-precision base "
                                                 r"and this session holds a 4bit one.*"
                                                 r"attach=\['wide@1'\]"):
            session.swap("wide")
        assert state(session) == before
        with pytest.raises(InexactAdapter, match=r"wide@1, law@1 were trained on a "
                                                 r"full-precision base"):
            session.stack({"wide": 1.0, "law": 0.5})
        assert state(session) == before
        # a plain one attaches: stacked with a qlora one it answers on 4 bits, as eval has it
        session.attach("wide")
        session.stack({"q4v": 1.0, "wide": 0.5})
        assert session.active == {"q4v@1": 1.0, "wide@1": 0.5}
    finally:
        session.close()


def test_a_refused_stack_on_a_full_precision_base_changes_nothing(books, tiny_base, home):
    """Before: ``law`` was attached, then ``q4`` refused; and a plain pocket book trained
    ``--on`` q4 was attached, then its stack refused."""
    session = adapterkit.open(load_base(str(tiny_base), home=home))
    try:
        with pytest.raises(InexactAdapter, match="q4@1 was trained on a 4bit base"):
            session.stack({"law": 1.0, "q4": 1.0})
        assert state(session) == ([], 0, [], {})
        books.update_meta("law", lambda meta: setattr(meta, "stacked_on", ["q4@1"]))
        for call in (session.swap, session.attach):  # law on q4: never exact on this base
            with pytest.raises(InexactAdapter, match="q4@1 was trained on a 4bit base"):
                call("law")
            assert state(session) == ([], 0, [], {})
    finally:
        session.close()


def test_serve_answers_only_what_its_base_was_trained_for(books, tiny_base, home):
    from adapterkit.serving.app import create_app
    from adapterkit.serving.engine import Engine
    from adapterkit.serving.listen import running

    def ask(url: str, model: str) -> httpx.Response:
        return httpx.post(f"{url}/v1/completions", timeout=60, json={
            "model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0})

    reference = adapterkit.open(str(tiny_base), attach=["q4"])
    try:
        expected = reference.generate(PROMPT, adapter="q4", max_new_tokens=8, chat=False)
    finally:
        reference.close()
    for quantization, good, bad, needs in ((None, "law", "q4", "4bit"),
                                           ("4bit", "q4", "law", "full-precision")):
        engine = Engine(load_base(str(tiny_base), home=home, quantization=quantization), books)
        engine.start()
        try:
            with running(create_app(engine)) as url:
                assert ask(url, good).status_code == 200
                if good == "q4":
                    assert ask(url, "q4").json()["choices"][0]["text"].strip() == expected
                refused = ask(url, bad)
                assert refused.status_code == 400
                error = refused.json()["error"]
                assert error["code"] == "model_not_servable" and error["param"] == "model"
                assert f"{bad}@1 was trained on a {needs} base and this server" in error["message"]
                assert f"--preload {bad}" in error["message"]
                assert bad in [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]
                one = httpx.get(f"{url}/v1/models/{bad}")  # (it said code "InexactAdapter")
                assert one.status_code == 400
                assert one.json()["error"]["code"] == "model_not_servable"
        finally:
            engine.close()


def test_serve_refuses_preloads_that_need_different_bases(cli, books, tiny_base):
    out = run(cli, "serve", "--base", tiny_base, "--port", 0, "--preload", "q4,law",
              "--max-attached", 1, code=1)
    assert "q4 needs a 4bit base and law a full-precision one" in out


@pytest.mark.parametrize("preload,given,says", [
    ("law", "8bit", "--preload law answers as trained on a full-precision base, and "
                    "--quantization 8bit loads an 8bit one: drop --quantization"),
    ("q4", "8bit", "--preload q4 answers as trained on a 4bit base, and --quantization 8bit "
                   "loads an 8bit one"),
])
def test_serve_refuses_a_quantization_its_preloads_were_not_trained_on_before_loading(
        cli, books, tiny_base, preload, given, says):
    """It loaded the base, then advised "serve it from a server started with --preload law",
    which the user had done; the fix is to drop --quantization."""
    out = run(cli, "serve", "--base", tiny_base, "--port", 0, "--preload", preload,
              "--quantization", given, code=1)
    assert says in out and "Loading base" not in out
    assert "a 8bit" not in out


def test_a_flattened_stack_or_merge_of_a_qlora_book_answers_on_the_4bit_base(cli, books,
                                                                             tiny_base):
    """``stack --flatten`` and ``merge`` recorded method ``lora`` whatever their members: the
    flattened copy of a stack with a qlora member then answered on the full-precision base,
    unlike the saved stack itself (4.3 apart in the logits), without a word."""
    run(cli, "stack", "q4", "law", "--weights", "1,0.5", "--name", "kept")
    run(cli, "stack", "q4", "law", "--weights", "1,0.5", "--flatten", "--name", "flat")
    run(cli, "merge", "q4", "law", "--method", "linear", "--name", "merged")
    run(cli, "merge", "law", "law", "--method", "linear", "--name", "plain")
    assert {n: books.get(n).meta.method for n in ("flat", "merged", "plain")} == {
        "flat": "qlora", "merged": "qlora", "plain": "lora"}
    # the saved stack is expanded into its members, in plain PEFT, on the base they need
    said = run(cli, "generate", "--adapter", "kept", PROMPT, "--max-new-tokens", 12)
    flat = run(cli, "generate", "--adapter", "flat", PROMPT, "--max-new-tokens", 12)
    assert f"Loading base {tiny_base} in 4bit" in flat
    assert flat.splitlines()[-1] == said.splitlines()[-1]
    assert f"Loading base {tiny_base} in float32" in run(
        cli, "generate", "--adapter", "plain", PROMPT, "--max-new-tokens", 2)


def test_a_qlora_books_card_loads_the_base_in_4bit_and_answers_as_adapterkit(books, tiny_base,
                                                                             tmp_path, home,
                                                                             data):
    """The card of a qlora book told plain-PEFT users to load the base in full precision
    (25.9 apart in the logits on the embedded base). Its snippet, run as written, gives the
    logits adapterkit gives on the 4-bit base."""
    import torch

    options = adapterkit.TrainOptions(method="qlora", max_steps=2, batch_size=2, max_length=64,
                                      learning_rate=1e-2, general="off", forgetting_budget=0,
                                      precision="fp32")
    adapterkit.train("sft", base=str(tiny_base), data=str(data), name="real4", home=home,
                     options=options, plugins=get_plugin_manager(env=False)).model.unload()
    folder = books.export("real4", tmp_path / "out-real4")
    card = (folder / "README.md").read_text()
    code = card.split("## Use it", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert "BitsAndBytesConfig(" in code and 'bnb_4bit_quant_type="nf4"' in code
    code = code.replace("path/to/your/copy/of/the/base", str(tiny_base)).replace(
        "path/or/repo/of/this/adapter", str(folder))
    scope: dict = {}
    exec(compile(code, "the card of real4", "exec"), scope)
    ids = torch.tensor([[5, 17, 42, 99, 3, 120, 7, 64]])
    with torch.no_grad():
        plain = scope["model"].eval()(input_ids=ids).logits
    session = adapterkit.open(load_base(str(tiny_base), quantization="4bit", home=home),
                              attach=["real4"], home=home)
    session.swap("real4")
    with torch.no_grad():
        ours = session.model(input_ids=ids).logits
    session.close()
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)
