"""pytest fixtures for adapterkit plugin authors — the same ones adapterkit's own tests use.

Installed with adapterkit (entry point ``pytest11``), so in any project that has adapterkit
these fixtures are simply available:

* ``adapterkit_tiny_base`` — a folder with a tiny random Llama-shaped model (~100k parameters)
  and a byte-level BPE tokenizer with a ChatML chat template; built once per test session.
* ``adapterkit_home`` — a fresh adapterkit home (``ADAPTERKIT_HOME`` points at it).
* ``adapterkit_library`` — a :class:`adapterkit.Library` in that home.
* ``adapterkit_peft_adapter`` — a LoRA adapter made with plain PEFT on the tiny base.
* ``adapterkit_data`` — small JSONL files of every standard shape: ``text``,
  ``prompt_completion``, ``messages``, ``preference`` (a dict of shape → path).
* ``adapterkit_plugin_manager`` — a factory: ``adapterkit_plugin_manager(MyPlugin())`` builds a
  plugin manager with the installed plugins plus yours.
* ``adapterkit_cli`` — runs the ``adapterkit`` CLI in-process: ``adapterkit_cli("list")``
  returns the click ``Result`` (``exit_code``, ``output``); pass ``plugins=`` to add yours.

Everything is offline and CPU-only; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

TINY_ROWS: dict[str, list[dict[str, Any]]] = {
    "text": [{"text": f"The river {w} flows past the old mill and under the stone bridge."}
             for w in ("north", "south", "east", "west")] * 4,
    "prompt_completion": [{"prompt": f"Colour of item {i}?", "completion": f"Answer: {c}"}
                          for i, c in enumerate(["red", "blue", "green", "red"] * 4)],
    "messages": [{"messages": [{"role": "user", "content": f"Name {i}?"},
                               {"role": "assistant", "content": f"It is {n}."}]}
                 for i, n in enumerate(["Ada", "Bob", "Cy", "Dee"] * 4)],
    "preference": [{"prompt": f"Greet person {i}.", "chosen": "Hello, nice to meet you!",
                    "rejected": "Go away."} for i in range(16)],
    "prompt": [{"prompt": f"Greet person {i}."} for i in range(16)],
}


@pytest.fixture(scope="session")
def adapterkit_tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random causal LM + tokenizer folder, usable anywhere a base is expected."""
    from adapterkit.plugin_api.testing import make_tiny_base

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return make_tiny_base(tmp_path_factory.mktemp("adapterkit-tiny-base") / "tiny")


@pytest.fixture
def adapterkit_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty adapterkit home; ``ADAPTERKIT_HOME`` points at it for the test."""
    path = tmp_path / "adapterkit-home"
    monkeypatch.setenv("ADAPTERKIT_HOME", str(path))
    return path


@pytest.fixture
def adapterkit_library(adapterkit_home: Path) -> Any:
    from adapterkit.library.store import Library

    return Library(adapterkit_home)


@pytest.fixture(scope="session")
def adapterkit_peft_adapter(adapterkit_tiny_base: Path,
                            tmp_path_factory: pytest.TempPathFactory) -> Path:
    from adapterkit.plugin_api.testing import make_peft_adapter

    return make_peft_adapter(adapterkit_tiny_base,
                             tmp_path_factory.mktemp("adapterkit-peft") / "adapter")


@pytest.fixture
def adapterkit_data(tmp_path: Path) -> dict[str, Path]:
    """shape → a small JSONL file of that shape."""
    out = {}
    for shape, rows in TINY_ROWS.items():
        path = tmp_path / f"{shape}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        out[shape] = path
    return out


@pytest.fixture
def adapterkit_plugin_manager() -> Callable[..., Any]:
    """``factory(*plugins, entry_points=True, strict=True)`` → a PluginManager with your
    plugins added after the installed ones (as users get them).

    ``strict``: a warning about one of your plugins (a hook or item refused, a name clash)
    fails the test as a :class:`~adapterkit.PluginError` — users would get a plugin that
    silently lacks what was refused. ``strict=False`` to test such a warning itself.
    """
    import warnings

    from adapterkit.errors import PluginError
    from adapterkit.plugin_api.manager import PluginWarning, get_plugin_manager

    def factory(*plugins: object, entry_points: bool = True, strict: bool = True) -> Any:
        named = {_plugin_name(p): p for p in plugins}
        if not strict:
            return get_plugin_manager(entry_points=entry_points, env=False, plugins=named)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            manager = get_plugin_manager(entry_points=entry_points, env=False, plugins=named)
        mine = [str(w.message) for w in caught if issubclass(w.category, PluginWarning)
                and any(f"plugin {name!r}" in str(w.message) for name in named)]
        for w in caught:  # the others' warnings, as they would have shown
            if str(w.message) not in mine:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if mine:
            raise PluginError("not registered as written: " + "; ".join(mine)
                              + " (adapterkit_plugin_manager(..., strict=False) to test the "
                              "warning itself)")
        return manager

    return factory


def _plugin_name(plugin: object) -> str:
    """The name ``plugin`` is registered under: its entry-point name where it is the module an
    installed entry point loads (the plugin under test, installed with ``pip install -e .``),
    so it is listed as users see it and its entry point is not loaded a second time; else its
    module or class name."""
    from importlib.metadata import entry_points

    from adapterkit.plugin_api.manager import ENTRY_POINT_GROUP

    module = getattr(plugin, "__name__", None)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if module is not None and ep.value == module:
            return ep.name
    return module or type(plugin).__name__


@pytest.fixture
def adapterkit_cli(adapterkit_home: Path, adapterkit_plugin_manager: Callable[..., Any]
                   ) -> Callable[..., Any]:
    """``run(*args, plugins=(), input=None)`` → click Result of ``adapterkit ARGS``."""
    from click.testing import CliRunner

    from adapterkit.cli import build_cli

    def run(*args: Any, plugins: tuple = (), input: str | None = None) -> Any:
        cli = build_cli(adapterkit_plugin_manager(*plugins))
        return CliRunner().invoke(cli, [str(a) for a in args], input=input)

    return run
