"""Import an example or a benchmark script (``examples/``, ``benchmarks/``) as a module, its
folder on ``sys.path`` as when it runs (the scripts import their neighbours by name)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(folder: str, name: str) -> ModuleType:
    path = str(ROOT / folder)
    if path not in sys.path:
        sys.path.insert(0, path)
    return importlib.import_module(name)
