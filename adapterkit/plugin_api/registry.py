"""What plugins register: adapter methods, trainers, merge strategies, data formats.

Each is a small class a plugin subclasses (or instantiates) and hands to ``register``. They are
registries keyed by name — never chains of string comparisons — so a third party adds a method
or a trainer and every combination with the existing ones works at once.

Nothing here imports torch: registration happens at every CLI start-up.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from adapterkit.errors import PluginError
from adapterkit.plugin_api.option_types import options_class_problems

if TYPE_CHECKING:  # pragma: no cover
    from peft import PeftConfig

#: The standard shapes of training rows, which ``Trainer.data_shapes`` and ``DataFormat.shape``
#: name (their columns: :data:`adapterkit.training.data.SHAPES`, which keeps the same names).
STANDARD_SHAPES = ("text", "prompt_completion", "messages", "preference", "prompt")


def _not_implemented(item: Any, method: str) -> PluginError:
    """What a plugin's item that left out a method it must implement raises when it is called:
    one line naming it (a bare ``NotImplementedError`` would be a traceback)."""
    return PluginError(f"{getattr(item, 'kind', 'item')} {getattr(item, 'name', '?')!r} "
                       f"(class {type(item).__name__}) does not implement "
                       f"{method}(); its plugin must (see docs/plugins.md)")


class Registrable:
    """Common shape of everything a plugin registers: a unique ``name`` and a one-line help."""

    kind: ClassVar[str] = "item"
    name: str = ""
    description: str = ""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


class AdapterMethod(Registrable):
    """How a pocket book is built on a base (``lora``, ``qlora``, ...).

    A method chooses how the frozen base is loaded (``quantization``), prepares it for training,
    and builds the PEFT config of the new pocket book.
    """

    kind = "method"
    #: How the base must be loaded for this method: ``None`` (as stored), ``"4bit"`` or ``"8bit"``.
    quantization: str | None = None

    def peft_config(
        self,
        *,
        target_modules: list[str] | str,
        r: int = 16,
        alpha: int = 32,
        dropout: float = 0.05,
        **options: Any,
    ) -> PeftConfig:
        """Return the PEFT config that builds a new pocket book with this method."""
        raise _not_implemented(self, "peft_config")

    def prepare_base(self, model: Any, *, gradient_checkpointing: bool = False) -> Any:
        """Prepare the loaded base for training (e.g. k-bit preparation). Default: unchanged."""
        return model


class Trainer(Registrable):
    """A training objective that turns data into a pocket book (``sft``, ``dpo``, ``rlhf``...)."""

    kind = "trainer"
    #: Standard data shapes this trainer reads, e.g. ``("text", "prompt_completion", "messages")``
    #: (:data:`STANDARD_SHAPES`; registration refuses none or any other).
    data_shapes: tuple[str, ...] = ()
    #: What the new pocket book sits on: ``"causal-lm"`` (a policy that generates) or
    #: ``"reward"`` (a scalar head on the same base: a reward pocket book, which scores text).
    head: str = "causal-lm"
    #: Whether this trainer applies the forgetting guard: builds its transformers/TRL trainer
    #: from ``job.guarded(TrainerClass)`` (which adds the guard's KL term to the loss, scaled for
    #: gradient accumulation as the trainer's own loss; a loop of its own adds
    #: ``job.guard.penalty(model, step=OPTIMIZER_STEP)`` once per optimizer step) and passes
    #: ``job.callbacks`` to its loop. The core refuses
    #: ``forgetting_budget``/``guard_weight`` for a trainer that does not declare it.
    uses_guard: bool = False
    #: Whether this trainer acts on ``packing`` (``--packing``: several sequences per row, as
    #: TRL's ``SFTConfig(packing=...)``); the core refuses it for a trainer that does not.
    packs: bool = False
    #: Whether LoRA dropout (``--dropout``) acts in this trainer's steps. TRL's DPO, reward and
    #: KTO trainers switch every dropout of the model off (their ``disable_dropout``, on by
    #: default): a trainer built on one declares ``False``, and its runs then record dropout
    #: 0, as trained, and refuse any other ``--dropout`` instead of ignoring it.
    drops_out: bool = True
    #: Whether its pocket book gets a held-out figure from ``--eval-split``: the core's (task
    #: loss on held-out rows; a reward head's pair ranking) or, for preference pairs, the
    #: trainer's own evaluation in its log (DPO's loss; ``eval_strategy`` left on).
    #: ``--search`` ranks trials on that figure and refuses a trainer that declares ``False``.
    evaluates: bool = True
    #: The trainer's own options (``--set KEY=VALUE``, a recipe's ``trainer_options:``): a
    #: dataclass whose fields, with their types and defaults, are the options it takes (e.g.
    #: ``beta: float = 0.1``); document each with a ``#:`` comment. Before any work the core
    #: types what was given against it and reports every problem at once — unknown keys, wrong
    #: types, and what the dataclass finds itself (``__post_init__`` raising ``ValueError``, or
    #: ``check(self, options: TrainOptions) -> list[str]`` returning one line per problem) —
    #: then hands the instance to :meth:`train` as ``job.trainer_options``. ``None``: the
    #: trainer takes no trainer options, and any given is refused. Registration refuses options
    #: that are not a dataclass class, or whose fields are not of ``option_types.OPTION_TYPES`` or
    #: default to a value not of their type (:func:`options_class_problems`).
    options: type[Any] | None = None
    #: The field of :attr:`options` (a pocket book's name) that, set, makes a run use one
    #: already in the library instead of training the one :meth:`also_saves` names (built-in
    #: ``rlhf``: ``reward``). Where a run stopped after saving that book, the core offers it,
    #: spelled where the user is (``--set OPTION=NAME``, ``--reward NAME`` for ``reward``; a
    #: recipe's ``set: {OPTION: NAME}``, beside removing the book). ``None``: no such option,
    #: only removing it is offered. Registration refuses one that is not a ``str`` field.
    reuse_option: str | None = None
    #: The options a run given :attr:`reuse_option` refuses, as they configure only the
    #: training of the pocket book it then reuses (built-in ``rlhf``: ``reward_steps``,
    #: ``eval_split``, ``early_stopping``): the advice to reuse it says to drop those given.
    #: Fields of :attr:`options` or training options (:class:`~adapterkit.TrainOptions`);
    #: a name that is neither is never advised.
    reuse_drops: tuple[str, ...] = ()
    #: Training options this trainer uses where a run leaves them unset (``None``: no flag,
    #: recipe key or Python argument gave them), e.g. ``{"learning_rate": 1e-3}``: defaults
    #: measured for this objective (the built-in ``sft``'s: ``docs/defaults.md``). Anything a
    #: run sets wins; a ``guard_weight`` default applies only where the guard is on.
    defaults: ClassVar[dict[str, Any]] = {}

    def preflight(self, *, library: Any, name: str, options: Any, trainer_options: Any,
                  data: Any) -> None:
        """Refuse, before the base loads, what only this trainer knows is wrong (raise a
        :class:`adapterkit.ConfigError` or another adapterkit error): e.g. a pocket book its
        options name that the ``library`` lacks. Called with the run's resolved ``options``,
        its typed ``trainer_options`` and its ``data`` (:class:`adapterkit.training.data.Data`).
        Default: nothing to refuse."""

    def also_saves(self, *, name: str, trainer_options: Any) -> list[str]:
        """The names of the pocket books a run saved as ``name`` (``NAME`` or ``NAME@N``)
        saves besides it, given the run's typed ``trainer_options`` (``rlhf`` without a
        ``reward``: the ``NAME-reward`` it trains first through ``job.train_stage``). A run
        one of whose names the library holds is refused before the base loads, with the ways
        on (``reuse_option``, removing it); a recipe refuses, before anything trains, a stage
        whose name is one of them, or one taken in the library (so a name saved anew by every
        run cannot be one of them); a pipeline holds them from its start and hands them to the
        stage's run:
        save them from the thread that runs :meth:`train` (``job.train_stage``, or the
        library), where nothing else can. Default: none."""
        return []

    def train(self, **job: Any) -> Any:
        """Train and return the trained PEFT model plus metrics. Called with keyword arguments.

        Under several processes (``--processes N``, ``accelerate launch``, ``torchrun``) every
        rank calls it on its share of the data, and must end with the same weights: a
        transformers/TRL trainer built with ``job.training_arguments()`` averages gradients
        across ranks for you; a loop of your own must do it itself (accelerate's
        ``Accelerator``). The core checks: ranks that end apart save nothing, with that
        reason."""
        raise _not_implemented(self, "train")


class MergeStrategy(Registrable):
    """A way of combining several pocket books into one (``adapterkit merge --method NAME``)."""

    kind = "merge strategy"
    #: Whether weights may be negative (task negation); the core refuses them otherwise.
    allows_negative: bool = True
    #: Whether the strategy needs ``density`` in (0, 1] (TIES, DARE, magnitude pruning); the
    #: core refuses ``--density`` otherwise.
    uses_density: bool = False
    #: Whether the strategy chooses its result's rank from ``rank`` (SVD); the core refuses
    #: ``--rank`` otherwise.
    uses_rank: bool = False
    #: Whether the strategy draws random numbers (DARE), seeded with the ``seed`` it is given
    #: (default 0, recorded with the merge); the core refuses ``--seed`` otherwise.
    uses_seed: bool = False

    def merge(self, *, adapters: list[Any], weights: list[float], rank: int | None = None,
              density: float | None = None, base_model: Any = None, **options: Any) -> Any:
        """Combine ``adapters`` (:class:`adapterkit.lora.combine.MergeInput`) with ``weights``.

        :param rank: rank of the result, for strategies that choose one (SVD).
        :param base_model: a callable returning the base model, for strategies that need it.
        :param options: further keyword arguments a newer core may pass (accept ``**options``
            and ignore what you do not use), e.g. ``seed``: an integer for strategies that draw
            random numbers (DARE), so that the same merge gives the same weights; draw from a
            generator seeded with it, never from torch's unseeded global state.
        :returns: :class:`adapterkit.lora.combine.MergeOutput` (a PEFT config and its tensors).
        """
        raise _not_implemented(self, "merge")


class DataFormat(Registrable):
    """A row shape a trainer can read, converted to one of the standard shapes."""

    kind = "data format"
    #: Columns that identify this format; a file matches when it has all of them.
    columns: tuple[str, ...] = ()
    #: The standard shape rows are converted to: ``text``, ``prompt_completion``, ``messages``,
    #: ``preference`` or ``prompt`` (:data:`STANDARD_SHAPES`; registration refuses any other).
    shape: str = "text"

    def matches(self, columns: set[str]) -> bool:
        """True when a data file with these columns is in this format."""
        return bool(self.columns) and set(self.columns) <= set(columns)

    def convert(self, row: dict[str, Any]) -> dict[str, Any]:
        """Convert one row to the standard shape. Default: unchanged."""
        return row


class Scorer(Registrable):
    """Scores a generated answer against the reference (``adapterkit eval --scorer NAME``)."""

    kind = "scorer"

    def score(self, prediction: str, reference: str) -> float:
        """A score in [0, 1] for one answer."""
        raise _not_implemented(self, "score")


T = TypeVar("T", bound=Registrable)


@dataclass
class Entry(Generic[T]):
    """A registered object and the plugin that registered it."""

    item: T
    plugin: str


@dataclass
class Registry(Generic[T]):
    """Name → object for one kind, remembering which plugin owns each name."""

    kind: str
    base_class: type
    entries: dict[str, Entry[T]] = field(default_factory=dict)

    def add(self, item: Any, plugin: str) -> None:
        """Register ``item`` for ``plugin``; raise :class:`PluginError` on a bad item or a clash."""
        if not isinstance(item, self.base_class):
            raise PluginError(
                f"plugin {plugin!r} registered {item!r} as a {self.kind}, "
                f"but it is not an adapterkit.{self.base_class.__name__}"
            )
        name = getattr(item, "name", "")
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {plugin!r} registered a {self.kind} without a name")
        if name in self.entries:
            owner = self.entries[name].plugin
            raise PluginError(
                f"plugin {plugin!r} defines its {self.kind} name as `{name}` "
                f"but that name is already used by {owner!r}"
            )
        problem = _item_problem(item)
        if problem:  # refused now, not at the first run that would trip on it
            raise PluginError(f"plugin {plugin!r} cannot register {self.kind} {name!r}: {problem}")
        self.entries[name] = Entry(item, plugin)  # type: ignore[arg-type]

    def get(self, name: str) -> T:
        """The object registered as ``name``, or an error that lists the known names."""
        try:
            return self.entries[name].item
        except KeyError:
            known = ", ".join(sorted(self.entries)) or "none (are the plugins installed?)"
            raise PluginError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def names(self) -> list[str]:
        return sorted(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __iter__(self) -> Iterator[T]:
        return (e.item for e in self.entries.values())


#: kind → (method, how adapterkit calls it): each registered item must take those arguments.
_CALLS: dict[type, list[tuple[str, tuple[Any, ...], dict[str, Any]]]] = {
    AdapterMethod: [("peft_config", (), dict(target_modules=[], r=1, alpha=1, dropout=0.0))],
    Trainer: [("train", (), dict(job=None)),
              ("preflight", (), dict(library=None, name="", options=None, trainer_options=None,
                                     data=None))],
    MergeStrategy: [("merge", (), dict(adapters=[], weights=[], rank=None, density=None,
                                       base_model=None))],
    DataFormat: [("convert", ({},), {})],
    Scorer: [("score", ("", ""), {})],
}


def _signature_problem(item: Any) -> str:
    """A method adapterkit calls that cannot take the arguments adapterkit passes: told at
    registration, rather than as a ``TypeError`` from inside adapterkit in a user's run."""
    import inspect

    for kind, calls in _CALLS.items():
        if not isinstance(item, kind):
            continue
        for method, args, kwargs in calls:
            if getattr(type(item), method, None) is getattr(kind, method):
                continue  # not overridden: calling it says so (_not_implemented)
            try:
                inspect.signature(getattr(item, method)).bind(*args, **kwargs)
            except (TypeError, ValueError) as exc:
                given = ", ".join([*map(repr, args), *(f"{k}=" for k in kwargs)])
                return (f"its {method}() cannot be called as adapterkit calls it, "
                        f"{method}({given}): {exc}; take those arguments (end the list with "
                        "**_ to accept the ones it does not use)")
    return ""


def _reuse_problem(trainer: Trainer) -> str:
    """Why a trainer's ``reuse_option``/``reuse_drops`` could never be followed ('' if not):
    the core advises them as options to set or leave out. (Whether a name not of its options
    is a training option is not asked here, below the training package: one that is neither
    is never advised, ``adapterkit.training.reuse.drops_given``.)"""
    own = {f.name for f in dataclasses.fields(trainer.options)} \
        if trainer.options is not None else set()
    reuse, drops = trainer.reuse_option, trainer.reuse_drops
    if reuse is not None and (not isinstance(reuse, str) or reuse not in own
                              or not _takes_str(trainer.options, reuse)):
        return (f"reuse_option = {reuse!r} is not a field of its options that takes a pocket "
                "book's name (a str): name the option that takes the pocket book "
                "also_saves() names, or leave it None")
    if not isinstance(drops, (tuple, list)) or any(
            not isinstance(k, str) or not k.isidentifier() for k in drops):
        return (f"reuse_drops = {drops!r} is not a tuple of option names: name fields of its "
                "options or training options (TrainOptions)")
    return ""


def _takes_str(options: type[Any] | None, field_name: str) -> bool:
    """Whether ``options``' field takes a plain ``str`` (``str``, ``str | None``)."""
    import types
    import typing

    try:
        hint = typing.get_type_hints(options)[field_name]
    except Exception:  # (annotations that do not resolve are reported by the options' check)
        return False
    return hint is str or (typing.get_origin(hint) in (typing.Union, types.UnionType)
                           and str in typing.get_args(hint))


def _item_problem(item: Any) -> str:
    """Why ``item`` could never work, told to its plugin's author ('' when nothing is wrong):
    methods adapterkit cannot call, shapes no data file can have, options no value can be
    typed by, a ``reuse_option``/``reuse_drops`` no advice could follow."""
    shapes = ", ".join(STANDARD_SHAPES)
    called = _signature_problem(item)
    if called:
        return called
    if isinstance(item, Trainer):
        declared = item.data_shapes
        if not isinstance(declared, (tuple, list)) or not declared \
                or any(s not in STANDARD_SHAPES for s in declared):
            return (f"data_shapes = {declared!r} is not a tuple of the standard shapes it reads: "
                    f"name them from {shapes} (a DataFormat plugin converts other rows)")
        problems = options_class_problems(item.options) if item.options is not None else []
        if problems:
            return "; ".join(problems)
        return _reuse_problem(item)
    if isinstance(item, DataFormat) and item.shape not in STANDARD_SHAPES:
        return (f"shape = {item.shape!r} is not a standard shape: convert rows to one of "
                f"{shapes} and name it")
    return ""
