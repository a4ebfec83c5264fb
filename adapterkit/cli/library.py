"""CLI commands over the library: ``plugins``, ``list``, ``show``, ``rm``, ``tag``, ``import``,
``export``, ``push`` and ``pull`` (``base`` is in :mod:`adapterkit.cli.base`). None of them
imports torch unless it loads a model."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from adapterkit.cli.common import echo_json, library, say, size, table
from adapterkit.plugin_api.manager import PluginManager

# -- plugins --------------------------------------------------------------------------------

@click.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def plugins_cmd(ctx: click.Context, as_json: bool) -> None:
    """List installed plugins, their versions and what each registers.

    \b
    Examples:
      adapterkit plugins
      adapterkit plugins --json
    """
    pm: PluginManager = ctx.find_root().obj["plugins"]
    infos = [info.as_dict() for info in sorted(pm.info.values(), key=lambda i: i.name)]
    if as_json:
        echo_json(infos)
        return
    rows = [[i["name"], i["version"] or "-", _registers(i, pm)] for i in infos]
    click.echo(table(rows, ["PLUGIN", "VERSION", "REGISTERS"]))


def _registers(info: dict[str, Any], pm: PluginManager) -> str:
    """What one plugin adds: the items it registered, then its other hooks. A registration
    hook that added nothing (its items refused, or it failed: warned about above) says so;
    listing the hook's name alone read as if it had registered something."""
    parts = [f"{k}: {', '.join(v)}" for k, v in sorted(info["registers"].items())]
    kinds = {hook: registry.kind for hook in info["hooks"]
             if (registry := pm.registry_of(hook)) is not None}
    empty = [hook for hook, kind in kinds.items() if kind not in info["registers"]]
    if empty:
        parts.append(f"nothing registered by {', '.join(empty)}")
    others = [hook for hook in info["hooks"] if hook not in kinds]
    if others:
        parts.append(f"hooks: {', '.join(others)}")
    return "; ".join(parts) or "-"


# -- library --------------------------------------------------------------------------------

@click.command("list")
@click.option("--base", help="Only pocket books made on this base (name or fingerprint prefix).")
@click.option("--tag", help="Only pocket books with this tag.")
@click.option("--all-versions", is_flag=True, help="Every version, not only the latest.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def list_cmd(ctx: click.Context, base: str | None, tag: str | None, all_versions: bool,
             as_json: bool) -> None:
    """List pocket books in the library (latest version of each).

    \b
    Examples:
      adapterkit list
      adapterkit list --all-versions
      adapterkit list --base smollm2-135m --tag prod
      adapterkit list --json
    """
    lib = library(ctx)
    books = lib.list(base=base, tag=tag, all_versions=all_versions)
    if as_json:
        echo_json([b.as_dict() for b in books])
        return
    if not books:
        if not lib.home.exists():
            click.echo(f"No pocket books: the adapterkit home {lib.home} does not exist yet (the "
                       "first `adapterkit train`, `import` or `pull` makes it).", err=True)
        elif base or tag:
            wanted = " and ".join(f"{label} {value!r}" for label, value in
                                  (("base", base), ("tag", tag)) if value)
            hint = (" (--base takes a base's name or a prefix of its fingerprint, as the BASE "
                    "and FINGERPRINT columns show them, not a folder, file or revision)"
                    if base else "")
            click.echo(f"No pocket book matches {wanted}; `adapterkit list` shows them all"
                       f"{hint}.", err=True)
        else:
            click.echo("No pocket books yet. Train one with `adapterkit train`, or add a PEFT "
                       "adapter with `adapterkit import FOLDER --name NAME --base BASE`.",
                       err=True)
        return
    rows = [
        [f"{b.name}@{b.version}", str(b.versions), b.base_name, b.base_fingerprint[:12],
         b.method or "-", b.trainer or "-", ",".join(b.tags) or "-", size(b.size),
         b.created[:16].replace("T", " ")]
        for b in books
    ]
    click.echo(table(rows, ["POCKET BOOK", "VERSIONS", "BASE", "FINGERPRINT", "METHOD",
                             "TRAINER", "TAGS", "SIZE", "CREATED"]))


@click.command("show")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def show_cmd(ctx: click.Context, ref: str, as_json: bool) -> None:
    """Show one pocket book: REF is NAME (latest) or NAME@VERSION.

    \b
    Examples:
      adapterkit show triage
      adapterkit show triage@2 --json
    """
    book = library(ctx).get(ref)
    data = book.as_dict()
    if as_json:
        echo_json(data)
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
                         ("hyperparams", meta.hyperparameters),
                         ("metrics", {k: v for k, v in meta.metrics.items()
                                      if k != "loss_history"}),  # the curve is its PNG
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
              "on top of it or stack it (they are refused from then on, naming it; a stack "
              "saved by an earlier adapterkit records no member weights and would take "
              "whatever is saved under that name later: save it again).")
@click.pass_context
def rm_cmd(ctx: click.Context, ref: str, all_versions: bool, force: bool) -> None:
    """Remove a pocket book: NAME@VERSION, NAME (its latest version) or --all-versions.

    Version numbers are not given out again: a pocket book saved later as plain NAME takes
    the number after the highest NAME ever had, so NAME@V in a card, log or stack never comes
    to mean other weights (NAME@V given explicitly can put the same weights back).

    \b
    Examples:
      adapterkit rm triage@1
      adapterkit rm triage --all-versions
    """
    from adapterkit.library.names import parse_ref

    name = parse_ref(ref).name
    gone = library(ctx).remove(ref, all_versions=all_versions, force=force)
    click.echo("Removed " + ", ".join(f"{name}@{v}" for v in gone))


@click.command("doctor")
@click.option("--dry-run", is_flag=True, help="Only report; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def doctor_cmd(ctx: click.Context, dry_run: bool, as_json: bool) -> None:
    """Check the library and repair what crashes and hand edits left behind.

    \b
    orphan    a complete pocket book the catalog does not list   -> indexed
    missing   a catalog entry whose folder is gone               -> dropped
    outdated  a catalog entry that disagrees with its folder     -> re-indexed
    damaged   unreadable metadata, or files that no longer match
              the SHA-256 recorded at save time                  -> moved to quarantine/
    dangling  a saved stack whose member was removed             -> moved to quarantine/
    replaced  a pocket book trained on one whose name holds other
              weights than it was trained on                     -> reported, left as is
    leftover  a ref/ folder (DPO's reference copy) saved beside
              a pocket book by earlier versions                  -> moved to quarantine/
    stale     a work folder in tmp/ left by a dead process       -> removed
    catalog   a catalog file that fails SQLite's own check       -> rebuilt
    marks     a version-marks file (library/.versions-used.json)
              that does not read                                 -> kept beside, afresh

    Nothing is deleted but stale work folders. Exit code 0 when the library is (now)
    healthy, 1 when --dry-run found problems or some could not be repaired.

    \b
    Examples:
      adapterkit doctor --dry-run
      adapterkit doctor
      adapterkit doctor --json
    """
    from adapterkit.library.doctor import examine, render, to_json

    lib = library(ctx)
    report = examine(lib, repair=not dry_run)
    click.echo(to_json(report) if as_json else render(report))
    if report.problems and not report.repaired:
        ctx.exit(1)
    if report.repaired and examine(lib, repair=False).problems:
        click.echo("Some problems remain; run `adapterkit doctor --dry-run` to see them.",
                   err=True)
        ctx.exit(1)


@click.command("tag")
@click.argument("ref")
@click.argument("tag")
@click.option("--remove", is_flag=True, help="Remove the tag instead of adding it.")
@click.pass_context
def tag_cmd(ctx: click.Context, ref: str, tag: str, remove: bool) -> None:
    """Add TAG to a pocket book (NAME or NAME@VERSION), or --remove it.

    \b
    Examples:
      adapterkit tag triage@2 prod
      adapterkit tag triage@1 prod --remove
    """
    book = library(ctx).tag(ref, tag, remove=remove)
    click.echo(f"{book.ref}: tags {', '.join(book.meta.tags) or '-'}")


@click.command("import")
@click.argument("folder", type=click.Path())
@click.option("--name", required=True, help="Library name: NAME, or NAME@N for a new version.")
@click.option("--base", help="The base it was trained on (Hub id, folder, .gguf or alias). "
                             "Default: the base its adapterkit.json records (an export), else "
                             "base_model_name_or_path from its adapter_config.json.")
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

    A folder written by `adapterkit export` joins with its own record (method, trainer, data,
    metrics, base) once its files match the hashes that record holds, and with a new model
    card; its base is found on this machine by the recorded fingerprint or name.

    \b
    Examples:
      adapterkit import ./my-peft-adapter --name notes --base smollm2-135m
      adapterkit import ./my-peft-adapter --name notes@2 --base ./models/my-base
      adapterkit import out/triage --name triage-copy        # an export: base from its record
    """
    book = library(ctx).import_peft(folder, name, base=base, trust_pickle=trust_pickle)
    click.echo(f"Imported {book.ref} (base {book.meta.base['name']}, "
               f"fingerprint {book.meta.base_fingerprint[:12]})")


@click.command("export")
@click.argument("ref")
@click.argument("dest", type=click.Path())
@click.option("--merged", is_flag=True,
              help="Fold the pocket book (or stack) into its base: a standalone transformers "
                   "model. A 4-bit base is dequantized first; the result is checked against "
                   "the unmerged model before it is written.")
@click.option("--format", "fmt", type=click.Choice(["peft", "gguf"]), default="peft",
              show_default=True,
              help="gguf: a llama.cpp LoRA adapter GGUF (with --merged: the whole model as one "
                   "GGUF, tokenizer and chat template included), for llama.cpp, Ollama and "
                   "LM Studio. Prints the Ollama Modelfile lines.")
@click.option("--quantize", metavar="TYPE",
              help="With --merged --format gguf: f16 (default), f32, bf16, q8_0 (llama.cpp's "
                   "converter), or q4_0, q4_k_m, q5_k_m, q6_k... (llama.cpp's quantizer).")
@click.option("--tolerance", type=float, default=1e-2, show_default=True,
              help="Largest logit difference merged vs unmerged accepted (with --merged).")
@click.pass_context
def export_cmd(ctx: click.Context, ref: str, dest: str, merged: bool, fmt: str,
               quantize: str | None, tolerance: float) -> None:
    """Write a pocket book to DEST as a plain PEFT folder (PEFT, vLLM, TGI, LoRAX load it),
    with --format gguf as a llama.cpp LoRA adapter, or with --merged as a standalone model.

    \b
    Examples:
      adapterkit export triage out/triage                 # a plain PEFT folder
      adapterkit export triage@2 out/triage-v2
      adapterkit export triage out/triage-gguf --format gguf
      adapterkit export triage out/triage-model --merged
      adapterkit export triage out/triage-q4 --merged --format gguf --quantize q4_k_m
    """
    before = _written(Path(dest))  # (a DEST that was there already is no sign of this export)
    try:
        _export(ctx, ref, dest, merged=merged, fmt=fmt, quantize=quantize, tolerance=tolerance)
    except KeyboardInterrupt:
        # every export fills a hidden sibling of DEST and renames it into place last
        # (adapterkit.files.new_folder), removing it when interrupted
        done = before is None and _written(Path(dest)) is not None
        say(f"Interrupted: {dest} was already written whole" if done
            else f"Interrupted: nothing was written to {dest}")
        sys.exit(130)


def _written(dest: Path) -> int | None:
    """An identity of a non-empty DEST (its inode), None where there is none: the export
    renames a whole folder into place, so a new identity means it was written."""
    try:
        return dest.stat().st_ino if dest.is_dir() and any(dest.iterdir()) else None
    except OSError:
        return None


def _export(ctx: click.Context, ref: str, dest: str, *, merged: bool, fmt: str,
            quantize: str | None, tolerance: float) -> None:
    """The body of ``export`` (see :func:`export_cmd`)."""
    from adapterkit.errors import ConfigError

    if quantize is not None and not (merged and fmt == "gguf"):
        raise ConfigError("--quantize applies to --merged --format gguf only (a LoRA GGUF is "
                          "written in float32, as llama.cpp's converter writes it)")
    if not merged and ctx.get_parameter_source("tolerance") == ParameterSource.COMMANDLINE:
        raise ConfigError("--tolerance applies to --merged only (it bounds how far the merged "
                          "model's logits may drift from the unmerged ones); without --merged "
                          "the LoRA is written as it is: leave --tolerance out")
    if fmt == "gguf":
        from adapterkit.runtime.gguf import export_gguf_lora, export_gguf_merged

        if merged:
            report = export_gguf_merged(library(ctx), ref, dest, quantize=quantize or "f16",
                                        tolerance=tolerance,
                                        plugins=ctx.find_root().obj["plugins"], progress=say)
            what = "merged into its base"
        else:
            report = export_gguf_lora(library(ctx), ref, dest, progress=say)
            what = "as a llama.cpp LoRA adapter"
        click.echo(f"Exported {ref} {what} to {report.path} ({size(report.size)}, "
                   f"{report.seconds:.1f} s)")
        click.echo("Ollama Modelfile:")
        click.echo("\n".join(f"  {line}" for line in report.modelfile))
        return
    if not merged:
        path = library(ctx).export(ref, dest)
        click.echo(f"Exported {ref} to {path}")
        return
    from adapterkit.runtime.export import export_merged

    report_hf = export_merged(library(ctx), ref, dest, tolerance=tolerance,
                              plugins=ctx.find_root().obj["plugins"],
                              progress=say)
    note = (f", dequantized from {report_hf.dequantized_from} first"
            if report_hf.dequantized_from else "")
    click.echo(f"Exported {ref} merged into its base to {report_hf.dest} "
               f"({report_hf.shards} shard(s){note}); max logit difference vs unmerged "
               f"{report_hf.max_logit_diff:.2e}")


# -- the Hub --------------------------------------------------------------------------------

@click.command("push")
@click.argument("ref")
@click.option("--repo", required=True, help="Hub repo OWNER/NAME (created if it does not exist).")
@click.option("--private", is_flag=True,
              help="Create the repo as private (an existing public repo is refused).")
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

    \b
    Examples:
      adapterkit push triage --repo alice/triage-lora
      adapterkit push triage@2 --repo alice/triage-lora --revision v2 --license apache-2.0
    """
    from adapterkit.library.hub import push

    result = push(library(ctx), ref, repo, private=private, revision=revision,
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
@click.option("--subfolder", metavar="FOLDER",
              help="The folder in the repo that holds the adapter (PEFT saves an adapter with "
                   "a non-default name in a folder of that name).")
@click.pass_context
def pull_cmd(ctx: click.Context, repo: str, name: str | None, base: str | None,
             trust_pickle: bool, subfolder: str | None) -> None:
    """Pull a PEFT LoRA repo (OWNER/NAME or OWNER/NAME@REVISION) into the library.

    Works for any PEFT LoRA repository, not only ones pushed by adapterkit. Files are verified
    against the hashes adapterkit.json records; pickled weights are refused unless trusted.

    \b
    Examples:
      adapterkit pull alice/triage-lora
      adapterkit pull alice/triage-lora@v2 --name triage-v2
      adapterkit pull someone/peft-lora --base HuggingFaceTB/SmolLM2-135M-Instruct
    """
    from adapterkit.library.hub import pull

    book = pull(library(ctx), repo, name=name, base=base, trust_pickle=trust_pickle,
                subfolder=subfolder)
    click.echo(f"Pulled {repo} as {book.ref} (base {book.meta.base.get('name')}, "
               f"fingerprint {book.meta.base_fingerprint[:12]})")
