"""The hook contract between adapterkit and its plugins.

Every feature that is a *verb* — how a pocket book is built on a base (adapter methods), how it is
trained (trainers), how several are combined (merge strategies), which data shapes are read
(data formats), extra CLI commands — is contributed by a plugin through these hooks. The
built-in ones in ``plugins/`` use exactly this contract and nothing else, so they are the model
to copy.

A plugin is a module (or object) with functions decorated by ``adapterkit.hookimpl`` and named
after the hooks below. It is found through the ``adapterkit`` entry-point group::

    [project.entry-points.adapterkit]
    my_plugin = "my_package.plugin_module"

or, without installing, through ``ADAPTERKIT_LOAD_PLUGINS=path/to/plugin.py,other.module``.

Calling rules, valid for every hook:

* Hooks are called with **keyword arguments**, so a plugin may accept only the arguments it
  needs, and a new argument added later never breaks it.
* Registration hooks receive a ``register`` callback; each plugin's hook is called on its own,
  so one that raises produces a warning naming the plugin, and the others still register.
* Registration hooks run at start-up of every command: they must be cheap and must not import
  torch, transformers or peft. Import those inside the registered object's methods.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:  # pragma: no cover - typing only
    import click

    from adapterkit.library.store import PocketBook
    from adapterkit.plugin_api.registry import (
        AdapterMethod,
        DataFormat,
        MergeStrategy,
        Scorer,
        Trainer,
    )

#: Version of this hook contract. Bumped when a hook changes incompatibly; a plugin may declare
#: ``ADAPTERKIT_HOOK_VERSION = N`` at module level and is warned about (not crashed) on mismatch.
HOOK_VERSION = 1

hookspec = pluggy.HookspecMarker("adapterkit")
hookimpl = pluggy.HookimplMarker("adapterkit")


@hookspec
def register_methods(register: Callable[[AdapterMethod], None]) -> None:
    """Register adapter methods: how a pocket book is built on a base.

    :param register: call it with an :class:`adapterkit.AdapterMethod` instance, once per method.

    A method decides how the base is loaded (e.g. 4-bit NF4 for ``qlora``), how it is prepared for
    training, and which PEFT config builds the pocket book. Built-ins: ``lora``, ``qlora``.

    .. versionadded:: 0.1
    """


@hookspec
def register_trainers(register: Callable[[Trainer], None]) -> None:
    """Register trainers: training objectives that turn data into a pocket book.

    :param register: call it with an :class:`adapterkit.Trainer` instance, once per trainer.

    Trainers are independent of methods: any registered trainer can train any registered method,
    so combinations come free. Built-ins (in their own plugins): ``sft``, ``dpo``, ``reward``,
    ``rlhf``. A trainer with ``head = "reward"`` makes reward pocket books (LoRA + scalar head).
    A trainer declares what it acts on (``uses_guard``, ``packs``); the core refuses those
    options for a trainer that does not.

    .. versionadded:: 0.1
    """


@hookspec
def register_merge_strategies(register: Callable[[MergeStrategy], None]) -> None:
    """Register merge strategies: ways of combining several pocket books into one.

    :param register: call it with an :class:`adapterkit.MergeStrategy` instance.

    .. versionadded:: 0.1
    """


@hookspec
def register_data_formats(register: Callable[[DataFormat], None]) -> None:
    """Register data formats: row shapes a trainer can read (e.g. ``alpaca``).

    :param register: call it with an :class:`adapterkit.DataFormat` instance.

    A format recognises rows by their columns and converts each row into one of the standard
    shapes (``text``; ``prompt`` + ``completion``; ``messages``; ``prompt`` + ``chosen`` +
    ``rejected``).

    .. versionadded:: 0.1
    """


@hookspec
def register_scorers(register: Callable[[Scorer], None]) -> None:
    """Register scorers for generated answers (``adapterkit eval --scorer NAME``).

    :param register: call it with an :class:`adapterkit.Scorer` instance.

    Built-ins: ``exact_match``, ``normalized_match``.

    .. versionadded:: 0.1
    """


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add commands to the ``adapterkit`` CLI.

    :param cli: the root click group; use ``@cli.command()`` or ``cli.add_command(...)``.

    Import heavy dependencies inside the command function, never at module level, so that
    ``adapterkit --help`` stays fast.

    .. versionadded:: 0.1
    """


@hookspec
def pocket_book_saved(pocket_book: PocketBook) -> None:
    """Called after a pocket book has been saved into the library, atomically and completely.

    :param pocket_book: the saved entry (name, version, path, metadata).

    Use it to index, notify or mirror. An exception here is reported as a warning naming the
    plugin and never undoes the save.

    .. versionadded:: 0.1
    """


@hookspec
def pocket_book_removed(name: str, version: int) -> None:
    """Called after a pocket book version has been removed from the library.

    .. versionadded:: 0.1
    """
