"""The ``adapterkit`` command line: a thin layer over the Python API.

Built by a function (:func:`build_cli`) from a plugin manager, so tests build fresh CLIs and
plugins add commands without import-time side effects. Library errors
(:class:`~adapterkit.errors.AdapterkitError`) become one line on stderr and exit code 1; a
traceback means a bug of ours. Commands that need torch import it inside their body, so
``--help``, ``list``, ``show`` and ``plugins`` start fast.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from adapterkit.cli.base import base_group
from adapterkit.cli.common import Group
from adapterkit.cli.library import (
    doctor_cmd,
    export_cmd,
    import_cmd,
    list_cmd,
    plugins_cmd,
    pull_cmd,
    push_cmd,
    rm_cmd,
    show_cmd,
    tag_cmd,
)
from adapterkit.cli.pipeline import pipeline_cmd
from adapterkit.cli.plugins import NO_PLUGIN_COMMANDS, install_cmd, plugin_group, uninstall_cmd
from adapterkit.cli.quickstart import quickstart_cmd
from adapterkit.cli.serve import serve_cmd
from adapterkit.cli.session import chat_cmd, merge_cmd, stack_cmd, swap_cmd, verify_cmd
from adapterkit.cli.train import eval_cmd, generate_cmd, train_cmd
from adapterkit.errors import ConfigError
from adapterkit.home import HOME_ENV, file_in_the_way
from adapterkit.plugin_api.manager import (
    DISABLE_ENV,
    PluginManager,
    PluginWarning,
    get_plugin_manager,
)

__all__ = ["build_cli", "main"]


def build_cli(pm: PluginManager) -> click.Group:
    """The root ``adapterkit`` command with core commands and every plugin's commands."""

    @click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
    @click.option("--home", type=_HomePath(file_okay=False), envvar=HOME_ENV,
                  help="adapterkit home (library, catalog, converted bases). "
                       "Default: $ADAPTERKIT_HOME or ~/.local/share/adapterkit.")
    @click.version_option(package_name="adapterkit")
    @click.pass_context
    def cli(ctx: click.Context, home: str | None) -> None:
        """One frozen base model, many swappable LoRA pocket books.

        \b
        Train a pocket book on a base, keep it in the local library, swap, stack,
        merge and share it. Start with:
          adapterkit base show smollm2-135m    # the embedded default base
          adapterkit list                      # your pocket books
          adapterkit plugins                   # methods, trainers, ... installed
        """
        if home:
            _refuse_file_home(home, from_env=ctx.get_parameter_source("home")
                              == ParameterSource.ENVIRONMENT)
        ctx.obj = {"home": home, "plugins": pm}

    for command in (plugins_cmd, list_cmd, show_cmd, rm_cmd, tag_cmd, import_cmd, export_cmd,
                    base_group, train_cmd, eval_cmd, generate_cmd, push_cmd, pull_cmd,
                    swap_cmd, chat_cmd, stack_cmd, merge_cmd, plugin_group, install_cmd,
                    uninstall_cmd, verify_cmd, doctor_cmd, pipeline_cmd, serve_cmd,
                    quickstart_cmd):
        cli.add_command(command)
    _add_plugin_commands(cli, pm)
    return cli


class _HomePath(click.Path):
    """``--home``'s type: a file typed as ``--home`` is click's usage error, as for any option;
    one from ``$ADAPTERKIT_HOME`` is left to :func:`_refuse_file_home`, which names the
    variable (click would name ``--home``, which the user never typed)."""

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        if ctx is not None and param is not None and param.name and \
                ctx.get_parameter_source(param.name) == ParameterSource.ENVIRONMENT:
            return value
        return super().convert(value, param, ctx)


def _refuse_file_home(home: str, *, from_env: bool) -> None:
    """Refuse, before any command runs, a home that is a file or lies under one, naming where
    it was given (``$ADAPTERKIT_HOME`` or ``--home``): the user may never have typed it."""
    path = Path(home).expanduser()
    where = file_in_the_way(path)
    if where:
        given, fix = (f"${HOME_ENV}", f"set ${HOME_ENV} to") if from_env else \
            ("--home", "pass --home with")
        raise ConfigError(f"the adapterkit home {path} (from {given}) {where}, not a folder: "
                          f"{fix} the path of a folder")


def _add_plugin_commands(cli: click.Group, pm: PluginManager) -> None:
    """Let each plugin add commands, one plugin at a time, and undo what it did to a command it
    does not own: a core command, or an earlier plugin's, stays as it was, with a warning."""
    owned = {name: (command, "adapterkit") for name, command in cli.commands.items()}
    # the generator calls the next plugin only when the loop asks, so each check below sees
    # what one plugin did (@cli.command, cli.add_command or cli.commands itself)
    for plugin, _ in pm.call_one_by_one("register_commands", cli=cli):
        for name, (command, owner) in owned.items():
            if cli.commands.get(name) is command:
                continue
            who = "adapterkit (a core command)" if owner == "adapterkit" else f"plugin {owner!r}"
            did = (f"defines its command name as `{name}` but that name is already used by {who}"
                   if name in cli.commands else f"removed the command `{name}` of {who}")
            warnings.warn(f"plugin {plugin!r} {did}, which stays. Rename the plugin's command, "
                          f"or disable the plugin with {DISABLE_ENV}={plugin}",
                          PluginWarning, stacklevel=2)
            cli.commands[name] = command
        added = sorted(name for name in cli.commands if name not in owned)
        owned.update({name: (cli.commands[name], plugin) for name in added})
        if added and plugin in pm.info:  # listed by `adapterkit plugins` as what it registers
            pm.info[plugin].registers.setdefault("command", []).extend(added)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    click.echo(f"adapterkit: warning: {message}", err=True)


def _quiet_libraries() -> None:
    """Keep the terminal for adapterkit's own output: no per-tensor progress bars, deprecation
    chatter or optional-kernel notices from the libraries underneath (errors still show)."""
    import logging
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for name in ("bitsandbytes", "peft", "trl", "datasets", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*pin_memory.*")


def _command_name(args: list[str]) -> str | None:
    """The subcommand in ``args``, skipping root options (``--home PATH``)."""
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--home":
            skip = True
        elif not arg.startswith("-"):
            return arg
    return None


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    _quiet_libraries()
    original = warnings.showwarning

    def show(message, category, *args: Any, **kwargs: Any) -> None:
        # adapterkit's own warnings (plugin, catalog, Hub) are for the user: one plain line.
        if category.__module__.startswith("adapterkit."):
            _show_warning(message, category, *args)
        else:
            original(message, category, *args, **kwargs)

    warnings.showwarning = show
    args = argv if argv is not None else sys.argv[1:]
    # install/uninstall never load plugins: a broken plugin can always be removed.
    safe = _command_name(args) in NO_PLUGIN_COMMANDS
    cli = build_cli(get_plugin_manager(entry_points=not safe, env=not safe))
    cli.main(args=args, prog_name="adapterkit")
