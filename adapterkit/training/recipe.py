"""Pipeline recipes, read and checked: the recipe file (YAML 1.2 booleans), each stage's keys,
options, trainer options and data, the references between stages (no cycle, no stage ``on:``
a name the recipe has not produced), and each stage's name — every problem in one
:class:`ConfigError`, before anything is loaded or trained. :mod:`adapterkit.training.pipeline`
runs what this module checked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterkit.errors import (
    AdapterkitError,
    ConfigError,
    DataFormatError,
    InvalidName,
    NameTaken,
    PluginError,
)
from adapterkit.library.names import parse_ref
from adapterkit.library.store import Library, PocketBook
from adapterkit.training.build import general_texts, parent_refusal, refuse_what_cannot_act
from adapterkit.training.data import Data, check_rendering, load_data, read_rows
from adapterkit.training.options import (
    GENERAL_OFF,
    LORA_SHAPE,
    TrainOptions,
    build_options,
    build_trainer_options,
    defaults_of,
    with_defaults,
)
from adapterkit.training.run import (
    interrupted_stages,
    last_complete_checkpoint,
    run_dir,
    saved_stages,
)

if TYPE_CHECKING:  # pragma: no cover
    from adapterkit.plugin_api.manager import PluginManager

#: A recipe's own keys; any training option (``learning_rate``, ``general``...) may sit beside
#: them as a default for every stage.
RECIPE_KEYS = ("base", "stages")
#: A stage's own keys, besides training options that override the recipe's defaults.
STAGE_KEYS = ("name", "trainer", "data", "on", "from", "set")
_OPTIONS = tuple(f.name for f in dataclasses.fields(TrainOptions))
_NULLABLE = tuple(k for k, v in defaults_of(TrainOptions).items() if v is None)
_PATH_OPTIONS = ("general", "anchor")
#: Options that do not shape the pocket book, left out of a stage's fingerprint: adding a
#: tracker to a recipe still lets ``--resume`` skip the stages it finished.
_NOT_SHAPING = ("report_to",)


@dataclass
class Stage:
    """One checked stage of a recipe."""

    index: int  # from 1
    name: str  # the library name it saves as (NAME or NAME@N)
    trainer: str
    data: str  # as train() reads it: recipe-relative paths resolved
    options: TrainOptions
    #: What it trains on (``on:``) or continues a copy of (``from:``): a stage of this recipe
    #: (``parent``, its index) or an exact library reference (``name@N``).
    on: str | None = None
    start_from: str | None = None
    parent: int | None = None
    #: SHA-256 of the stage's whole definition, its parent's fingerprint included.
    fingerprint: str = ""
    #: The pocket book an earlier run of the same definition made (``resume``): skipped.
    done: PocketBook | None = None
    dataset: Data | None = field(default=None, repr=False)
    #: Neither ``on:`` nor ``from:`` given: on the stage before (the base for the first).
    follows: bool = False
    #: The names of the pocket books the stage's run saves besides its own
    #: (``Trainer.also_saves``: rlhf's ``NAME-reward``; ``NAME@N`` where it says one); a
    #: pipeline holds them with its name.
    also_saves: list[str] = field(default_factory=list)
    #: Whether its options read (else they are the defaults, standing in: its problems are
    #: reported, and nothing is judged from them).
    options_read: bool = True
    #: The key the stage gives its trainer options under (``set`` or ``trainer_options``, as
    #: written); None where it gives none (the recipe's ``trainer_options:`` apply).
    options_key: str | None = None

    @property
    def label(self) -> str:
        return f"stage {self.index} ({self.name})"


@dataclass
class Recipe:
    """A recipe checked against the plugins and the library: ready to run."""

    path: Path
    base: str
    stages: list[Stage]
    sha256: str


def _yaml_loader() -> Any:
    """A safe loader that reads only ``true``/``false`` as booleans (YAML 1.2): under YAML 1.1
    rules the stage key ``on:`` would be read as the boolean True, and ``off``/``no``/``yes``
    as values would become booleans."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    bool_tag = "tag:yaml.org,2002:bool"
    Loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != bool_tag]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver(bool_tag, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                 list("tTfF"))
    return Loader


def read_recipe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The recipe file parsed: a mapping, or a :class:`ConfigError` saying what is wrong."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file {path} does not exist")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_yaml_loader())
    except UnicodeDecodeError as exc:
        raise ConfigError(f"recipe file {path} is not UTF-8 text (byte "
                          f"0x{exc.object[exc.start]:02x} at offset {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"recipe file {path} is not valid YAML: {what}{where}") from None
    if not isinstance(data, dict):
        found = "empty" if data is None else f"a {type(data).__name__}"
        raise ConfigError(f"recipe file {path} must be a mapping with base: and stages: (it is "
                          f"{found}); see `adapterkit pipeline --help`")
    return data


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _resolve(spec: str, folder: Path) -> str:
    """A recipe-relative path as a path train() reads; anything else (an absolute path, a Hub
    dataset id, ``general``) as written."""
    candidate = folder / Path(spec).expanduser()
    return str(candidate) if candidate.exists() else spec


def load_recipe(path: str | os.PathLike[str], *, home: str | os.PathLike[str] | None = None,
                plugins: PluginManager | None = None, resume: bool = False,
                restart: bool = False) -> Recipe:
    """Read and check a pipeline recipe, every problem in one :class:`ConfigError`.

    Checked before anything trains: unknown keys, option values and trainer options (per stage,
    defaults merged), trainers and methods, data files (read, in the shape the trainer needs),
    ``on:``/``from:`` references (a stage produced earlier in the recipe, or a pocket book in
    the library; no cycles), duplicate stage names, names taken in the library, interrupted
    runs. With ``resume``, a stage whose name holds a pocket book made by the same stage
    definition is marked done (:attr:`Stage.done`) rather than refused. With ``restart``, an
    interrupted run of a stage to train is no problem: that stage starts over.
    """
    from adapterkit.plugin_api.manager import default_plugin_manager

    path = Path(path)
    pm = plugins or default_plugin_manager()
    raw = read_recipe(path)
    problems: list[str] = []
    base = raw.get("base")
    if not isinstance(base, str) or not base.strip():
        problems.append("base: required, the base every stage trains on (a Hub id, a model "
                        f"folder, a .gguf file or an alias such as smollm2-135m), got {base!r}")
        base = ""
    base = _resolve(base, path.parent) if base else base
    shared = _shared_options(raw, problems)
    items = raw.get("stages")
    if not isinstance(items, list) or not items:
        problems.append("stages: required, a list of stages (each a mapping with name, trainer "
                        f"and data), got {items!r}")
        items = []
    library = Library(home, plugins=pm)
    stages = [_read_stage(index, item, shared, path.parent, pm, problems)
              for index, item in enumerate(items, 1)]
    _link(stages, library, problems)
    _check_also_saved(stages, pm, problems, library)
    if not problems:  # a fingerprint needs every part of the definition, checked
        _fingerprint(stages, base, library)
    _check_names(stages, library, pm, resume=resume, restart=restart, problems=problems)
    if problems:
        count = f"{len(problems)} problems" if len(problems) > 1 else "a problem"
        raise ConfigError(f"recipe {path} has {count}; nothing was trained: "
                          + "; ".join(f"({i}) {p}" for i, p in enumerate(problems, 1)))
    return Recipe(path, base, stages, _digest(raw))


def _shared_options(raw: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """The recipe's defaults for every stage, checked once (not once per stage)."""
    keys = {str(k): str(k).replace("-", "_") for k in raw}
    staged = sorted(k for k, name in keys.items() if name in ("set", "trainer_options"))
    if staged:
        problems.append(f"{', '.join(staged)}: trainer options belong to a stage (each trainer "
                        "takes its own), not to the recipe's defaults")
    options = [o for o in _OPTIONS if o != "trainer_options"]
    unknown = sorted(k for k, name in keys.items() if k not in RECIPE_KEYS
                     and name not in options and k not in staged)
    if unknown:
        problems.append(f"unknown recipe key(s) {', '.join(unknown)}; a recipe has "
                        f"{', '.join(RECIPE_KEYS)} and defaults for any training option "
                        f"({', '.join(options)})")
    shared = {keys[str(k)]: v for k, v in raw.items() if keys[str(k)] in options}
    try:
        _options(shared, None)
    except ConfigError as exc:
        problems.append(f"defaults: {exc}")
        return {}
    return shared


def _options(values: dict[str, Any], trainer: Any) -> TrainOptions:
    """:func:`build_options` over ``values``, where ``null`` resets an option that can be unset
    to the trainer's own default (``general: null`` in a ``dpo`` stage turns off the recipe's
    forgetting check for that stage; ``sft`` measures it by default)."""
    nulls = [k for k, v in values.items() if v is None]
    wrong = [k for k in nulls if k not in _NULLABLE]
    if wrong:
        raise ConfigError("invalid training options: " + "; ".join(
            f"{k}: expected a value, got null" for k in wrong))
    options = build_options(None, {k: v for k, v in values.items() if v is not None},
                            trainer=trainer)
    unset: dict[str, Any] = {k: None for k in nulls}
    return replace(options, **unset)


def _read_stage(index: int, item: Any, shared: dict[str, Any], folder: Path,
                pm: PluginManager, problems: list[str]) -> Stage:
    """One stage's keys, options and data, its problems added to ``problems``. The stage comes
    back even with problems (its name empty when it has no usable one), so that references
    between stages are checked too."""
    if not isinstance(item, dict):
        problems.append(f"stage {index}: expected a mapping with name, trainer and data, "
                        f"got {item!r}")
        return Stage(index, "", "", "", TrainOptions())
    name = item.get("name")
    where = f"stage {index} ({name})" if isinstance(name, str) else f"stage {index}"
    problems += [f"{where}: {p}" for p in _key_problems(item)]
    usable_name = ""
    if isinstance(name, str) and name.strip():
        try:
            parse_ref(name)
            usable_name = name
        except InvalidName as exc:
            problems.append(f"{where}: {exc}")
    trainer, options = _stage_options(where, item, shared, folder, pm, problems)
    dataset = None
    if isinstance(item.get("data"), str):
        try:
            dataset = load_data(_resolve(item["data"], folder), formats=pm.data_formats,
                                shapes=trainer.data_shapes if trainer else None,
                                skip_bad_rows=bool(options and options.skip_bad_rows))
        except DataFormatError as exc:
            problems.append(f"{where}: data: {exc} (relative paths are read from the recipe's "
                            f"folder, {folder})")
        try:
            if dataset is not None:
                check_rendering(dataset, options.chat if options else None, flag="chat: false")
        except ConfigError as exc:
            problems.append(f"{where}: {exc}")
    refs = {k: item.get(k) if isinstance(item.get(k), str) else None for k in ("on", "from")}
    key = next((str(k) for k, v in item.items() if v is not None
                and str(k).replace("-", "_") in ("set", "trainer_options")), None)
    return Stage(index, usable_name, str(item.get("trainer")),
                 _resolve(str(item.get("data")), folder), options or TrainOptions(),
                 on=refs["on"], start_from=refs["from"], dataset=dataset,
                 follows="on" not in item and "from" not in item, options_read=bool(options),
                 options_key=key)


def _key_problems(item: dict[Any, Any]) -> list[str]:
    """What is wrong with a stage's keys themselves: unknown, missing, of the wrong type."""
    out = []
    unknown = sorted(str(k) for k in item
                     if k not in STAGE_KEYS and str(k).replace("-", "_") not in _OPTIONS)
    if unknown:
        out.append(f"unknown key(s) {', '.join(unknown)}; a stage has {', '.join(STAGE_KEYS)} "
                   "and any training option")
    for key in ("name", "trainer", "data"):
        if not isinstance(item.get(key), str) or not item[key].strip():
            out.append(f"{key}: required, a string, got {item.get(key)!r}")
    for key in ("on", "from"):
        if item.get(key) is not None and not isinstance(item[key], str):
            out.append(f"{key}: expected a stage name or a pocket book, got {item[key]!r}")
    if item.get("on") is not None and item.get("from") is not None:
        out.append("on: and from: exclude each other (on: trains a new pocket book on top of "
                   "one, from: continues a copy of one)")
    sets = item.get("set")
    if sets is not None and not isinstance(sets, dict):
        out.append(f"set: expected a mapping of trainer option: value, got {sets!r}")
    if sets is not None and any(v is not None for k, v in item.items()
                                if str(k).replace("-", "_") == "trainer_options"):
        out.append("give trainer options in set: or trainer_options:, not both")
    return out


def _stage_options(where: str, item: dict[Any, Any], shared: dict[str, Any], folder: Path,
                   pm: PluginManager, problems: list[str]) -> tuple[Any, TrainOptions | None]:
    """The stage's trainer and its options (the recipe's defaults, then its own, then ``set:``),
    checked as ``train`` checks them; text files (``general``, ``anchor``) read."""
    trainer = None
    if isinstance(item.get("trainer"), str):
        try:
            trainer = pm.trainer(item["trainer"])
        except PluginError as exc:
            problems.append(f"{where}: {exc}")
    copy = item.get("from") is not None  # keeps the LoRA shape of what it copies: the
    values = {**{k: v for k, v in shared.items() if not (copy and k in LORA_SHAPE)},  # recipe's
              **{str(k).replace("-", "_"): v for k, v in item.items()  # shape is not its
                 if str(k).replace("-", "_") in _OPTIONS}}
    if isinstance(item.get("set"), dict):
        values["trainer_options"] = item["set"]
    try:
        # a copy keeps the LoRA shape of what it copies (as train --from refuses the flags);
        # the recipe's own defaults may still give them to its other stages. Checked first:
        # a dpo copy's `dropout:` is to be dropped, not set to 0
        given = {str(k).replace("-", "_") for k in item}
        shape = [k for k in LORA_SHAPE if item.get("from") is not None and k in given]
        if shape:
            raise ConfigError(f"from: {item['from']} continues a copy of that pocket book, with "
                              f"its rank, alpha, dropout and target modules: drop "
                              f"{', '.join(shape)} from this stage")
        options = _options(values, trainer)  # (refuses a dropout dpo would not act on)
        pm.method(options.method)
        if trainer is not None:
            refuse_what_cannot_act(trainer.name, trainer, with_defaults(trainer, options),
                                   pm.trainers)
        if options.epochs is not None and options.max_steps > 0:
            raise ConfigError("max_steps sets the stage's length, and the trainer ignores "
                              "epochs beside it: give one (epochs: null in the stage, where "
                              "the recipe's defaults give epochs)")
    except (ConfigError, PluginError) as exc:
        problems.append(f"{where}: {exc}")
        return trainer, None
    resolved: dict[str, Any] = {}
    for key in _PATH_OPTIONS:
        spec = getattr(options, key)
        if spec is not None and not (key == "general" and spec == GENERAL_OFF):
            resolved[key] = _resolve(spec, folder)
            try:
                general_texts(resolved[key])  # read as the run reads it: text rows, at least one
            except DataFormatError as exc:
                problems.append(f"{where}: {key}: {exc}")
    return trainer, replace(options, **resolved)


def _matches(ref: str, stage: Stage) -> bool:
    """Whether ``ref`` (as an ``on:``/``from:`` value) names ``stage``."""
    try:
        want, have = parse_ref(ref), parse_ref(stage.name)
    except InvalidName:
        return False
    return want.name == have.name and (want.version is None or want.version == have.version)


def _head(library: Library, trainer: str) -> str:
    """The head a stage's ``trainer`` makes (``causal-lm`` where it is unknown: reported
    where the stage is read)."""
    try:
        return str(getattr(library.plugins.trainer(trainer), "head", "causal-lm"))  # type: ignore[union-attr]
    except (AdapterkitError, AttributeError):
        return "causal-lm"


def _link(stages: list[Stage], library: Library, problems: list[str]) -> None:
    """Resolve each ``on:``/``from:`` to an earlier stage or a library pocket book; refuse
    duplicate names, references to later stages, cycles and unknown names."""
    from adapterkit.library.integrity import check_book
    from adapterkit.lora.underlay import chain, is_reward_book

    seen: dict[str, Stage] = {}
    for stage in stages:
        if not stage.name:
            continue
        key = parse_ref(stage.name).name
        if key in seen:
            problems.append(f"{stage.label}: the name {key} is also {seen[key].label}'s; each "
                            "stage saves its own pocket book: give each stage its own name")
        else:
            seen[key] = stage
    edges: dict[int, int] = {}
    roles: dict[int, str] = {}
    for stage in stages:
        if stage.follows and stage.index > 1:
            stage.on = stages[stage.index - 2].name or None  # None: that stage has no name
        role, ref = ("on", stage.on) if stage.on is not None else ("from", stage.start_from)
        if ref is None:
            continue
        target = next((s for s in stages if s.name and _matches(ref, s)), None)
        if target is not None:
            edges[stage.index] = target.index
            roles[stage.index] = role
            stage.parent = target.index
            refused = parent_refusal(  # (as for a library book: found before anything trains)
                ref, reward=_head(library, target.trainer) == "reward", copy=role == "from",
                head=_head(library, stage.trainer), flag="")
            if refused:
                problems.append(f"{stage.label}: {refused}" + (
                    " (a stage without on: or from: trains on the stage before it; on: null "
                    "trains on the base)" if stage.follows else ""))
            continue
        try:
            book = library.get(ref)
        except AdapterkitError as exc:
            problems.append(f"{stage.label}: {role}: {ref} is not a stage of this recipe, and "
                            f"not in the library ({exc})")
            continue
        refused = parent_refusal(book.ref, reward=is_reward_book(book), copy=role == "from",
                                 head=_head(library, stage.trainer), flag="")
        if refused:
            problems.append(f"{stage.label}: {refused}")
        try:  # damaged files, as train() refuses them before the base loads
            for below in chain(library, book):
                check_book(below)
        except AdapterkitError as exc:
            problems.append(f"{stage.label}: {role}: {exc}")
        if role == "on":
            stage.on = book.ref
        else:
            stage.start_from = book.ref
    problems += _order_problems(stages, edges, roles)


def _also_taken(library: Library, stage: Stage, pm: PluginManager) -> str | None:
    """Why a name the stage's run saves besides its own (``also_saves``) cannot be saved, it
    being taken in the library already — said before any stage trains (its trainer would
    refuse it only when the stage starts) — or None."""
    from adapterkit.training import reuse

    try:
        trainer = pm.trainer(stage.trainer)
    except AdapterkitError:  # (reported where the stage is read)
        return None
    workdir = run_dir(library, str(parse_ref(stage.name)))
    taken = reuse.taken_besides(library, stage.also_saves, saved_stages(workdir))
    own = [t for t in taken if t.own]
    if own:  # (its interrupted run saved them; the pipeline held the names from its start)
        return "its interrupted run saved " + reuse.after_stop(
            trainer, [t.held for t in own], stage.options, "the stage", stage.options_key,
            removal=own[0].rm if len(own) == 1 else None)
    if not taken:
        return None
    first = taken[0]
    named = f"its {stage.trainer} run also saves a pocket book under the name {first.held}"
    if first.why:
        return f"{named}, which the library refuses ({first.why}): give the stage another name"
    keep = reuse.in_stage(trainer, first.held, stage.options, "the stage", stage.options_key) \
        if first.reusable else None
    return (f"{named}, which the library holds already: {first.rm}, or give the stage "
            "another name"
            + (f", or, if it is the pocket book that run would train, {keep}" if keep else ""))


def _check_also_saved(stages: list[Stage], pm: PluginManager, problems: list[str],
                      library: Library) -> None:
    """Refuse a stage named as a pocket book another stage's run saves besides its own
    (``Trainer.also_saves``: rlhf's ``NAME-reward``), and two stages whose runs would both save
    one: both runs would save under that name, and the second would stop the pipeline after
    the first trained."""
    from adapterkit.training.reuse import in_stage

    named = {parse_ref(s.name).name: s for s in stages if s.name}
    declared: dict[str, Stage] = {}
    for stage in stages:
        if not stage.name or not stage.options_read:
            continue
        try:  # (a trainer or options that do not read are reported where they are read)
            trainer = pm.trainer(stage.trainer)
            typed = build_trainer_options(trainer, stage.options)
        except AdapterkitError:
            continue
        try:
            extra = [str(parse_ref(n)) for n in trainer.also_saves(
                name=stage.name, trainer_options=typed)] if hasattr(trainer, "also_saves") else []
        except AdapterkitError as exc:
            problems.append(f"{stage.label}: {exc}")
            continue
        except Exception as exc:  # the plugin's bug: named, among the recipe's problems
            problems.append(f"{stage.label}: trainer {stage.trainer}'s also_saves() failed "
                            f"({type(exc).__name__}: {exc}); report it to its plugin's authors")
            continue
        stage.also_saves = extra
        here = f"{stage.label[:-1]}, {stage.trainer})"
        for other in [parse_ref(n).name for n in extra]:  # (a name's every version)
            clash = named.get(other)
            if clash is not None and clash is not stage:
                keep = in_stage(trainer, other, stage.options, here, stage.options_key) \
                    if _head(library, clash.trainer) == "reward" else None  # (rlhf's kind)
                problems.append(
                    f"{clash.label}: {here} also saves a pocket book under the name {other}: "
                    "give one of the two stages another name"
                    + (f", or, if {clash.label} is meant to be that pocket book, move it "
                       f"before {stage.name}, {keep}, and say what {stage.name} trains "
                       "on (on: null for the base)" if keep else ""))
            elif other in declared:
                problems.append(f"{here}: {declared[other].label} also saves a pocket book "
                                f"under the name {other}, as this stage's run would: give one "
                                "of the two stages another name")
            else:
                declared[other] = stage


def _order_problems(stages: list[Stage], edges: dict[int, int],
                    roles: dict[int, str]) -> list[str]:
    """Cycles, and stages that train on a stage the recipe produces later."""
    by_index = {s.index: s for s in stages}
    out: list[str] = []
    in_cycle: set[int] = set()
    for start in sorted(edges):
        path, node = [start], edges[start]
        while node in edges and node not in path:
            path.append(node)
            node = edges[node]
        if node in path and not in_cycle & set(path[path.index(node):]):
            loop = path[path.index(node):]
            in_cycle |= set(loop)
            names = " → ".join(by_index[i].name for i in [*loop, node])
            out.append(f"stages {names} form a cycle (on:/from:): a stage trains on one that "
                       "finished before it")
    for source, target in sorted(edges.items()):
        if target >= source and source not in in_cycle:
            out.append(f"{by_index[source].label}: {roles[source]}: {by_index[target].name}, "
                       f"which this recipe produces later ({by_index[target].label}): move "
                       "that stage first")
    return out


def _fingerprint(stages: list[Stage], base: str, library: Library) -> None:
    """Each stage's definition as one hash: what made a pocket book, so resume skips it only
    when nothing that shapes it changed (data by contents, parents by their own fingerprint,
    a library pocket book it starts from by its weights: ``law@1`` removed and imported again
    is another parent under the same name)."""
    from adapterkit.library.metadata import WEIGHTS_FILE

    for stage in stages:
        parent = stages[stage.parent - 1].fingerprint if stage.parent else None
        assert stage.dataset is not None
        outside = None if parent else stage.on or stage.start_from  # a library pocket book
        weights = {"parent_weights": library.get(outside).meta.files.get(WEIGHTS_FILE)} \
            if outside else {}
        stage.fingerprint = _digest({
            **weights,
            "base": base, "trainer": stage.trainer, "data": stage.dataset.sha256,
            "options": {k: v for k, v in stage.options.as_dict().items()
                        if k not in _PATH_OPTIONS + _NOT_SHAPING},
            "texts": {k: v if (k, v) == ("general", GENERAL_OFF) else read_rows(v)[2]
                      for k in _PATH_OPTIONS if (v := getattr(stage.options, k)) is not None},
            "on": parent if stage.on is not None and parent else stage.on,
            "from": parent if stage.start_from is not None and parent else stage.start_from,
        })


def _made_by(library: Library, stage: Stage) -> PocketBook | None:
    """The pocket book of ``stage``'s name that the same stage definition made, if any."""
    ref = parse_ref(stage.name)
    versions = [s.version for s in library.list(all_versions=True) if s.name == ref.name
                and (ref.version is None or s.version == ref.version)]
    for version in sorted(versions, reverse=True):
        book = library.get(f"{ref.name}@{version}")
        if book.meta.pipeline.get("stage_sha256") == stage.fingerprint:
            return book
    return None


def stage_marker(library: Library, stage: Stage) -> Path:
    """Beside the stage's run folder (which a fresh start clears): the fingerprint of the
    definition that started the run, so ``--resume`` never continues it under another."""
    workdir = run_dir(library, str(parse_ref(stage.name)))
    return workdir.with_name(f".{workdir.name}.stage.json")


def interrupted(library: Library, stage: Stage) -> str | None:
    """Where an interrupted run of ``stage`` stopped: its last checkpoint, or a stage of its
    own (rlhf's reward pocket book) interrupted before the run's first checkpoint."""
    workdir = run_dir(library, str(parse_ref(stage.name)))
    last = last_complete_checkpoint(workdir)  # (one cut off while written is passed over)
    if last:
        return Path(last).name
    inner = interrupted_stages(workdir, library)
    return f"its stage {inner[0]}" if inner else None


def _check_names(stages: list[Stage], library: Library, pm: PluginManager, *, resume: bool,
                 restart: bool, problems: list[str]) -> None:
    """Each stage's name: free, or (``resume``) holding what this very stage made before.

    Without fingerprints (other problems were found) a taken name is reported only when not
    resuming: whether the same stage made it cannot be told yet.
    """
    made: dict[int, PocketBook] = {}
    for stage in stages:
        if not stage.name:
            continue
        try:
            library.reserve(stage.name, option="name:")  # (a recipe's stage: its name:)
            taken = None
        except NameTaken as exc:
            taken = exc
        book = _made_by(library, stage) if taken and stage.fingerprint else None
        if book is not None and stage.parent and stage.parent not in made:
            book = None  # made on top of an earlier run of a stage that is no longer there
        if book is not None:
            made[stage.index] = book
        if book is not None and resume:
            stage.done = book
        elif book is not None:
            problems.append(f"{stage.label}: {book.ref} was made by this stage in an earlier "
                            "run of the pipeline: pass --resume to continue after it")
        elif taken is not None and (stage.fingerprint or not resume):
            problems.append(f"{stage.label}: {taken}" + (
                " (it was not made by this stage of this recipe, so --resume cannot reuse it)"
                if resume else ""))
        elif taken is None and (also := _also_taken(library, stage, pm)):
            problems.append(f"{stage.label}: {also}")
        elif taken is None and not resume and not restart and \
                (last := interrupted(library, stage)):
            problems.append(f"{stage.label}: an interrupted run of {stage.name} exists "
                            f"({last}): pass --resume to continue it, or --restart to train "
                            "the stage anew")
        elif taken is None and resume and not restart and stage.fingerprint and \
                (last := interrupted(library, stage)) and \
                (marker := stage_marker(library, stage)).is_file() and \
                json.loads(marker.read_text()).get("stage_sha256") != stage.fingerprint:
            problems.append(f"{stage.label}: the interrupted run of {stage.name} ({last}) was "
                            "started by another definition of this stage (its options, data "
                            "or the stage it trains on changed since): --resume would continue "
                            "it under this one; put the stage back as it was, or pass "
                            "--restart too to train it anew")
