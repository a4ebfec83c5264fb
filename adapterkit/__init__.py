"""adapterkit: one frozen base model, many swappable LoRA pocket books.

The public API is what ``__all__`` lists. Importing this package is cheap: nothing here imports
torch; the heavy functions (``load_base``...) import it when called.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .errors import (
    AdapterkitError,
    BaseLoadError,
    BaseMismatch,
    BaseNotFound,
    CatalogError,
    ConfigError,
    DataFormatError,
    InvalidAdapter,
    InvalidName,
    MissingDependency,
    NameTaken,
    PluginError,
    PocketBookNotFound,
    TargetModuleError,
    UnsafeWeights,
)
from .hookspecs import HOOK_VERSION, hookimpl
from .registry import AdapterMethod, DataFormat, MergeStrategy, Scorer, Trainer

__version__ = "0.1.0.dev0"

# name → module, imported on first access (PEP 562) so `import adapterkit` stays light.
_LAZY = {
    "Library": "library",
    "PocketBook": "library",
    "Summary": "library",
    "PocketBookMeta": "metadata",
    "Base": "base",
    "BaseStructure": "base",
    "load_base": "base",
    "describe_base": "base",
    "inspect_structure": "base",
    "check_targets": "base",
    "resolve_base": "resolve",
    "BaseSource": "resolve",
    "DEFAULT_BASE": "resolve",
    "fingerprint": "fingerprints",
    "get_plugin_manager": "plugins",
    "default_plugin_manager": "plugins",
    "PluginManager": "plugins",
    "PluginWarning": "plugins",
    "read_adapter": "adapters",
    "train": "training",
    "TrainOptions": "options",
    "build_options": "options",
    "TrainJob": "training",
    "TrainResult": "training",
    "load_data": "data",
    "ForgettingGuard": "guard",
    "attach": "session",
    "Session": "session",
    "open_session": "session",
    "check_fits": "adapters",
    "parse_ref": "names",
    "validate_name": "names",
}

__all__ = [
    "HOOK_VERSION", "hookimpl", "AdapterMethod", "DataFormat", "MergeStrategy", "Scorer",
    "Trainer",
    "AdapterkitError", "BaseLoadError", "BaseMismatch", "BaseNotFound", "CatalogError",
    "ConfigError", "DataFormatError",
    "InvalidAdapter", "InvalidName", "MissingDependency", "NameTaken", "PluginError",
    "PocketBookNotFound", "TargetModuleError", "UnsafeWeights", "__version__", "open", *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name == "open":  # adapterkit.open(base): a session (kept lazy; torch loads on call)
        return import_module(".session", __name__).open_session
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'adapterkit' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from .adapters import check_fits, read_adapter
    from .base import (Base, BaseStructure, check_targets, describe_base, inspect_structure,
                       load_base)
    from .data import load_data
    from .fingerprints import fingerprint
    from .guard import ForgettingGuard
    from .options import TrainOptions, build_options
    from .session import Session, attach, open_session
    open = open_session
    from .training import TrainJob, TrainResult, train
    from .library import Library, PocketBook, Summary
    from .metadata import PocketBookMeta
    from .names import parse_ref, validate_name
    from .plugins import PluginManager, PluginWarning, default_plugin_manager, get_plugin_manager
    from .resolve import DEFAULT_BASE, BaseSource, resolve_base
