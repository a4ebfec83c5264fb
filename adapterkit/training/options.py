"""Training options: defaults, a YAML recipe, and command-line overrides — validated together.

Precedence is defaults < recipe file < flags. Every problem (unknown keys, wrong types, values
out of range) is collected and reported in one error, so a recipe is fixed in one pass. A
trainer's own options (``--set KEY=VALUE``, a recipe's ``trainer_options:``) are typed by the
dataclass the trainer declares (``Trainer.options``) and checked in the same way
(:func:`build_trainer_options`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin, get_type_hints

from adapterkit.errors import ConfigError, PluginError
from adapterkit.plugin_api.option_types import (
    coerce_option,
    describe_option,
    options_class_problems,
    without_none,
)
from adapterkit.training.tracking import tracker_problems, trackers_of

if TYPE_CHECKING:  # pragma: no cover
    from adapterkit.plugin_api.registry import Trainer


@dataclass
class TrainOptions:
    """Everything that shapes a training run (also the keys of a ``--config`` recipe).

    The fields are ``adapterkit train``'s options under their keyword names (``--max-steps``
    is ``max_steps``; ``--rank`` is ``r``, ``--lr`` ``learning_rate``; ``adapterkit train
    --help`` says what each does); they are checked when
    the run starts (``train()``), all at once. ``forgetting_budget`` is in percent (``1`` for
    the CLI's ``1%``); trainer options (``--set``) go in ``trainer_options``.
    """

    method: str = "lora"
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str = "all-linear"
    #: ``None``: the trainer's default (``sft``: 1e-3, measured; the others:
    #: :data:`DEFAULT_LEARNING_RATE`).
    learning_rate: float | None = None
    #: ``None``: 1, or where ``min_steps`` is set (``sft``: 30, measured) as many more as a run
    #: needs to take that many optimizer steps, up to :data:`MAX_AUTO_EPOCHS`
    #: (:func:`with_data_defaults`).
    epochs: float | None = None
    #: With ``epochs`` unset: the fewest optimizer steps a run takes, counted as training rows
    #: per global batch (small data gets more epochs; ``None``: the trainer's default, 0:
    #: none). Not with ``packing``, whose packed rows the count could not foresee.
    min_steps: int | None = None
    max_steps: int = -1
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 512
    packing: bool = False
    seed: int = 0
    eval_split: float = 0.0
    #: Evaluations of the held-out split without a lower eval loss before training stops,
    #: ending with the best evaluation's pocket book (``None``: 3 when there is an eval split;
    #: 0: off). With it, the split is evaluated about ten times a run
    #: (:mod:`adapterkit.training.early_stop`); with the forgetting guard too, the budget is
    #: then checked on the best evaluation's weights.
    early_stopping: int | None = None
    #: Render rows with the base's chat template (``None``: when the base has one).
    chat: bool | None = None
    #: General-English text for the forgetting check (a file, or ``general`` for the shipped
    #: one; ``None``: the trainer's default, ``sft``'s being ``general``; ``off``: no check).
    general: str | None = None
    #: Largest allowed relative rise of general-text loss, in percent (the forgetting guard).
    #: ``None``: the trainer's default (``sft``: 1%, measured; the others: no guard); ``0``
    #: (``off``): no guard.
    forgetting_budget: float | None = None
    #: Weight of the KL term toward the base on anchor text (0 = off; ``None``: the trainer's
    #: default with a budget — ``sft`` 3 — else 0.3).
    guard_weight: float | None = None
    #: Anchor text for the KL term (default: the anchor prose shipped with adapterkit).
    anchor: str | None = None
    #: Steps between the snapshots of the weights the budget can fall back to (with a budget).
    guard_every: int = 10
    logging_steps: int = 5
    #: Steps between checkpoints that ``--resume`` continues from.
    save_steps: int = 50
    gradient_checkpointing: bool = False
    #: ``auto``: bfloat16 where the hardware computes it fast (a GPU with bf16, a CPU with
    #: AVX512-BF16 or AMX), float32 elsewhere; ``bf16`` or ``fp32`` to choose
    #: (:mod:`adapterkit.training.precision`).
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    #: Drop data rows of the wrong shape (saying how many) instead of refusing the file.
    skip_bad_rows: bool = False
    #: Experiment trackers transformers reports to (tensorboard, trackio, wandb, mlflow);
    #: empty (``none``) reports to none. Where each writes: :mod:`adapterkit.training.tracking`.
    report_to: list[str] = field(default_factory=list)
    #: Trainer-specific options as given (e.g. ``{"beta": 0.2}`` for DPO); typed and checked
    #: against the trainer's ``options`` dataclass by :func:`build_trainer_options`.
    trainer_options: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: The learning rate of a trainer that declares none in ``Trainer.defaults``.
DEFAULT_LEARNING_RATE = 2e-4
#: ``general`` that turns the forgetting check off (a trainer's default one included).
GENERAL_OFF = "off"
#: The options that shape a LoRA (a copy ``--from``/``from:`` keeps its own: refused there).
LORA_SHAPE = ("r", "alpha", "dropout", "target_modules")
#: The most epochs ``min_steps`` adds on small data (the sweep measured up to 3).
MAX_AUTO_EPOCHS = 3

_POSITIVE = ("r", "alpha", "batch_size", "grad_accum", "max_length", "logging_steps",
             "save_steps", "guard_every", "epochs", "learning_rate")
#: Seeds go to numpy too, which takes 0 to 2**32 - 1.
_MAX_SEED = 2**32 - 1
#: Options a run reads ``None`` as empty for (no trackers, no trainer options).
_NONE_IS_EMPTY = ("report_to", "trainer_options")


def build_options(recipe: str | os.PathLike[str] | None = None,
                  overrides: dict[str, Any] | None = None, *,
                  trainer: Trainer | None = None) -> TrainOptions:
    """Merge defaults, a YAML recipe and overrides (``None`` values are ignored); validate all.

    :param trainer: the trainer these options are for: its own options
        (``trainer_options``) are checked too, and their problems reported in the same error.
    """
    if recipe is not None and not isinstance(recipe, (str, os.PathLike)):
        raise ConfigError(f"recipe must be the path of a YAML file, got {recipe!r}")
    if overrides is not None and not isinstance(overrides, dict):
        raise ConfigError(f"overrides must be a dict of option: value, got {overrides!r}")
    values: dict[str, Any] = {}
    problems: list[str] = []
    if recipe is not None:
        values.update(read_recipe_values(Path(recipe)))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    hints = get_type_hints(TrainOptions)
    known = {f.name for f in dataclasses.fields(TrainOptions)}
    unknown = sorted(k for k in values if k.replace("-", "_") not in known)
    if unknown:
        problems.append(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    clean = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name == "forgetting_budget" and (value is False or str(value).lower() == "off"):
            value = 0.0  # YAML reads a bare `off` as false
        if name == "general" and (value is False or str(value).lower() == "off"):
            value = GENERAL_OFF  # no forgetting figure, even where the trainer measures one
        if name in known:
            clean[name] = coerce_option(name, value, hints[name], problems)
    problems += tracker_problems(clean.get("report_to"))  # as given: "none" beside others
    if clean.get("report_to") is not None:
        clean["report_to"] = trackers_of(clean["report_to"])
    options = TrainOptions(**{k: v for k, v in clean.items() if v is not None})
    problems += option_problems(options, trackers=False)
    if trainer is not None:
        problems += _trainer_options(trainer, options)[1]
        if "dropout" in clean:  # given, even as the default's value: it would do nothing
            problems += [p for p in [dropout_problem(trainer, options.dropout)] if p]
    if problems:
        where = f" in {recipe}" if recipe else ""
        raise ConfigError(f"invalid training options{where}: " + "; ".join(problems))
    return options


def option_problems(options: TrainOptions, *, trackers: bool = True) -> list[str]:
    """Every value of ``options`` of the wrong type or out of its range, one line each (empty
    when all are fine), with the trackers of ``report_to`` that are unknown or not installed
    (unless not ``trackers``: :func:`build_options` checked them as given).

    :func:`build_options` reports them with the rest; :func:`check_options` checks options
    built in Python (``TrainOptions(...)``), which no parsing has seen.
    """
    if not isinstance(options, TrainOptions):
        return [not_options(options)]
    wrong = _type_problems(options)
    problems = list(wrong.values())
    if wrong:  # the ranges are checked on the rest: a value of the wrong type stands in as
        # its default there (`"8" > 0` would raise), having been reported above
        defaults = TrainOptions()
        options = dataclasses.replace(options, **{k: getattr(defaults, k) for k in wrong})
    not_finite = set()  # nan or ±inf: reported once, not again as out of range
    for f in dataclasses.fields(TrainOptions):
        value = getattr(options, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{f.name}: expected a finite number, got {value}")
            not_finite.add(f.name)
    ranges = [(name, getattr(options, name) is None or getattr(options, name) > 0,
               f"must be positive, got {getattr(options, name)}") for name in _POSITIVE]
    ranges += [
        # -1 (the default) means "run by epochs", as in transformers; 0 would still run a step
        ("max_steps", options.max_steps == -1 or options.max_steps >= 1,
         f"must be at least 1 (or -1: run by epochs), got {options.max_steps}"),
        ("seed", 0 <= options.seed <= _MAX_SEED,
         f"must be in [0, {_MAX_SEED}], got {options.seed}"),
        ("dropout", 0 <= options.dropout < 1, f"must be in [0, 1), got {options.dropout}"),
        ("eval_split", 0 <= options.eval_split < 1,
         f"must be in [0, 1), got {options.eval_split}"),
        ("forgetting_budget", options.forgetting_budget is None or options.forgetting_budget >= 0,
         f"must be a positive percentage (0 or off: no guard), got "
         f"{options.forgetting_budget}"),
        ("guard_weight", options.guard_weight is None or options.guard_weight >= 0,
         f"must be ≥ 0, got {options.guard_weight}"),
        ("early_stopping", options.early_stopping is None or options.early_stopping >= 0,
         f"must be ≥ 0 (0: off), got {options.early_stopping}"),
        ("min_steps", options.min_steps is None or options.min_steps >= 0,
         f"must be ≥ 0 (0: none), got {options.min_steps}"),
    ]
    if options.min_steps and _sets_length(options):
        problems.append(f"min_steps: {options.min_steps} acts only when the run's length is "
                        f"left to it; {_sets_length(options)} sets it: leave one out")
    if options.early_stopping and not options.eval_split:
        problems.append(f"early_stopping: {options.early_stopping} evaluations of what? It "
                        "watches the eval loss of a held-out split: add --eval-split 0.1 (or "
                        "eval_split: 0.1 in the recipe)")
    problems += [f"{name}: {message}" for name, ok, message in ranges
                 if not ok and name not in not_finite]
    if trackers:
        problems += tracker_problems(options.report_to)
    return problems


def not_options(options: Any) -> str:
    """Why ``options`` is not a :class:`TrainOptions` ('' when it is): the one text of every
    place that takes options from Python (``train()``, :func:`check_options`...)."""
    if isinstance(options, TrainOptions):
        return ""
    return (f"options must be adapterkit.TrainOptions(...), not a {type(options).__name__} "
            f"({options!r:.80}): write TrainOptions(r=8, ...)")


def _type_problems(options: TrainOptions) -> dict[str, str]:
    """Field → one line, for each field of ``options`` whose value is not of the type the CLI
    or a recipe would have given it (``r: expected an integer, got '8'``): options built in
    Python (``TrainOptions(r="8")``) are typed by no parser. An int is a number; a bool is
    not an integer; ``report_to`` may be one comma-separated string, as ``--report-to`` is,
    and ``target_modules`` a list of names, as PEFT's ``LoraConfig`` takes them."""
    hints = get_type_hints(TrainOptions)
    problems = {}
    for f in dataclasses.fields(TrainOptions):
        value = getattr(options, f.name)
        kind, nullable = without_none(hints[f.name])
        if (value is None and (nullable or f.name in _NONE_IS_EMPTY)) or _of_type(value, kind) \
                or (f.name == "report_to" and isinstance(value, str)) \
                or (f.name == "target_modules" and _of_type(value, list[str])):  # as PEFT's
            continue
        problems[f.name] = f"{f.name}: expected {describe_option(kind)}, got {value!r}"
    return problems


def _of_type(value: Any, kind: Any) -> bool:
    """Whether ``value`` is a ``kind`` (a hint of :class:`TrainOptions`, ``None`` left out)."""
    origin = get_origin(kind) or kind
    if origin is Literal:
        return isinstance(value, str) and value in get_args(kind)
    if origin is list:
        item = (get_args(kind) or (Any,))[0]
        return isinstance(value, (list, tuple)) and all(_of_type(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if kind is float:  # an int is a number (epochs=2); a bool is not (True is no 1.0)
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return kind is Any or isinstance(value, kind)


def _sets_length(options: TrainOptions) -> str:
    """What of ``options`` fixes a run's length so that ``min_steps`` cannot act ('' if none)."""
    given = [name for name, on in (("epochs", options.epochs is not None),
                                   ("max_steps", options.max_steps > 0),
                                   ("packing", options.packing)) if on]
    return ", ".join(given)


_DEFAULT_DROPOUT = next(f.default for f in dataclasses.fields(TrainOptions)
                        if f.name == "dropout")


def dropout_problem(trainer: Trainer, dropout: float) -> str | None:
    """Why ``dropout`` cannot be given to ``trainer`` (None where it can): a trainer whose
    steps drop nothing out (``Trainer.drops_out`` False: TRL's DPO and Reward trainers) would
    train the very weights dropout 0 does, while the book recorded the value given."""
    if getattr(trainer, "drops_out", True) or not dropout:
        return None
    return (f"the {getattr(trainer, 'name', trainer)} trainer trains with dropout off (TRL's "
            f"disable_dropout): a dropout of {dropout:g} would do nothing; leave --dropout out "
            "(in a recipe: dropout: 0 for this stage)")


def with_defaults(trainer: Trainer, options: TrainOptions) -> TrainOptions:
    """``options`` as a run of ``trainer`` uses them: the trainer's measured defaults
    (``Trainer.defaults``) where they are unset, :data:`DEFAULT_LEARNING_RATE` where neither
    sets a learning rate, a forgetting budget of 0 (``off``) read as no guard and ``general``
    ``off`` as no forgetting check, and dropout 0 for a trainer whose steps drop nothing out
    (``Trainer.drops_out``; another ``dropout`` is refused).

    A default guard yields to a KL weight of 0 asked for without a budget. A default
    ``guard_weight`` applies only where the guard ends up on, so it never turns a KL term on
    by itself. (Early stopping and the guard act together: the budget is checked on the best
    evaluation's weights.)
    """
    defaults = dict(getattr(trainer, "defaults", None) or {})
    unsettable = {f.name for f in dataclasses.fields(TrainOptions) if f.default is None}
    wrong = sorted(k for k in defaults if k not in unsettable)
    if wrong:  # a plugin's bug: only options a run can leave unset (None) have defaults
        raise PluginError(
            f"trainer {getattr(trainer, 'name', trainer)!r} declares defaults for "
            f"{', '.join(wrong)}: Trainer.defaults takes only the training options whose own "
            f"default is None ({', '.join(sorted(unsettable))})")
    problems = option_problems(dataclasses.replace(TrainOptions(), **defaults)) \
        if defaults else []
    if problems:  # the plugin's values, not the user's: said so, not "invalid options"
        raise PluginError(
            f"trainer {getattr(trainer, 'name', trainer)!r} declares defaults the training "
            f"options refuse ({'; '.join(problems)}): fix its Trainer.defaults")
    values = {k: v for k, v in defaults.items() if getattr(options, k, None) is None}
    if "forgetting_budget" in values and options.guard_weight == 0:
        del values["forgetting_budget"]
    if "min_steps" in values and _sets_length(options):  # the run's length is set: no default
        del values["min_steps"]
    if "epochs" in values and options.max_steps > 0:  # max_steps sets it: epochs would be ignored
        del values["epochs"]
    budget = values.get("forgetting_budget", options.forgetting_budget)
    if not budget:
        values.pop("guard_weight", None)
    resolved = dataclasses.replace(options, **values)
    if not getattr(trainer, "drops_out", True) and resolved.dropout != 0:
        # (here the default cannot be told from the same value given; build_options and a
        # recipe's stage, which see what was written, refuse that too)
        if resolved.dropout != _DEFAULT_DROPOUT:
            raise ConfigError(dropout_problem(trainer, resolved.dropout))
        resolved.dropout = 0.0  # recorded as trained
    if resolved.learning_rate is None:
        resolved.learning_rate = DEFAULT_LEARNING_RATE
    if resolved.forgetting_budget == 0:
        resolved.forgetting_budget = None
    if isinstance(resolved.general, str) and resolved.general.lower() == GENERAL_OFF:
        resolved.general = None
    return resolved


def with_data_defaults(options: TrainOptions, train_rows: int, processes: int = 1
                       ) -> TrainOptions:
    """``options`` with ``epochs`` resolved for ``train_rows`` training rows (after any eval
    split) on ``processes`` processes: as given when set, unset beside ``max_steps``; else 1,
    or when ``min_steps`` asks
    for more optimizer steps than one epoch takes (``max_steps`` unset, no ``packing``), the
    fewest whole epochs that take them, at most :data:`MAX_AUTO_EPOCHS`. Call after
    :func:`with_defaults`.

    Why: on 120-160 rows (15-20 steps an epoch) one epoch under the forgetting guard left a
    plain-text task at 76.9 where two reached 85.3, within the same 1% budget, and the two
    other tasks at 97.5-100 → 100 (docs/defaults.md)."""
    import math

    if options.epochs is not None or options.max_steps > 0:  # max_steps sets the length:
        return options  # an epochs beside it would do nothing (and stages would refuse it)
    epochs = 1.0
    if options.max_steps <= 0 and options.min_steps and not options.packing:
        per_epoch = math.ceil(max(train_rows, 1) / (options.batch_size * options.grad_accum
                                                     * max(processes, 1)))
        epochs = float(min(MAX_AUTO_EPOCHS, max(1, math.ceil(options.min_steps / per_epoch))))
    return dataclasses.replace(options, epochs=epochs)


def check_options(options: TrainOptions) -> None:
    """Raise :class:`ConfigError` listing every value of ``options`` of the wrong type or out
    of its range."""
    problems = option_problems(options)
    if problems:
        raise ConfigError("invalid training options: " + "; ".join(problems))


def build_trainer_options(trainer: Trainer, options: TrainOptions | None = None) -> Any:
    """The trainer's own options, typed: ``options.trainer_options`` (what ``--set`` or a
    recipe's ``trainer_options:`` gave) checked against the dataclass ``trainer.options``.

    Unknown keys (the known ones are listed), values of the wrong type, required fields left
    out, and the problems the dataclass finds itself — its ``__post_init__`` raising
    ``ValueError``, or a ``check(options)`` method returning a list of one-line problems — are
    all reported in one :class:`ConfigError`, before any work. A trainer whose ``options`` is
    ``None`` takes no trainer options and refuses any given.

    :returns: an instance of ``trainer.options`` (defaults where nothing was given), or
        ``None`` for a trainer that takes no trainer options.
    :raises PluginError: where ``trainer.options`` itself cannot type options (the plugin's
        bug: :func:`adapterkit.plugin_api.option_types.options_class_problems`).
    """
    options = options or TrainOptions()
    wrong = not_options(options) or _type_problems(options).get("trainer_options")
    if wrong:  # nothing to type
        raise ConfigError(f"invalid {trainer.name} options: {wrong}")
    instance, problems = _trainer_options(trainer, options)
    if problems:
        raise ConfigError(f"invalid {trainer.name} options: " + "; ".join(problems))
    return instance


def trainer_option_defaults(trainer: Trainer) -> dict[str, Any]:
    """The default of each of ``trainer``'s own options that has one (none for a trainer that
    takes none): what a run without ``--set KEY=...`` trains with."""
    schema = getattr(trainer, "options", None)
    if schema is None or not dataclasses.is_dataclass(schema):
        return {}
    return defaults_of(schema)


def defaults_of(schema: Any) -> dict[str, Any]:
    """The default of each field of the dataclass ``schema`` that has one (a factory's made
    anew): what an option left unset is."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(schema):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _trainer_options(trainer: Trainer, options: TrainOptions) -> tuple[Any, list[str]]:
    """:func:`build_trainer_options`, returning the problems instead of raising them."""
    schema = trainer.options
    given = dict(options.trainer_options or {})
    if schema is None:
        if not given:
            return None, []
        return None, [f"the {trainer.name} trainer takes no trainer options (--set KEY=VALUE "
                      f"or a recipe's trainer_options:), got {', '.join(map(str, given))}"]
    wrong = options_class_problems(schema)  # registering refuses these; a bare Trainer() not
    if wrong:
        raise PluginError(f"trainer {trainer.name!r}: " + "; ".join(wrong))
    hints = get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema) if f.init}
    known = list(fields)
    problems: list[str] = []
    unknown = sorted(str(k) for k in given if str(k).replace("-", "_") not in known)
    if unknown:
        problems.append(f"unknown {trainer.name} option(s) {', '.join(unknown)} "
                        f"(known: {', '.join(known) or 'none'})")
    values: dict[str, Any] = {}
    for key, value in given.items():
        name = str(key).replace("-", "_")
        if name not in known:
            continue
        failed: list[str] = []
        typed = coerce_option(name, value, hints[name], failed)
        if failed:
            problems.append(_type_problem(fields[name], hints[name], value, failed[0]))
        else:
            values[name] = typed
    required = [f.name for f in fields.values() if _required(f)]
    given_names = {str(k).replace("-", "_") for k in given}
    problems += [f"{name} is required" for name in required if name not in given_names]
    if any(name not in values for name in required):
        return None, problems  # no instance without every required value (nothing to check)
    try:
        instance = schema(**values)
    except ValueError as exc:  # raised by the dataclass's own __post_init__
        return None, problems + [str(exc)]
    check = getattr(instance, "check", None)
    if callable(check):
        problems += _checked(trainer, instance, check(options))
    return instance, problems


def _required(f: dataclasses.Field[Any]) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _type_problem(f: dataclasses.Field[Any], kind: Any, value: Any, failed: str) -> str:
    """One line saying what ``f`` takes, for ``value`` it cannot: how to say "none" where it
    is optional, and what to do with a null where it is not (both read as typos otherwise)."""
    _, nullable = without_none(kind)
    finite = "expected a finite number" in failed  # a number, but nan or inf
    expected = "a finite number" if finite else describe_option(kind)
    if nullable:
        expected += ", or null (also ~ or empty) for none"
    if value is not None:
        return f"{f.name} must be {expected}, got {value!r}"
    fix = " (it is required)" if _required(f) else f", or leave {f.name} out for its default"
    return f"{f.name} must be {expected}, got null: give one{fix}"


def _checked(trainer: Trainer, instance: Any, found: Any) -> list[str]:
    """What the options' ``check`` returned, as one-line problems: a list of them, or one
    string (one problem, not one per letter). Anything else is the plugin's bug."""
    if not found:  # None, [] or ""
        return []
    if isinstance(found, str):
        return [found]
    if not isinstance(found, (list, tuple)):
        raise PluginError(f"trainer {trainer.name!r}: {type(instance).__name__}.check returned "
                          f"{found!r}; make it return a list of one-line problems (empty when "
                          "all is well)")
    return [str(p) for p in found]


def read_recipe_values(path: Path) -> dict[str, Any]:
    """A ``--config`` recipe's options as written (a YAML mapping), or a refusal naming the
    file."""
    import yaml

    if not path.is_file():
        raise ConfigError(f"recipe file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"recipe file {path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} "
                          f"at offset {exc.start})") from None
    except yaml.YAMLError as exc:  # its own text spans lines; say what and where in one
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"recipe file {path} is not valid YAML: {what}{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe file {path} must be a mapping of option: value")
    return data
