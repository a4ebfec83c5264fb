"""`swap`, `chat`, `stack`, `merge` and `export --merged` from the command line."""

import json

import pytest
from click.testing import CliRunner

from adapterkit.cli import build_cli
from adapterkit.plugin_api.manager import get_plugin_manager
from adapterkit.plugin_api.testing import make_peft_adapter


@pytest.fixture
def cli(home):
    return build_cli(get_plugin_manager(env=False))


@pytest.fixture
def two(library, tiny_base, tmp_path):
    for name, seed in (("law", 1), ("code", 2)):
        library.import_peft(make_peft_adapter(tiny_base, tmp_path / name, seed=seed), name,
                            base=str(tiny_base))
    return library


def run(cli, *args, code=0, input=None):
    out = CliRunner().invoke(cli, [str(a) for a in args], input=input)
    assert out.exit_code == code, out.output
    return out.output


def test_swap_answers_with_each_and_reports_latency(cli, two):
    out = run(cli, "swap", "law", "code", "--prompt", "Hello", "--max-new-tokens", "4", "--json")
    data = json.loads(out[out.index("{"):])
    assert [r["pocket_book"] for r in data["pocket_books"]] == ["law@1", "code@1"]
    for row in data["pocket_books"]:
        assert row["hot_swap_ms"] < row["attach_ms"] + row["swap_ms"]
        assert isinstance(row["answer"], str)
    text = run(cli, "swap", "law", "--prompt", "Hello", "--max-new-tokens", "2")
    assert "[law@1]  first swap" in text and "hot swap" in text and "[plain base]" in text


def test_chat_repl_commands(cli, two):
    script = "\n".join(["/list", "/swap law", "hi", "/stack law=1 code=0.5", "/off",
                        "/stack law=1 law=2", "/swap ghost", "/bogus", "/quit"]) + "\n"
    out = run(cli, "chat", "--adapter", "code", "--max-new-tokens", "3", input=script)
    assert "law is named twice in /stack" in out
    assert "law@1" in out and "swapped to law@1" in out
    assert "stacked {'law@1': 1.0, 'code@1': 0.5}" in out and "plain base" in out
    assert "Error: 'ghost'" in out or "no pocket book named 'ghost'" in out
    assert "/reset starts" not in out  # a command's error: nothing was sent
    assert "unknown command /bogus" in out


def test_stack_and_merge_commands(cli, two, home):
    assert "Saved lc@1 (stack of law@1, code@1)" in run(
        cli, "stack", "law", "code", "--weights", "1,0.5", "--name", "lc")
    assert "flattened adapter" in run(cli, "stack", "law", "code", "--name", "flat", "--flatten")
    out = run(cli, "merge", "law", "code", "--method", "exact_svd", "--weights", "1,1",
              "--name", "m", "--rank", "4")
    assert out.startswith("Saved m@1: exact_svd of law@1, code@1")
    shown = json.loads(run(cli, "show", "m", "--json"))
    assert shown["parents"] == ["law@1", "code@1"] and shown["hyperparameters"]["rank"] == 4


def test_stack_and_merge_call_the_saved_hook(two, home):
    """``pocket_book_saved`` is documented as called after every save, the command line's
    ``stack`` and ``merge`` included (they once built a library without the plugins)."""
    from adapterkit.plugin_api.hookspecs import hookimpl

    seen = []

    class Watcher:
        @hookimpl
        def pocket_book_saved(self, pocket_book):
            seen.append(pocket_book.ref)

    cli = build_cli(get_plugin_manager(env=False, plugins={"watcher": Watcher()}))
    run(cli, "stack", "law", "code", "--name", "lc")
    run(cli, "stack", "law", "code", "--name", "flat", "--flatten")
    run(cli, "merge", "law", "code", "--method", "linear", "--name", "m")
    assert seen == ["lc@1", "flat@1", "m@1"]


@pytest.mark.parametrize("args,match", [
    (["stack", "law", "code", "--weights", "1", "--name", "x"], "2 pocket books but 1 weights"),
    (["stack", "law", "code", "--weights", "1,a", "--name", "x"], "comma-separated numbers"),
    (["merge", "law", "code", "--method", "dare_ties", "--density", "0", "--name", "x"],
     "needs --density in (0, 1]"),
    (["merge", "law", "ghost", "--name", "x"], "no pocket book named 'ghost'"),
    (["swap", "ghost", "--prompt", "p"], "no pocket book named 'ghost'"),
    (["swap", "law", "--prompt", "p", "--max-new-tokens", "0"], "at least 1"),
])
def test_errors_are_one_line(cli, two, args, match):
    out = run(cli, *args, code=1)
    assert out.strip().splitlines()[-1].startswith("Error:") and match in out


_NO_DENSITY = ["exact_svd", "linear", "cat", "svd"]
_NO_RANK = ["linear", "cat", "ties", "dare_linear", "dare_ties", "magnitude_prune"]
_DENSITY = ["ties", "dare_linear", "dare_ties", "magnitude_prune"]


@pytest.mark.parametrize("args,match", [
    (["stack", "law", "law", "--weights", "1,2", "--name", "x"],
     "law@1 is named 2 times (law, law); name it once, with the sum of its weights (3)"),
    (["stack", "law", "code", "law@1", "--weights", "1,1,0.5", "--name", "x"],
     "law@1 is named 2 times (law, law@1)"),
    (["stack", "law", "law@1", "--flatten", "--name", "x"], "law@1 is named 2 times"),
    *[(["merge", "law", "code", "--method", m, "--density", "0.5", "--name", "x"],
       f"method {m} does not use --density; leave it out") for m in _NO_DENSITY],
    *[(["merge", "law", "code", "--method", m, "--rank", "4", "--name", "x",
        *(["--density", "0.5"] if m in _DENSITY else [])],
       f"method {m} does not use --rank") for m in _NO_RANK],
    (["export", "law", "{out}", "--tolerance", "0.1"], "--tolerance applies to --merged only"),
    (["export", "law", "{out}", "--format", "gguf", "--tolerance", "0.1"],
     "--tolerance applies to --merged only"),
    (["chat", "--server", "http://127.0.0.1:9", "--base", "x"],
     "Error: --base acts on a base loaded here; with --server the server's base answers — "
     "drop it"),
    (["swap", "law", "--prompt", "p", "--server", "http://127.0.0.1:9", "--force"],
     "Error: --force acts on a base loaded here"),
    (["swap", "law", "--prompt", "p", "--server", "http://127.0.0.1:9", "--base", "x",
      "--force"], "Error: --base and --force act on a base loaded here; with --server the "
                  "server's base answers — drop them"),
])
def test_options_that_would_not_act_are_refused(cli, two, tmp_path, args, match):
    """Before: a duplicate stack member kept only its last weight, --density was recorded and
    --rank dropped by methods that do not use them, --tolerance did nothing without --merged."""
    out = run(cli, *[str(a).format(out=tmp_path / "out") for a in args], code=1)
    assert out.strip().splitlines()[-1].startswith("Error:") and match in out
    assert [(b.name, b.version) for b in two.list(all_versions=True)] == [("code", 1), ("law", 1)]
    assert not (tmp_path / "out").exists()


def test_merging_a_stack_says_how_to_flatten_it(cli, two):
    run(cli, "stack", "law", "code", "--weights", "1,-0.5", "--name", "lc")
    out = run(cli, "merge", "lc", "law", "--name", "x", code=1)
    flatten = "adapterkit stack law@1 code@1 --weights 1,-0.5 --flatten --name NAME"
    assert "lc@1 is a stack" in out and flatten in out and "not valid JSON" not in out
    assert "Saved flat@1" in run(cli, *flatten.split()[1:-1], "flat")
    assert "Saved x@1: exact_svd of flat@1, law@1" in run(cli, "merge", "flat", "law",
                                                          "--name", "x")


def test_export_merged_cli(cli, two, tmp_path):
    out = run(cli, "export", "law", tmp_path / "merged", "--merged")
    assert "merged into its base" in out and "max logit difference" in out
    assert (tmp_path / "merged" / "config.json").exists()
    out = run(cli, "export", "law", tmp_path / "merged", "--merged", code=1)
    assert "not empty" in out


def test_swap_force_reaches_the_books_underneath(cli, top_on_under, tmp_path):
    """Before: --force attached ``top`` but not the book under it, which was refused."""
    from adapterkit.plugin_api.testing import make_tiny_base

    twin = make_tiny_base(tmp_path / "twin", seed=7)  # same shapes, other weights
    args = ["swap", "top", "--base", twin, "--prompt", "Hello", "--max-new-tokens", "2"]
    out = run(cli, *args, code=1)
    assert "pocket book top@1 was made on base" in out
    with pytest.warns(UserWarning, match="under@1 was made on base .*attached anyway"):
        out = run(cli, *args, "--force")
    assert "[top@1]  first swap" in out


def test_first_swap_figure_covers_reading_the_books_underneath(cli, top_on_under,
                                                               monkeypatch):
    """Before: the printed first swap left out reading (and joining) the books ``top`` was
    trained on, which the swap does before its timer starts."""
    import re
    import time

    import adapterkit.runtime.session as session_mod

    real = session_mod.load_book

    def slow_underlay(book, **kwargs):
        if book.ref == "under@1":
            time.sleep(0.3)
        return real(book, **kwargs)

    monkeypatch.setattr(session_mod, "load_book", slow_underlay)
    text = run(cli, "swap", "top", "--prompt", "Hello", "--max-new-tokens", "2")
    first, read = (float(x) for x in re.search(
        r"\[top@1\]  first swap ([\d.]+) ms \(file read ([\d.]+) ms\)", text).groups())
    assert first >= read >= 300
    out = run(cli, "swap", "top", "--prompt", "Hello", "--max-new-tokens", "2", "--json")
    [row] = json.loads(out[out.index("{"):])["pocket_books"]
    assert row["attach_ms"] >= 300 and row["hot_swap_ms"] < row["attach_ms"] + row["swap_ms"]


@pytest.mark.parametrize("args", [["--no-adapter"], []])
def test_generate_refuses_force_where_no_pocket_book_is_attached(cli, two, tiny_base, args):
    """Before: --force was accepted and ignored without an adapter (or with --no-adapter)."""
    given = ["--adapter", "law", *args] if args else ["--base", tiny_base]
    out = run(cli, "generate", "hi", *given, "--force", "--max-new-tokens", "2", code=1)
    assert out.strip().splitlines() == [out.strip().splitlines()[-1]]
    assert out.startswith("Error: --force attaches a pocket book made on another base")
    assert "drop --force" in out and "Loading base" not in out


def test_swap_answers_with_saved_and_inline_stacks_as_its_help_says(cli, two):
    """``swap`` refused stacks ("is a stack; attach its members") while its help offered them;
    each answers now as ``generate`` of the same stack does."""
    run(cli, "stack", "law", "code", "--weights", "1,0.5", "--name", "lc")
    out = run(cli, "swap", "lc", "law*1+code*0.5", "law", "--prompt", "Hello",
              "--max-new-tokens", "8", "--json")
    data = json.loads(out[out.index("{"):])
    rows = {r["pocket_book"]: r for r in data["pocket_books"]}
    assert list(rows) == ["lc", "law*1+code*0.5", "law@1"]
    alone = run(cli, "generate", "Hello", "--adapter", "lc", "--max-new-tokens", "8")
    assert rows["lc"]["answer"] == rows["law*1+code*0.5"]["answer"]
    # the stack, not one member or the plain base (the answers tell them apart)
    assert rows["lc"]["answer"] not in (rows["law@1"]["answer"], data["plain"])
    # (progress lines come before generate's answer)
    assert alone.rstrip("\n").endswith(rows["lc"]["answer"].rstrip("\n"))
    assert all(r["hot_swap_ms"] >= 0 for r in rows.values())


def test_chat_answers_with_the_conversation_so_far_and_reset_starts_afresh(cli, two, tiny_base,
                                                                            home):
    """Each message went alone: a "chat" that forgot every earlier turn. The answers are
    recomputed here with a plain session given the whole conversation."""
    import adapterkit

    script = "First message.\nSecond message.\n/reset\nSecond message.\n/quit\n"
    out = run(cli, "chat", "--adapter", "law", "--max-new-tokens", "4", input=script)
    session = adapterkit.open(str(tiny_base), home=home)
    session.swap("law")
    first = session.generate("First message.", max_new_tokens=4)
    conversation = [{"role": "user", "content": "First message."},
                    {"role": "assistant", "content": first},
                    {"role": "user", "content": "Second message."}]
    second = session.generate([conversation], max_new_tokens=4)[0]
    alone = session.generate("Second message.", max_new_tokens=4)
    assert all((first, second, alone)) and second != alone  # (else it could not tell them apart)
    said = [line.split("] > ", 1)[-1] for line in out.splitlines()]  # after each prompt
    answers = [text for text in said if text in (first, second, alone)]
    assert answers == [first, second, alone], out
    assert "new conversation" in out


def test_a_message_that_got_no_answer_leaves_the_conversation():
    """A failed request (a server's 400 past its context, say) left its question in the turns:
    two user turns in a row next time, which templates that alternate refuse."""
    from adapterkit.cli.session import _Conversation

    talk = _Conversation(None, None, 8)
    assert talk.ask("one") == [{"role": "user", "content": "one"}] and talk.hint == " (the " \
        "earlier turns were sent too; /reset starts a new conversation)"
    talk.abandon()
    assert talk.messages == [] and talk.hint == ""
    talk.ask("two")
    talk.answered("2")
    talk.ask("three")
    talk.abandon()
    assert [m["role"] for m in talk.messages] == ["user", "assistant"]
    alone = _Conversation(None, None, 8, turns=False)
    assert alone.ask("x") == "x" and alone.messages == [] and alone.hint == ""
    # around the request: a failure abandons the message, and the error says /reset
    from adapterkit import ConfigError
    from adapterkit.errors import AdapterkitError

    talk.ask("four")
    with pytest.raises(AdapterkitError, match=r"^past the context \(the earlier turns were "
                                              r"sent too; /reset starts a new conversation\)$"):
        with talk.answering(shown=[]):
            raise ConfigError("past the context")
    assert [m["role"] for m in talk.messages] == ["user", "assistant"]


def test_a_conversation_drops_its_oldest_turns_where_the_answer_would_not_fit(capsys):
    """Local chat counts with the tokenizer (10 tokens a message here, context 35, room for
    a 5-token answer); chat --server drops them on the server's word (``drop_oldest``)."""
    from adapterkit.cli.session import _Conversation

    class TenEach:
        def apply_chat_template(self, messages, **_):
            return list(range(10 * len(messages)))

    talk = _Conversation(TenEach(), 35, 5)
    talk.ask("a")
    talk.answered("1")
    assert [m["content"] for m in talk.ask("b")] == ["a", "1", "b"]  # 30 + 5: it fits
    talk.answered("2")
    assert [m["content"] for m in talk.ask("c")] == ["b", "2", "c"]
    assert "(the oldest 2 turns were dropped" in capsys.readouterr().err
    assert talk.drop_oldest() and talk.messages == [{"role": "user", "content": "c"}]
    assert not talk.drop_oldest()  # the message just asked is never dropped


def test_every_session_and_serve_command_shows_examples():
    """As `train --help` and `eval --help` do: how to call it, not only what it does."""
    import click

    from adapterkit.cli import serve as serve_cli
    from adapterkit.cli import session as session_cli

    commands = [c for module in (session_cli, serve_cli) for c in vars(module).values()
                if isinstance(c, click.Command)]
    assert {c.name for c in commands} >= {"swap", "chat", "stack", "merge", "verify", "serve"}
    missing = [c.name for c in commands
               if "Examples:\n    adapterkit " not in c.get_help(click.Context(c, info_name=c.name))]
    assert not missing, missing
