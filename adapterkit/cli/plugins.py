"""CLI commands for plugin authors and users: ``plugin new``, ``install``, ``uninstall``."""

from __future__ import annotations

import subprocess
import sys

import click

from adapterkit.plugin_api.scaffold import KINDS

#: Commands that must work even when an installed plugin is broken: they never load plugins.
NO_PLUGIN_COMMANDS = ("install", "uninstall")


@click.group("plugin")
def plugin_group() -> None:
    """Write your own plugins (see docs/plugins.md).

    \b
    Examples:
      adapterkit plugin new my-scorer --kind scorer
      adapterkit plugin new my-trainer --kind trainer --dir plugins
    """


@plugin_group.command("new")
@click.argument("name")
@click.option("--kind", type=click.Choice(KINDS), default="scorer", show_default=True,
              help="What the plugin adds.")
@click.option("--dir", "where", type=click.Path(file_okay=False), default=".",
              show_default=True, help="Folder to create adapterkit-NAME/ in.")
def plugin_new(name: str, kind: str, where: str) -> None:
    """Create adapterkit-NAME/: a plugin package with its entry point, module, README and a
    passing test. Install it with `adapterkit install -e adapterkit-NAME`. NAME may carry the
    `adapterkit-` prefix or not; the package is adapterkit-NAME either way.

    \b
    Examples:
      adapterkit plugin new my-scorer
      adapterkit plugin new adapterkit-my-trainer --kind trainer --dir plugins
    """
    from adapterkit.plugin_api.scaffold import scaffold

    root = scaffold(name, kind, where)
    click.echo(f"Created {root}/ ({kind} plugin). Next:\n"
               f"  adapterkit install -e {root}\n"
               f"  adapterkit plugins\n"
               f"  (cd {root} && python -m pytest)")


def _pip(args: list[str]) -> None:
    """Run pip with adapterkit's own interpreter, so plugins land where adapterkit looks."""
    result = subprocess.run([sys.executable, "-m", "pip", *args])
    if result.returncode:
        raise click.ClickException(f"pip {args[0]} failed (exit {result.returncode})")


@click.command("install")
@click.argument("packages", nargs=-1)
@click.option("-e", "--editable", "editables", multiple=True, type=click.Path(exists=True),
              help="Install a local plugin folder in editable mode (repeatable).")
@click.option("-U", "--upgrade", is_flag=True, help="Upgrade packages that are installed.")
@click.option("-q", "--quiet", is_flag=True, help="Less output from pip.")
def install_cmd(packages: tuple[str, ...], editables: tuple[str, ...], upgrade: bool,
                quiet: bool) -> None:
    """Install plugins (PyPI names, wheels or folders) into adapterkit's environment.

    \b
    Examples:
      adapterkit install adapterkit-my-scorer
      adapterkit install -e ./adapterkit-my-scorer
      adapterkit install -U adapterkit-my-scorer
    """
    if not packages and not editables:
        raise click.UsageError("name a package to install, or -e FOLDER")
    args = ["install", *packages]
    for path in editables:
        args += ["-e", path]
    if upgrade:
        args.append("--upgrade")
    if quiet:
        args.append("--quiet")
    _pip(args)


@click.command("uninstall")
@click.argument("packages", nargs=-1, required=True)
def uninstall_cmd(packages: tuple[str, ...]) -> None:
    """Uninstall plugins from adapterkit's environment (works even if they are broken).

    Name each by its plugin name (as `adapterkit plugins` and warnings show it) or its package
    name, with or without the `adapterkit-` prefix.

    \b
    Examples:
      adapterkit uninstall my-scorer
      adapterkit uninstall adapterkit-my-scorer
    """
    from adapterkit.plugin_api.manager import uninstall_name

    names = []
    for given in packages:
        name = uninstall_name(given)  # package metadata only: the plugin is never imported
        if name != given:
            click.echo(f"{given} is installed as {name}", err=True)
        if name not in names:
            names.append(name)
    _pip(["uninstall", "-y", *names])
