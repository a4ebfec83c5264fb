"""The one exception tree of adapterkit.

Library code raises these; only the CLI turns them into a single line on stderr and a non-zero
exit. Every message says what went wrong *and* what to do next. Anything else that escapes is
our bug, and shows as a traceback.
"""

from __future__ import annotations


class AdapterkitError(Exception):
    """Base class: a problem the user can fix (bad input, missing file, name clash...)."""


class InvalidName(AdapterkitError, ValueError):
    """A pocket-book name or reference that cannot be used (path separators, too long...)."""


class PocketBookNotFound(AdapterkitError, LookupError):
    """No pocket book (or no such version of it) in the library."""


class NameTaken(AdapterkitError):
    """Saving would overwrite an existing pocket book; adapterkit never does that silently.
    ``reason``: why, without the advice (another name, a new version) the message gives,
    for a caller whose user names something else (a run's name, not the one refused)."""

    def __init__(self, message: str = "", *, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message


class BaseNotFound(AdapterkitError):
    """The base model named by the user cannot be found or resolved."""


class BaseLoadError(AdapterkitError):
    """The base exists but cannot be read (truncated GGUF, corrupt safetensors, bad config)."""


class BaseMismatch(AdapterkitError):
    """A pocket book does not fit the base it is used with (fingerprint, modules or shapes).

    ``mismatch`` is what does not fit without the advice the message ends with, for a caller
    whose advice differs (a server, where ``--force`` does not apply)."""

    def __init__(self, message: str, *, mismatch: str | None = None) -> None:
        super().__init__(message)
        self.mismatch = mismatch or message


class InvalidAdapter(AdapterkitError):
    """A folder that is not a usable PEFT LoRA adapter."""


class InexactAdapter(InvalidAdapter):
    """A sound adapter that this path (a session, the server) cannot apply exactly as PEFT
    does (DoRA, a trained bias, ...): the request, not the file, is what cannot be served."""


class UnsafeWeights(AdapterkitError):
    """Pickled weights, refused unless the user explicitly trusts their source."""


class TargetModuleError(AdapterkitError):
    """LoRA target modules that match no linear layer of the base."""


class MissingDependency(AdapterkitError):
    """An optional dependency (bitsandbytes, gguf...) is needed but not installed."""


class PluginError(AdapterkitError):
    """Unknown plugin-provided name (method, trainer...) or a plugin that misbehaves."""


class CatalogError(AdapterkitError):
    """The library catalog cannot be used and could not be rebuilt."""


class DataFormatError(AdapterkitError):
    """A data file that cannot be read or does not have the shape a trainer needs."""


class ConfigError(AdapterkitError):
    """Invalid training options or recipe file (all problems are reported at once)."""


class BesidesTaken(ConfigError):
    """A pocket book a run saves besides its own (``Trainer.also_saves``: rlhf's
    ``NAME-reward``) is in the library already, or refused there: the run would stop as it
    came to save it. ``name`` is that pocket book; ``offers_reuse``: the message offers to use
    it (through the trainer's ``reuse_option``), and ``then`` how that run goes on:
    ``"resume"`` (``--resume``), ``"fresh"`` (without it), ``"restart"``, or None (a new run's
    as it is). The message says the ways on."""

    def __init__(self, message: str, name: str = "", offers_reuse: bool = False,
                 then: str | None = None) -> None:
        super().__init__(message)
        self.name, self.offers_reuse, self.then = name, offers_reuse, then


class LaunchError(AdapterkitError):
    """A run on several processes or machines that could not start or that a rank ended
    (the message names the rank and what happened; every rank was stopped)."""


class RunStateError(ConfigError):
    """An interrupted run of the name is in the way (pass --resume or --restart), or there is
    none to resume."""


class AdapterWarning(UserWarning):
    """Something about an adapter the user should know that does not stop the work (an
    untrained adapter, a base other than the one its config names)."""


class QueueFull(AdapterkitError):
    """The server's queue of waiting requests is full: retry after a moment (HTTP 429)."""


class ServerError(AdapterkitError):
    """An ``adapterkit serve`` server that cannot be reached, or that answered with an error
    (the message is the server's own; ``code`` its OpenAI error code, e.g.
    ``context_length_exceeded``, where it gave one)."""

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class QuickstartError(AdapterkitError):
    """The quickstart cannot go on: its data is missing from the install, part two has no
    triage pocket book to build on, or a pocket book it made drifts from plain PEFT."""
