"""CLI commands around a resident base: ``swap``, ``chat``, ``stack`` and ``merge``."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import click
from click.core import ParameterSource

from adapterkit.cli.common import base_precision, check_sampling, library, obj, say
from adapterkit.errors import AdapterkitError, ConfigError, ServerError


def _weights(text: str | None, count: int) -> list[float] | None:
    if text is None:
        return None
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise ConfigError(f"--weights must be comma-separated numbers, got {text!r}") from None
    if len(weights) != count:
        raise ConfigError(f"{count} pocket books but {len(weights)} weights in --weights")
    return weights


def _open(ctx: click.Context, base: str | None, named: dict[str, list[str]],
          force: bool = False):
    """Load the base for the pocket books ``named`` (each name → its pocket books: one, or a
    stack's members) as they were trained — the rule ``generate`` and ``eval`` follow — and
    open a session on it; names that need different bases are refused before it loads."""
    from adapterkit.base.resolve import base_spec_for
    from adapterkit.runtime.session import open_session

    home = obj(ctx)["home"]
    if base is None and not named:
        raise ConfigError("give --base BASE (or a pocket book to take its base from)")
    # the pocket books are looked up before the base loads (which may convert a GGUF file)
    lib = library(ctx)
    books = {name: [lib.get(ref) for ref in refs] for name, refs in named.items()}
    quantization, why = base_precision(lib, books, fix="answer with them in separate runs")
    if base is None:
        base = base_spec_for(next(iter(books.values()))[0].meta.base, home)
    say(f"Loading base {base} in {why}...")
    start = time.perf_counter()
    session = open_session(base, quantization=quantization, home=home, progress=say)
    return session, time.perf_counter() - start


_SERVER = click.option(
    "--server", metavar="URL",
    help="A running `adapterkit serve` (http://127.0.0.1:8000) answers instead of a base "
         "loaded here.")
_API_KEY = click.option("--api-key", envvar="ADAPTERKIT_API_KEY", show_envvar=True,
                        help="The server's key, with --server.")


def _local_only(server: str | None, **options: object) -> None:
    """With --server the server's base answers: options about a local base cannot act, and
    without it --api-key has nothing to act on (from the environment it is simply unused)."""
    ctx = click.get_current_context()
    if not server and ctx.get_parameter_source("api_key") == ParameterSource.COMMANDLINE:
        raise ConfigError("--api-key is the key of a server: give it with --server URL")
    given = ["--" + name.replace("_", "-") for name, value in options.items() if value]
    if server and given:
        named = given[0] if len(given) == 1 else f"{', '.join(given[:-1])} and {given[-1]}"
        verb, them = ("acts", "it") if len(given) == 1 else ("act", "them")
        raise ConfigError(f"{named} {verb} on a base loaded here; with --server the server's "
                          f"base answers — drop {them}")


@click.command("swap")
@click.argument("names", nargs=-1, required=True)
@click.option("--prompt", required=True, help="The prompt every pocket book answers.")
@click.option("--base", help="Base (default: the first pocket book's base).")
@click.option("--max-new-tokens", type=int, default=48, show_default=True)
@click.option("--force", is_flag=True, help="Attach even if a pocket book's base differs.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_SERVER
@_API_KEY
@click.pass_context
def swap_cmd(ctx: click.Context, names: tuple[str, ...], prompt: str, base: str | None,
             max_new_tokens: int, force: bool, as_json: bool, server: str | None,
             api_key: str | None) -> None:
    """Load the base once and answer PROMPT with each pocket book in turn — the hot swap
    made visible: the first swap to each pocket book reads its file, later ones are in place.

    \b
    NAMES may be NAME, NAME@V, a saved stack, or a stack written inline
    (a+b, a*1+b*0.5). With --server URL a running `adapterkit serve` answers
    instead: the plain base and every pocket book at once, in one mixed batch,
    each answer timed.

    \b
    The base is loaded as the pocket books were trained (a qlora one: in 4bit,
    as `generate` and `eval` load it); pocket books trained on different bases
    (4bit and full precision) are refused together: swap them in two runs.

    \b
    Examples:
      adapterkit swap triage law --prompt "Chest pain since this morning."
      adapterkit swap triage triage+law "triage*1+law*0.5" --prompt "Rash?" --json
      adapterkit swap triage law --prompt "Rash?" --server http://127.0.0.1:8000
    """
    check_sampling(max_new_tokens=max_new_tokens)
    _local_only(server, base=base, force=force)
    if server:
        _swap_on_server(server, api_key, list(names), prompt, max_new_tokens, as_json)
        return
    stacks = {name: _stack_of(ctx, name) for name in names}  # before the base loads
    # the base's own pocket book (if any is named alone) first: it names the base
    named = {n: list(stacks[n] or [n]) for n in sorted(names, key=lambda n: stacks[n] is not None)}
    session, load_s = _open(ctx, base, named, force)
    rows = []
    activate: dict[str, Callable[[], float]] = {}
    for name in names:
        start = time.perf_counter()
        weights = stacks[name]
        for ref in weights or [name]:
            key = session.attach(ref, force=force)
            for under in session.books[key].stacked_on:  # trained --on others: read them too
                session.attach(under, force=force)
        attach_ms = (time.perf_counter() - start) * 1000
        if weights is None:
            activate[key] = partial(session.swap, key, force=force)
        else:
            key = name
            activate[key] = partial(session.stack, weights, force=force)
        start = time.perf_counter()
        activate[key]()  # timed whole: a stack's factors are joined in there
        swap_ms = (time.perf_counter() - start) * 1000
        answer = session.generate(prompt, max_new_tokens=max_new_tokens)
        rows.append({"pocket_book": key, "attach_ms": attach_ms, "swap_ms": swap_ms,
                     "answer": answer})
    # Second round: every pocket book is attached now, so these are the pure in-place swaps.
    for row in rows:
        row["hot_swap_ms"] = activate[row["pocket_book"]]() * 1000
    plain = session.generate(prompt, adapter=None, max_new_tokens=max_new_tokens)
    if as_json:
        click.echo(json.dumps({"base_load_s": load_s, "plain": plain, "pocket_books": rows},
                              indent=2))
        return
    click.echo(f"base loaded once in {load_s:.1f} s\n")
    click.echo(f"[plain base]\n  {plain}\n")
    for row in rows:
        click.echo(f"[{row['pocket_book']}]  first swap {row['attach_ms'] + row['swap_ms']:.1f} ms "
                   f"(file read {row['attach_ms']:.1f} ms), hot swap {row['hot_swap_ms']:.3f} ms")
        click.echo(f"  {row['answer']}\n")


def _stack_of(ctx: click.Context, name: str) -> dict[str, float] | None:
    """``name``'s members and weights when it is a stack (saved, or inline: ``a+b``,
    ``a*1+b*0.5``), else None (one pocket book)."""
    if "+" in name or "*" in name:
        from adapterkit.serving.names import parse

        return {ref: 1.0 if weight is None else weight for ref, weight in parse(name)}
    from adapterkit.lora.underlay import stack_members

    lib = library(ctx)
    book = lib.get(name)
    if book.meta.kind != "stack":
        return None
    return {member.ref: weight for member, weight in stack_members(lib, book)}  # (checked)


def _swap_on_server(url: str, api_key: str | None, names: list[str], prompt: str,
                    max_new_tokens: int, as_json: bool) -> None:
    """swap --server: every request sent at once, so the server decodes them together."""
    from concurrent.futures import ThreadPoolExecutor

    from adapterkit.serving.client import ServerClient

    client = ServerClient(url, api_key=api_key)
    base_id = client.base_id()
    models = [base_id, *names]
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(models)) as pool:
        answers = list(pool.map(lambda m: client.answer(m, prompt, max_tokens=max_new_tokens),
                                models))
    wall = time.perf_counter() - start
    plain, books = answers[0], answers[1:]
    rows = [{"pocket_book": a.model, "asked": name, "answer": a.text.strip(),
             "finish_reason": a.finish_reason, "completion_tokens": a.completion_tokens,
             "first_text_ms": None if a.first_text_s is None else a.first_text_s * 1000,
             "total_ms": a.total_s * 1000} for name, a in zip(names, books)]
    if as_json:
        click.echo(json.dumps({"server": client.url, "base": base_id, "wall_s": wall,
                               "plain": plain.text.strip(), "pocket_books": rows}, indent=2))
        return
    click.echo(f"{client.url} ({base_id}): {len(models)} requests answered together in "
               f"{wall:.2f} s\n")
    click.echo(f"[plain base]\n  {plain.text.strip()}\n")
    for row in rows:
        first = "-" if row["first_text_ms"] is None else f"{row['first_text_ms']:.0f} ms"
        click.echo(f"[{row['pocket_book']}]  first text {first}, {row['completion_tokens']} "
                   f"tokens in {row['total_ms']:.0f} ms")
        click.echo(f"  {row['answer']}\n")


def _parse_stack(parts: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in parts:
        name, sep, weight = part.partition("=")
        if name in out:  # a dict would keep the last weight without a word
            raise ConfigError(f"{name} is named twice in /stack; name it once, with the sum of "
                              "its weights")
        try:
            out[name] = float(weight) if sep else 1.0
        except ValueError:
            raise ConfigError(f"expected NAME=WEIGHT, got {part!r}") from None
    return out


@click.command("chat")
@click.option("--base", help="Base (default: the base of --adapter).")
@click.option("--adapter", help="Pocket book to start with.")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@_SERVER
@_API_KEY
@click.pass_context
def chat_cmd(ctx: click.Context, base: str | None, adapter: str | None,
             max_new_tokens: int, server: str | None, api_key: str | None) -> None:
    """Chat with the base and swap pocket books live: each message is answered with
    the conversation so far (on a base with a chat template), whichever pocket book
    is active; /reset starts a new conversation. Where the conversation would
    leave no room for the answer in the base's context, its oldest turns are
    dropped (said so), here and with --server.

    \b
    Commands:  /swap NAME   /stack A=1 B=0.5   /off   /reset   /list   /quit
    With --server URL a running `adapterkit serve` answers, streaming; /swap
    and /stack then only change the `model` each request names.

    \b
    The base is loaded as --adapter was trained (a qlora one: in 4bit); a
    pocket book trained on another is refused by /swap and /stack.

    \b
    Examples:
      adapterkit chat --adapter triage
      adapterkit chat --base smollm2-135m --max-new-tokens 64
      adapterkit chat --server http://127.0.0.1:8000 --adapter triage
    """
    check_sampling(max_new_tokens=max_new_tokens)
    _local_only(server, base=base)
    if server:
        _chat_on_server(server, api_key, adapter, max_new_tokens)
        return
    from adapterkit.runtime.generation import uses_chat

    session, _ = _open(ctx, base, {adapter: [adapter]} if adapter else {})
    if adapter:
        session.swap(adapter)
    talk = _Conversation(session.base.tokenizer, _context_of(session.model), max_new_tokens,
                         turns=uses_chat(session.base.tokenizer, None))
    click.echo(f"Type a message ({talk.kind}), or /swap NAME, /stack A=1 B=0.5, /off, /reset, "
               "/list, /quit.", err=True)
    while True:
        try:
            line = input(f"[{'+'.join(session.active) or 'plain'}] > ").strip()
        except EOFError:
            break
        if not line:
            continue
        command, _, rest = line.partition(" ")
        try:
            if command in ("/quit", "/exit"):
                break
            elif command == "/swap":  # timed whole: a first use reads the file(s) too
                start = time.perf_counter()
                session.swap(rest.strip())
                ms = (time.perf_counter() - start) * 1000
                click.echo(f"swapped to {'+'.join(session.active)} in {ms:.3f} ms")
            elif command == "/stack":
                start = time.perf_counter()
                session.stack(_parse_stack(rest.split()))
                ms = (time.perf_counter() - start) * 1000
                click.echo(f"stacked {session.active} in {ms:.3f} ms")
            elif command == "/off":
                session.off()
                click.echo("plain base")
            elif command == "/list":
                for summary in session.library.list():
                    mark = "*" if f"{summary.name}@{summary.version}" in session.active else " "
                    click.echo(f" {mark} {summary.name}@{summary.version}  ({summary.base_name})")
            elif command == "/reset":
                talk.reset()
                click.echo("new conversation")
            elif command.startswith("/"):
                click.echo(f"unknown command {command}; use /swap, /stack, /off, /reset, /list, "
                           "/quit")
            else:
                sent = talk.ask(line)
                with talk.answering():
                    answer = session.generate([sent], max_new_tokens=max_new_tokens)[0]
                talk.answered(answer)
                click.echo(answer)
        except AdapterkitError as exc:
            click.echo(f"Error: {exc}", err=True)


class _Conversation:
    """The turns so far, sent whole with each message as a chat client does (``turns``; a
    base without a chat template answers each message alone). The oldest turns are dropped —
    and that is said — where they would leave no room for the answer: counted with the
    tokenizer and the context length in a local chat, or on a server's
    ``context_length_exceeded`` (``chat --server``, which counts nothing itself)."""

    def __init__(self, tokenizer: Any, context: int | None, max_new_tokens: int, *,
                 turns: bool = True) -> None:
        self.tokenizer, self.context, self.room = tokenizer, context, max_new_tokens
        self.turns = turns
        self.messages: list[dict[str, str]] = []

    @property
    def kind(self) -> str:
        return ("answered with the conversation so far" if self.turns else
                "each answered on its own: this base has no chat template")

    def ask(self, text: str) -> Any:
        """What to send for the user's message ``text``: the conversation, or ``text``."""
        if not self.turns:
            return text
        self.messages.append({"role": "user", "content": text})
        dropped = 0
        while self._too_long() and self.drop_oldest():
            dropped += 2
        self.said_dropped(dropped)
        return list(self.messages)

    def drop_oldest(self) -> bool:
        """Drop the oldest question and its answer; False where only the message just asked
        is left (then nothing can be dropped)."""
        if not self.turns or len(self.messages) <= 1:
            return False
        del self.messages[:2]
        return True

    @staticmethod
    def said_dropped(dropped: int) -> None:
        if dropped:
            click.echo(f"(the oldest {dropped} turns were dropped to leave room for the answer "
                       "in the base's context; /reset starts afresh)", err=True)

    def answered(self, text: str) -> None:
        if self.turns:
            self.messages.append({"role": "assistant", "content": text})

    def abandon(self) -> None:
        """The message just asked got no answer: it leaves the turns sent next (two user
        turns in a row break templates that alternate)."""
        if self.turns and self.messages and self.messages[-1]["role"] == "user":
            self.messages.pop()

    @contextmanager
    def answering(self, shown: list[str] | None = None) -> Iterator[None]:
        """Around getting the answer to the message just asked: on a failure the message is
        abandoned, a line the answer's ``shown`` pieces began is ended (the error gets its
        own), and adapterkit's error says /reset where earlier turns went with it."""
        try:
            yield
        except BaseException as exc:
            if shown:
                click.echo()
            self.abandon()
            if isinstance(exc, AdapterkitError):
                raise AdapterkitError(f"{exc}{self.hint}") from None
            raise

    @property
    def hint(self) -> str:
        """Said after an error while earlier turns are sent with each message."""
        return " (the earlier turns were sent too; /reset starts a new conversation)" \
            if self.turns and self.messages else ""

    def reset(self) -> None:
        self.messages.clear()

    def _too_long(self) -> bool:
        if self.tokenizer is None or not self.context:
            return False
        ids = self.tokenizer.apply_chat_template(self.messages, tokenize=True,
                                                 add_generation_prompt=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # (a BatchEncoding, in 5.x)
        return len(ids) + self.room > self.context


def _context_of(model: Any) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def _chat_on_server(url: str, api_key: str | None, adapter: str | None,
                    max_new_tokens: int) -> None:
    """chat --server: the REPL of `chat`, each line answered by the server, streamed."""
    from urllib.parse import quote

    from adapterkit.serving.client import ServerClient

    client = ServerClient(url, api_key=api_key)
    base_id = client.base_id()

    def checked(model: str) -> str:  # the server resolves it now: a typo is said at once
        return str(client.get("/v1/models/" + quote(model, safe="@"))["id"])

    model = checked(adapter) if adapter else base_id
    talk = _Conversation(None, None, max_new_tokens)
    click.echo(f"Connected to {client.url} ({base_id}). Type a message ({talk.kind}), or "
               "/swap NAME, /stack A=1 B=0.5, /off, /reset, /list, /quit.", err=True)
    while True:
        try:
            line = input(f"[{'plain' if model == base_id else model}] > ").strip()
        except EOFError:
            break
        if not line:
            continue
        command, _, rest = line.partition(" ")
        try:
            if command in ("/quit", "/exit"):
                break
            elif command == "/swap":
                model = checked(rest.strip())
                click.echo(f"now answering with {model}")
            elif command == "/stack":
                weights = _parse_stack(rest.split())
                from adapterkit.library.names import weight_text

                model = checked("+".join(f"{n}*{weight_text(w)}" for n, w in weights.items()))
                click.echo(f"now answering with {model}")
            elif command == "/off":
                model = base_id
                click.echo("plain base")
            elif command == "/list":
                for entry in client.models():
                    mark = "*" if entry["id"] == model else " "
                    click.echo(f" {mark} {entry['id']}  ({entry.get('kind', 'model')})")
            elif command == "/reset":
                talk.reset()
                click.echo("new conversation")
            elif command.startswith("/"):
                click.echo(f"unknown command {command}; use /swap, /stack, /off, /reset, /list, "
                           "/quit")
            else:
                parts: list[str] = []
                with talk.answering(shown=parts):
                    sent: Any = talk.ask(line)
                    kept, dropped = list(talk.messages), 0
                    while True:
                        try:
                            for text, _ in client.stream_chat(model, sent,
                                                              max_tokens=max_new_tokens):
                                if not parts:  # it fits: said before the answer shows
                                    talk.said_dropped(dropped)
                                click.echo(text, nl=False)
                                parts.append(text)
                            if not parts:
                                talk.said_dropped(dropped)
                            break
                        except ServerError as exc:  # too long for the server's context:
                            if exc.code == "context_length_exceeded" and not parts \
                                    and talk.drop_oldest():  # the oldest turns go
                                dropped, sent = dropped + 2, list(talk.messages)
                                continue
                            if not parts:  # a request that fails anyway loses no turns
                                talk.messages[:] = kept
                            raise
                        except BaseException:  # (Ctrl-C, the connection lost...)
                            if not parts:
                                talk.messages[:] = kept
                            raise
                click.echo()
                talk.answered("".join(parts))
        except AdapterkitError as exc:
            click.echo(f"Error: {exc}", err=True)


@click.command("stack")
@click.argument("names", nargs=-1, required=True)
@click.option("--weights", help="Comma-separated weights, one per pocket book (default 1 each).")
@click.option("--name", required=True, help="Library name of the stack.")
@click.option("--flatten", is_flag=True,
              help="Write one ordinary PEFT adapter (ranks concatenated: exact).")
@click.pass_context
def stack_cmd(ctx: click.Context, names: tuple[str, ...], weights: str | None, name: str,
              flatten: bool) -> None:
    """Save pocket books NAMES as a stack: their deltas weighted and summed when active.

    \b
    Examples:
      adapterkit stack triage law --weights 1,0.5 --name triage-law
      adapterkit stack triage law --name triage-law-flat --flatten
    """
    from adapterkit.lora.combine import stack

    if len(names) < 2:
        raise ConfigError("a stack needs at least two pocket books")
    book = stack(library(ctx), list(names), _weights(weights, len(names)),
                 name=name, flatten=flatten)
    kind = "flattened adapter" if flatten else "stack"
    click.echo(f"Saved {book.ref} ({kind} of {', '.join(book.meta.parents)})")


@click.command("merge")
@click.argument("names", nargs=-1, required=True)
@click.option("--method", default="exact_svd", show_default=True,
              help="Merge strategy (see `adapterkit plugins`): linear, cat, svd, ties, "
                   "dare_linear, dare_ties, magnitude_prune, their _svd variants, exact_svd...")
@click.option("--weights", help="Comma-separated weights, one per pocket book (default 1 each).")
@click.option("--name", required=True, help="Library name of the result.")
@click.option("--rank", type=int, help="Rank of the result (SVD methods; default: largest).")
@click.option("--density", type=float, help="Fraction kept, in (0, 1] (TIES, DARE, pruning).")
@click.option("--seed", type=click.IntRange(min=0),
              help="Seed of DARE's random drop (dare_* methods; default 0, recorded): the same "
                   "merge and seed give the same weights.")
@click.pass_context
def merge_cmd(ctx: click.Context, names: tuple[str, ...], method: str, weights: str | None,
              name: str, rank: int | None, density: float | None,
              seed: int | None) -> None:
    """Merge pocket books NAMES into one new pocket book with a registered strategy.

    \b
    Examples:
      adapterkit merge triage law --name both --rank 16
      adapterkit merge triage law --method ties --density 0.5 --weights 1,0.5 --name tl
    """
    from adapterkit.lora.combine import merge

    state = obj(ctx)
    start = time.perf_counter()
    book = merge(library(ctx), list(names), _weights(weights, len(names)),
                 method=method, name=name, rank=rank, density=density, plugins=state["plugins"],
                 seed=seed)
    click.echo(f"Saved {book.ref}: {method} of {', '.join(book.meta.parents)} "
               f"in {time.perf_counter() - start:.2f} s")


@click.command("verify")
@click.argument("ref")
@click.option("--tolerance", type=float, default=1e-3, show_default=True,
              help="Largest logit difference from plain PEFT that counts as exact.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def verify_cmd(ctx: click.Context, ref: str, tolerance: float, as_json: bool) -> None:
    """Check pocket book REF on every path against plain PEFT.

    \b
    Loads the base once, runs a few prompts through plain PEFT (the reference)
    and through each adapterkit path — session swap, session stack, stack
    --flatten, export --merged — and prints each path's largest logit
    difference, or why that path refuses the pocket book. Exit 1 if any path
    drifts beyond --tolerance. The result is recorded in the pocket book's
    metadata and model card (printed first: exit 1, saying why, if it cannot
    be recorded). The base is loaded in full precision, also for a pocket book
    trained on a 4-bit one (the record says so).

    \b
    Examples:
      adapterkit verify triage
      adapterkit verify triage@2 --tolerance 1e-4 --json
    """
    from adapterkit.cli.common import echo_json, machine_error
    from adapterkit.errors import AdapterkitError
    from adapterkit.runtime.verify import record_verification, verify

    lib = library(ctx)
    result = verify(lib, ref, tolerance=tolerance, progress=say, record=False)
    try:  # (the figures are shown even when they cannot be recorded)
        record_verification(lib, result)
        not_recorded = None
    except (AdapterkitError, OSError) as exc:
        not_recorded = str(exc) if isinstance(exc, AdapterkitError) \
            else machine_error(exc) or f"{type(exc).__name__}: {exc}"
    if as_json:
        echo_json({"ref": result.ref, **result.as_dict(), "recorded": not_recorded is None})
    else:
        for r in result.results:
            if r.refused is not None:
                click.echo(f"  {r.path:<16} refused: {r.refused}")
            elif r.max_logit_diff is None:  # a side not finite: no difference to show
                click.echo(f"  {r.path:<16} {r.mark(tolerance)}")
            else:
                click.echo(f"  {r.path:<16} max |logit diff| vs PEFT {r.max_logit_diff:.2e}  "
                           f"{r.mark(tolerance)}")
        click.echo(f"{result.ref}: {result.verdict()}")
    if not_recorded is not None:
        say(f"Not recorded in {result.ref}'s metadata and card: {not_recorded}")
    if not result.ok or not_recorded is not None:
        ctx.exit(1)


