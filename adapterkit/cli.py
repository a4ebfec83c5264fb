"""The ``adapterkit`` command line: a thin layer over the Python API.

Built by a function (:func:`build_cli`) from a plugin manager, so tests build fresh CLIs and
plugins add commands without import-time side effects. Library errors
(:class:`~adapterkit.errors.AdapterkitError`) become one line on stderr and exit code 1; a
traceback means a bug of ours. Commands that need torch import it inside their body, so
``--help``, ``list``, ``show`` and ``plugins`` start fast.
"""

from __future__ import annotations

import json
import sys
import warnings
from typing import Any

import click

from .errors import AdapterkitError
from .library import Library
from .plugins import PluginManager, get_plugin_manager


class _Group(click.Group):
    """Turns our exceptions into one-line click errors, for every (sub)command."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AdapterkitError as exc:
            raise click.ClickException(str(exc)) from None


_Group.group_class = _Group


def _library(ctx: click.Context) -> Library:
    obj = ctx.find_root().obj
    return Library(obj["home"], plugins=obj["plugins"])


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _table(rows: list[list[str]], headers: list[str]) -> str:
    """Plain aligned columns: fast for 10,000 rows (rich tables are not), and grep-friendly."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def build_cli(pm: PluginManager) -> click.Group:
    """The root ``adapterkit`` command with core commands and every plugin's commands."""

    @click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
    @click.option("--home", type=click.Path(file_okay=False), envvar="ADAPTERKIT_HOME",
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
        ctx.obj = {"home": home, "plugins": pm}

    from .cli_plugins import install_cmd, plugin_group, uninstall_cmd
    from .cli_session import chat_cmd, merge_cmd, stack_cmd, swap_cmd
    from .cli_train import eval_cmd, generate_cmd, train_cmd

    for command in (plugins_cmd, list_cmd, show_cmd, rm_cmd, tag_cmd, import_cmd, export_cmd,
                    base_group, train_cmd, eval_cmd, generate_cmd, push_cmd, pull_cmd,
                    swap_cmd, chat_cmd, stack_cmd, merge_cmd, plugin_group, install_cmd,
                    uninstall_cmd):
        cli.add_command(command)
    pm.call_each("register_commands", cli=cli)
    return cli


# -- plugins --------------------------------------------------------------------------------

@click.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def plugins_cmd(ctx: click.Context, as_json: bool) -> None:
    """List installed plugins, their versions and what each registers."""
    pm: PluginManager = ctx.find_root().obj["plugins"]
    infos = [info.as_dict() for info in sorted(pm.info.values(), key=lambda i: i.name)]
    if as_json:
        _echo_json(infos)
        return
    rows = [
        [i["name"], i["version"] or "-",
         "; ".join(f"{k}: {', '.join(v)}" for k, v in sorted(i["registers"].items()))
         or ", ".join(i["hooks"]) or "-"]
        for i in infos
    ]
    click.echo(_table(rows, ["PLUGIN", "VERSION", "REGISTERS"]))


# -- library --------------------------------------------------------------------------------

@click.command("list")
@click.option("--base", help="Only pocket books made on this base (name or fingerprint prefix).")
@click.option("--tag", help="Only pocket books with this tag.")
@click.option("--all-versions", is_flag=True, help="Every version, not only the latest.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def list_cmd(ctx: click.Context, base: str | None, tag: str | None, all_versions: bool,
             as_json: bool) -> None:
    """List pocket books in the library (latest version of each)."""
    books = _library(ctx).list(base=base, tag=tag, all_versions=all_versions)
    if as_json:
        _echo_json([b.as_dict() for b in books])
        return
    if not books:
        click.echo("No pocket books yet. Train one with `adapterkit train`, or add a PEFT "
                   "adapter with `adapterkit import FOLDER --name NAME --base BASE`.", err=True)
        return
    rows = [
        [f"{b.name}@{b.version}", str(b.versions), b.base_name, b.base_fingerprint[:12],
         b.method or "-", b.trainer or "-", ",".join(b.tags) or "-", _size(b.size),
         b.created[:16].replace("T", " ")]
        for b in books
    ]
    click.echo(_table(rows, ["POCKET BOOK", "VERSIONS", "BASE", "FINGERPRINT", "METHOD",
                             "TRAINER", "TAGS", "SIZE", "CREATED"]))


@click.command("show")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def show_cmd(ctx: click.Context, ref: str, as_json: bool) -> None:
    """Show one pocket book: REF is NAME (latest) or NAME@VERSION."""
    book = _library(ctx).get(ref)
    data = book.as_dict()
    if as_json:
        _echo_json(data)
        return
    meta = book.meta
    lines = [
        f"{book.ref}  ({meta.kind}, {meta.method}" + (f", trained with {meta.trainer})"
                                                       if meta.trainer else ")"),
        f"  path:        {book.path}",
        f"  base:        {meta.base.get('name', '?')}  fingerprint {meta.base_fingerprint}",
        "  provenance:  " + ", ".join(f"{k}={v}" for k, v in
                                         sorted(meta.base.get("provenance", {}).items())),
        f"  created:     {meta.created}",
        f"  tags:        {', '.join(meta.tags) or '-'}",
    ]
    for label, value in (("parents", ", ".join(meta.parents)),
                         ("on top of", " + ".join(meta.stacked_on)), ("data", meta.data),
                         ("hyperparams", meta.hyperparameters), ("metrics", meta.metrics),
                         ("source", meta.source)):
        if value:
            text = value if isinstance(value, str) else ", ".join(
                f"{k}={v}" for k, v in sorted(value.items()))
            lines.append(f"  {label + ':':<13}{text}")
    click.echo("\n".join(lines))


@click.command("rm")
@click.argument("ref")
@click.option("--all-versions", is_flag=True, help="Remove every version of NAME.")
@click.option("--force", is_flag=True, help="Remove it even if other pocket books are trained "
              "on top of it or stack it (they stop working).")
@click.pass_context
def rm_cmd(ctx: click.Context, ref: str, all_versions: bool, force: bool) -> None:
    """Remove a pocket book: NAME@VERSION, NAME (its latest version) or --all-versions."""
    from .names import parse_ref

    name = parse_ref(ref).name
    gone = _library(ctx).remove(ref, all_versions=all_versions, force=force)
    click.echo("Removed " + ", ".join(f"{name}@{v}" for v in gone))


@click.command("tag")
@click.argument("ref")
@click.argument("tag")
@click.option("--remove", is_flag=True, help="Remove the tag instead of adding it.")
@click.pass_context
def tag_cmd(ctx: click.Context, ref: str, tag: str, remove: bool) -> None:
    """Add TAG to a pocket book (NAME or NAME@VERSION), or --remove it."""
    book = _library(ctx).tag(ref, tag, remove=remove)
    click.echo(f"{book.ref}: tags {', '.join(book.meta.tags) or '-'}")


@click.command("import")
@click.argument("folder", type=click.Path())
@click.option("--name", required=True, help="Library name: NAME, or NAME@N for a new version.")
@click.option("--base", help="The base it was trained on (Hub id, folder, .gguf or alias). "
                             "Default: base_model_name_or_path from its adapter_config.json.")
@click.option("--trust-pickle", is_flag=True,
              help="Accept pickled adapter_model.bin weights (they can run code: only for "
                   "files you made or trust). They are converted to safetensors.")
@click.pass_context
def import_cmd(ctx: click.Context, folder: str, name: str, base: str | None,
               trust_pickle: bool) -> None:
    """Add an adapter made with plain PEFT to the library.

    The adapter is checked against the base first — its target modules must exist, its tensor
    shapes and vocabulary must match — because PEFT would load a mismatched adapter with only a
    warning and then answer exactly like the plain base.
    """
    book = _library(ctx).import_peft(folder, name, base=base, trust_pickle=trust_pickle)
    click.echo(f"Imported {book.ref} (base {book.meta.base['name']}, "
               f"fingerprint {book.meta.base_fingerprint[:12]})")


@click.command("export")
@click.argument("ref")
@click.argument("dest", type=click.Path())
@click.option("--merged", is_flag=True,
              help="Fold the pocket book (or stack) into its base: a standalone transformers "
                   "model. A 4-bit base is dequantized first; the result is checked against "
                   "the unmerged model before it is written.")
@click.option("--tolerance", type=float, default=1e-2, show_default=True,
              help="Largest logit difference merged vs unmerged accepted (with --merged).")
@click.pass_context
def export_cmd(ctx: click.Context, ref: str, dest: str, merged: bool, tolerance: float) -> None:
    """Write a pocket book to DEST as a plain PEFT folder (PEFT, vLLM, TGI, LoRAX load it),
    or with --merged as a standalone model."""
    if not merged:
        path = _library(ctx).export(ref, dest)
        click.echo(f"Exported {ref} to {path}")
        return
    from .export import export_merged

    report = export_merged(_library(ctx), ref, dest, tolerance=tolerance,
                           plugins=ctx.find_root().obj["plugins"],
                           progress=lambda m: click.echo(m, err=True))
    note = f", dequantized from {report.dequantized_from} first" if report.dequantized_from else ""
    click.echo(f"Exported {ref} merged into its base to {report.dest} ({report.shards} shard(s)"
               f"{note}); max logit difference vs unmerged {report.max_logit_diff:.2e}")


# -- the Hub --------------------------------------------------------------------------------

@click.command("push")
@click.argument("ref")
@click.option("--repo", required=True, help="Hub repo OWNER/NAME (created if it does not exist).")
@click.option("--private", is_flag=True, help="Create the repo as private.")
@click.option("--revision", help="Branch to push to (created if needed; default main).")
@click.option("--message", help="Commit message.")
@click.option("--license", "license_", help="License for the card's YAML header (e.g. apache-2.0).")
@click.pass_context
def push_cmd(ctx: click.Context, ref: str, repo: str, private: bool, revision: str | None,
             message: str | None, license_: str | None) -> None:
    """Push pocket book REF (NAME or NAME@V) to the Hugging Face Hub as a PEFT repo.

    Uses your Hub login (`hf auth login`), HF_TOKEN and HF_ENDPOINT like any Hub tool; the
    token is never printed. The repo gets adapter_config.json, adapter_model.safetensors,
    adapterkit.json (with file hashes, checked on pull) and a model card.
    """
    from .hub import push

    result = push(_library(ctx), ref, repo, private=private, revision=revision,
                  message=message, license=license_)
    click.echo(f"Pushed {ref} to {result.repo_id} ({result.revision}): "
               f"{', '.join(result.files)}")
    click.echo(result.commit_url)


@click.command("pull")
@click.argument("repo")
@click.option("--name", help="Library name (default: the repo's name).")
@click.option("--base", help="The base you will use it with; checked against the adapter.")
@click.option("--trust-pickle", is_flag=True,
              help="Accept pickled adapter_model.bin weights (they can run code).")
@click.pass_context
def pull_cmd(ctx: click.Context, repo: str, name: str | None, base: str | None,
             trust_pickle: bool) -> None:
    """Pull a PEFT LoRA repo (OWNER/NAME or OWNER/NAME@REVISION) into the library.

    Works for any PEFT LoRA repository, not only ones pushed by adapterkit. Files are verified
    against the hashes adapterkit.json records; pickled weights are refused unless trusted.
    """
    from .hub import pull

    book = pull(_library(ctx), repo, name=name, base=base, trust_pickle=trust_pickle)
    click.echo(f"Pulled {repo} as {book.ref} (base {book.meta.base.get('name')}, "
               f"fingerprint {book.meta.base_fingerprint[:12]})")


# -- bases ----------------------------------------------------------------------------------

@click.group("base", cls=_Group)
def base_group() -> None:
    """Inspect base models."""


@base_group.command("show")
@click.argument("base")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def base_show(ctx: click.Context, base: str, as_json: bool) -> None:
    """Architecture, size, LoRA targets and fingerprint of BASE.

    BASE is a Hugging Face id (owner/name[@revision]), a local model folder, a .gguf file or an
    alias (smollm2-135m: the embedded SmolLM2-135M-Instruct). No weights are loaded.
    """
    from .base import describe_base

    info = describe_base(base, ctx.find_root().obj["home"],
                         progress=lambda m: click.echo(m, err=True))
    if as_json:
        _echo_json(info)
        return
    prov = ", ".join(f"{k}={v}" for k, v in sorted(info["provenance"].items()))
    click.echo("\n".join([
        f"{info['name']}",
        f"  architecture:  {info['architecture']} ({info['model_type']})",
        f"  parameters:    {info['parameters']:,}",
        f"  dtype:         {info['dtype']}",
        f"  vocabulary:    {info['vocab_size']:,}",
        f"  LoRA targets:  {', '.join(info['lora_targets'])}  (or all-linear)",
        f"  fingerprint:   {info['fingerprint']}",
        f"  provenance:    {prov}",
    ]))


# -- entry point ----------------------------------------------------------------------------

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
    from .cli_plugins import NO_PLUGIN_COMMANDS

    args = argv if argv is not None else sys.argv[1:]
    # install/uninstall never load plugins: a broken plugin can always be removed.
    safe = _command_name(args) in NO_PLUGIN_COMMANDS
    cli = build_cli(get_plugin_manager(entry_points=not safe, env=not safe))
    cli.main(args=args, prog_name="adapterkit")
