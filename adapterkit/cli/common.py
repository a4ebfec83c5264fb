"""What every CLI module shares: the error-converting group, the library of this run, output.

Library code raises :class:`~adapterkit.errors.AdapterkitError`; only the CLI turns it into one
line on stderr and exit code 1 (:class:`Group`). A traceback means a bug of ours.
"""

from __future__ import annotations

import errno
import json
import math
from collections.abc import Mapping
from typing import Any

import click

from adapterkit.errors import AdapterkitError, ConfigError
from adapterkit.library.store import Library

#: Errors of the machine, not of adapterkit or of the user's input: said in one line. Anything
#: a command had started writing is removed by the command itself (staging folders, partial
#: exports), so "failed" always means "nothing landed".
_MACHINE_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for this file system or for the file-size limit (ulimit -f)",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EIO: "input/output error",
}

#: Errors of a path the user typed (a file where a folder must be, a name past the file
#: system's limit): said in one line, naming the path (without one they would be our bug).
_PATH_ERRORS = {
    errno.ENOTDIR: "a part of this path is a file, not a folder",
    errno.ENAMETOOLONG: "a name in this path is too long for the file system",
    errno.EISDIR: "this path is a folder, not a file",
    errno.ELOOP: "this path has too many levels of symbolic links",
}


def machine_error(exc: OSError) -> str | None:
    """One line for an out-of-space, permission or I/O error, or for a bad path the error
    names; ``None`` for other errors."""
    what = _MACHINE_ERRORS.get(exc.errno or 0)
    if what is None:
        path = _PATH_ERRORS.get(exc.errno or 0)
        return f"{path} ({exc.filename}): fix the path and run the command again" \
            if path and exc.filename else None
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{what}{where}; nothing was saved — fix that and run the command again"


class Group(click.Group):
    """Turns our exceptions into one-line click errors, for every (sub)command."""

    def _plugins_command(self, ctx: click.Context) -> bool:
        """Whether the subcommand invoked is a plugin's own (``register_commands``)."""
        command = self.commands.get(ctx.invoked_subcommand or "")
        module = str(getattr(getattr(command, "callback", None), "__module__", "") or "")
        return bool(module) and not module.startswith(("adapterkit.", "adapterkit_plugins."))

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AdapterkitError as exc:
            raise click.ClickException(_noted(str(exc), exc)) from None
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except SystemExit as exc:  # sys.exit() in a plugin's code (a trainer...): its failure,
            # named, not a silent exit; ours exits as asked, and so does a plugin's own command
            # (its exit status is its to choose), or any exit with status 0
            message = None if exc.code in (0, None) or self._plugins_command(ctx) \
                else plugin_failure(ctx, exc)
            if message is None:
                raise
            raise click.ClickException(_noted(message, exc)) from None
        except Exception as exc:
            if isinstance(exc, OSError):
                message = machine_error(exc)
                if message is not None:
                    raise click.ClickException(_noted(message, exc)) from None
            message = out_of_memory(exc) or plugin_failure(ctx, exc)
            if message is None:
                raise  # (Python prints its notes after the traceback)
            raise click.ClickException(_noted(message, exc)) from None


def then_say(exc: BaseException, line: str) -> None:
    """Say ``line`` after ``exc``'s own message, however it is reported: a note on it
    (``add_note``), which :class:`Group` prints after the error's line and Python after a
    traceback; now, where ``exc`` takes no note (a frozen exception, Python 3.10)."""
    add = getattr(exc, "add_note", None)
    if add is not None:
        try:
            add(line)
            return
        except Exception:  # (an exception that takes no attributes)
            pass
    say(line)  # (Python 3.10 has no add_note, and its tracebacks would show no note)


def _noted(message: str, exc: BaseException) -> str:
    """``message`` with the notes on ``exc`` (:func:`then_say`) below it."""
    notes = [n for n in getattr(exc, "__notes__", None) or [] if isinstance(n, str)]
    return "\n".join([message, *notes])


def out_of_memory(exc: BaseException) -> str | None:
    """One line for running out of memory (the machine's, or a GPU's): the work's size, not
    a bug; None for other errors."""
    if not (isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"):
        return None
    said = " ".join(str(exc).split())[:200]
    return (f"out of memory ({type(exc).__name__}{': ' + said if said else ''}): lower "
            "--batch-size or --max-length, raise --grad-accum (the same global batch in smaller "
            "pieces), or use --gradient-checkpointing or --method qlora")


#: Set to show a failing plugin's traceback (for its author) instead of the one line.
TRACEBACK_ENV = "ADAPTERKIT_TRACEBACK"


def plugin_failure(ctx: click.Context, exc: BaseException) -> str | None:
    """One line for an exception raised in a third-party plugin's code (a hook, a trainer, a
    strategy, a scorer...): whose bug it is and what the user can do, or None when no plugin's
    code is on the traceback (then it is adapterkit's bug, and its traceback shows)."""
    import os

    plugins = (ctx.find_root().obj or {}).get("plugins")
    culprit = plugins.plugin_at_fault(exc.__traceback__) if plugins is not None else None
    if culprit is None or os.environ.get(TRACEBACK_ENV):
        return None
    name, where = culprit
    said = " ".join(f"{type(exc).__name__}: {exc}".split())
    return (f"plugin {name!r} failed ({where}): {said[:500]} — raised in that plugin's code "
            f"or a library it called. If your input is not the cause, report it to the "
            f"plugin's author ({TRACEBACK_ENV}=1 shows the traceback), or run without it: "
            f"ADAPTERKIT_DISABLE_PLUGINS={name}")


Group.group_class = Group


def obj(ctx: click.Context) -> dict[str, Any]:
    """The root context's state: ``home`` and ``plugins`` (the plugin manager)."""
    return ctx.find_root().obj


def library(ctx: click.Context) -> Library:
    """The library of this invocation (``--home``), with its plugin manager."""
    state = obj(ctx)
    return Library(state["home"], plugins=state["plugins"])


def say(message: str) -> None:
    """Progress and notes go to stderr, so stdout stays the command's answer."""
    click.echo(message, err=True)


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def table(rows: list[list[str]], headers: list[str]) -> str:
    """Plain aligned columns: fast for 10,000 rows (rich tables are not), and grep-friendly."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def check_sampling(*, max_new_tokens: int, temperature: float = 0.0) -> None:
    """Refuse generation settings that would be misread rather than used: no tokens to
    generate, or a temperature below 0 (or nan) that would silently mean greedy decoding."""
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ConfigError(f"--temperature must be a finite number ≥ 0 (0 = greedy decoding), "
                          f"got {temperature}")


def loaded_in(quantization: str | None, needs: Mapping[str, str | None]) -> str:
    """What the "Loading base" line says the base is loaded in, and why when quantized."""
    if quantization is None:
        from adapterkit.base.load import default_dtype

        return str(default_dtype()).removeprefix("torch.")
    return f"{quantization}, as {', '.join(needs)} {'was' if len(needs) == 1 else 'were'} " \
           "trained"


def base_precision(lib: Library, books: Mapping[str, Any], *, fix: str
                   ) -> tuple[str | None, str]:
    """The quantization the base loads in for the pocket books ``books`` (each name → its
    pocket books) as they were trained — refused, ending with ``fix``, where they need
    different ones — and how the loading line says it (:func:`loaded_in`)."""
    from adapterkit.runtime.session import one_quantization, quantizations

    needs = quantizations(lib, books)
    quantization = one_quantization(needs, fix=fix)
    return quantization, loaded_in(quantization, needs)
