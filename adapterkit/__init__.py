"""adapterkit: one frozen base model, many swappable LoRA pocket books.

The public API is what ``__all__`` lists. Importing this package is cheap: nothing here imports
torch; the heavy functions (``load_base``...) import it when called.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from adapterkit.errors import (
    AdapterkitError,
    BaseLoadError,
    BaseMismatch,
    BaseNotFound,
    BesidesTaken,
    CatalogError,
    ConfigError,
    DataFormatError,
    InexactAdapter,
    InvalidAdapter,
    InvalidName,
    MissingDependency,
    NameTaken,
    PluginError,
    PocketBookNotFound,
    RunStateError,
    TargetModuleError,
    UnsafeWeights,
)
from adapterkit.plugin_api.hookspecs import HOOK_VERSION, hookimpl
from adapterkit.plugin_api.registry import AdapterMethod, DataFormat, MergeStrategy, Scorer, Trainer

__version__ = "0.1.0.dev0"

# name → module, imported on first access (PEP 562) so `import adapterkit` stays light.
_LAZY = {
    "Library": "library.store",
    "PocketBook": "library.store",
    "Summary": "library.store",
    "PocketBookMeta": "library.metadata",
    "Base": "base.load",
    "BaseStructure": "base.load",
    "load_base": "base.load",
    "describe_base": "base.load",
    "inspect_structure": "base.load",
    "check_targets": "base.load",
    "resolve_base": "base.resolve",
    "BaseSource": "base.resolve",
    "DEFAULT_BASE": "base.resolve",
    "fingerprint": "base.fingerprints",
    "get_plugin_manager": "plugin_api.manager",
    "default_plugin_manager": "plugin_api.manager",
    "PluginManager": "plugin_api.manager",
    "PluginWarning": "plugin_api.manager",
    "read_adapter": "library.peft_folder",
    "train": "training.run",
    "TrainOptions": "training.options",
    "build_options": "training.options",
    "build_trainer_options": "training.options",
    "TrainJob": "training.job",
    "TrainResult": "training.job",
    "load_data": "training.data",
    "ForgettingGuard": "training.guard",
    "peft_model": "runtime.peft_model",
    "Session": "runtime.session",
    "open_session": "runtime.session",
    "check_fits": "library.peft_folder",
    "parse_ref": "library.names",
    "validate_name": "library.names",
    "MergeInput": "lora.combine",
    "MergeOutput": "lora.combine",
    "merge": "lora.combine",
    "stack": "lora.combine",
    "concatenate": "lora.combine",
    "RewardScorer": "training.reward",
    "Factors": "lora.factors",
    "plain_config": "lora.factors",
    "pad": "lora.factors",
    "tensors_of": "lora.factors",
    "loadable_together": "runtime.peft_model",
    "members_of": "runtime.peft_model",
    "WeightOverflow": "lora.factors",
}

__all__ = [
    "HOOK_VERSION", "hookimpl", "AdapterMethod", "DataFormat", "MergeStrategy", "Scorer",
    "Trainer",
    "AdapterkitError", "BaseLoadError", "BaseMismatch", "BaseNotFound", "BesidesTaken",
    "CatalogError",
    "ConfigError", "DataFormatError", "InexactAdapter",
    "InvalidAdapter", "InvalidName", "MissingDependency", "NameTaken", "PluginError",
    "PocketBookNotFound", "RunStateError", "TargetModuleError", "UnsafeWeights", "__version__", "open", *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name == "open":  # adapterkit.open(base): a session (kept lazy; torch loads on call)
        return import_module("adapterkit.runtime.session").open_session
    if name in _LAZY:
        value = getattr(import_module(f"adapterkit.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'adapterkit' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from adapterkit.base.fingerprints import fingerprint
    from adapterkit.base.load import (
        Base,
        BaseStructure,
        check_targets,
        describe_base,
        inspect_structure,
        load_base,
    )
    from adapterkit.library.peft_folder import check_fits, read_adapter
    from adapterkit.lora.combine import MergeInput, MergeOutput, concatenate, merge, stack
    from adapterkit.lora.factors import Factors, pad, plain_config, tensors_of
    from adapterkit.runtime.peft_model import loadable_together, peft_model
    from adapterkit.runtime.session import Session, open_session
    from adapterkit.training.data import load_data
    from adapterkit.training.guard import ForgettingGuard
    from adapterkit.training.options import TrainOptions, build_options, build_trainer_options
    open = open_session
    from adapterkit.base.resolve import DEFAULT_BASE, BaseSource, resolve_base
    from adapterkit.library.metadata import PocketBookMeta
    from adapterkit.library.names import parse_ref, validate_name
    from adapterkit.library.store import Library, PocketBook, Summary
    from adapterkit.plugin_api.manager import (
        PluginManager,
        PluginWarning,
        default_plugin_manager,
        get_plugin_manager,
    )
    from adapterkit.training.job import TrainJob, TrainResult
    from adapterkit.training.run import train
