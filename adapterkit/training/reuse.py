"""How to go on past the pocket books a run saves besides its own (``Trainer.also_saves``:
rlhf's ``NAME-reward``), said where the user is: the command line or a recipe's stage.

A run stopped after saving one, or a name it saves found taken, leaves two ways on: reuse that
pocket book through the trainer's ``reuse_option`` (dropping the options that configure only
its training, ``reuse_drops``), or remove it. The core knows neither option: each trainer
declares its own. This module reads them and spells a recipe's stage; the command line spells
its own flags (``adapterkit.cli.train``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from adapterkit.training.options import TrainOptions, defaults_of

_TRAINING_DEFAULTS = defaults_of(TrainOptions)


def reuse_option(trainer: Any) -> str | None:
    """The trainer option through which a run uses a pocket book already in the library
    instead of training the one ``also_saves`` names (``Trainer.reuse_option``), or None."""
    return getattr(trainer, "reuse_option", None)


def reusable(trainer: Any) -> frozenset[str]:
    """The options a resume of a run that trained a stage first may change: the trainer's
    ``reuse_option`` (naming the stage's pocket book) and ``reuse_drops`` (what configured
    the stage); empty for a trainer that declares neither: every option is compared."""
    option = reuse_option(trainer)
    return frozenset([*([option] if option else []), *getattr(trainer, "reuse_drops", ())])


def drops_given(trainer: Any, options: TrainOptions) -> tuple[list[str], list[str]]:
    """The options in ``trainer.reuse_drops`` that ``options`` sets, which a run reusing a
    pocket book refuses (they configure only its training): the trainer's own ones given at
    all, and the training options not at their default. Other names never. Where each was
    given (a flag, a ``--config`` file, a stage, the recipe's defaults) is the caller's."""
    own = {f.name for f in dataclasses.fields(trainer.options)} if trainer.options else set()
    given = options.trainer_options or {}
    drops = getattr(trainer, "reuse_drops", ())
    return ([k for k in drops if k in own and k in given],
            [k for k in drops if k not in own and k in _TRAINING_DEFAULTS
             and getattr(options, k, None) != _TRAINING_DEFAULTS[k]])


@dataclasses.dataclass(frozen=True)
class Taken:
    """A name a run saves besides its own that the library holds, or refuses."""

    #: As the run's record names it (``NAME@V``: its own), else as the trainer declares it.
    held: str
    #: The run's own interrupted run saved it (its record, ``stages-saved.json``).
    own: bool
    #: Reusing it could be right: the run's own, or a reward pocket book (the kind rlhf's
    #: ``reuse_option`` takes; the core cannot tell which kind another trainer's takes).
    reusable: bool
    #: What frees the name, said: ``remove it (adapterkit rm NAME@V)``, or every version of a
    #: plain name where the library holds more than one (it is free only when none is left).
    rm: str = ""
    #: Not held but refused for another reason (a name differing only in case from one in
    #: the library, a damaged folder): that reason (``NameTaken.reason``); nothing to reuse.
    why: str = ""


def taken_besides(library: Any, declared: list[str], saved: list[str]) -> list[Taken]:
    """Which of the names a run saves besides its own (``declared``, as ``also_saves`` gives
    them: ``NAME``, or ``NAME@V`` where it says a version) the library holds or refuses;
    ``saved``: what the run's own interrupted run recorded saving. A recorded ``NAME@1`` is
    the run's own for a declared ``NAME`` or ``NAME@1``, never for a declared ``NAME@2``."""
    from adapterkit.errors import AdapterkitError, NameTaken
    from adapterkit.library.names import parse_ref

    out = []
    for besides in declared:
        want = parse_ref(besides)
        own = []
        for recorded in saved:
            try:
                ref = parse_ref(recorded)
            except AdapterkitError:  # (a damaged record names nothing)
                continue
            if ref.name == want.name and want.version in (None, ref.version) \
                    and library.exists(recorded):
                own.append(str(ref))
        if not own:
            try:
                library.reserve(besides)
                continue
            except NameTaken as exc:
                if not library.exists(want):  # (not held: its own reason)
                    out.append(Taken(str(want), False, False, why=exc.reason))
                    continue
        held = own[0] if own else str(want)
        versions = sum(1 for s in library.list(all_versions=True) if s.name == want.name)
        rm = (f"remove every version of it (adapterkit rm {want.name} --all-versions)"
              if versions > 1 and want.version is None else f"remove it (adapterkit rm {held})")
        out.append(Taken(held, bool(own), bool(own) or _reward_head(library, held), rm))
    return out


def refuse_taken(library: Any, trainer: Any, name: str, options: TrainOptions,
                 trainer_options: Any, saved: list[str], *, checkpoint: str | None = None,
                 finished: bool = False, restart: bool = False,
                 offer_reuse: bool = True) -> None:
    """Refuse, before the base loads, a run that would save a pocket book besides its own
    (``also_saves``) under a name the library holds: it would stop as it came to save it, its
    training done. Said for every trainer alike, with the ways on (reuse it through the
    trainer's ``reuse_option``, remove it, another name). ``saved``: what the run's own
    interrupted run recorded saving (it is then said to be that run's); ``checkpoint``: that
    run's last whole checkpoint (reusing its book then goes on with ``--resume``; with
    ``--restart`` where it is of its last step, ``finished``); ``restart``: the run starts
    over as asked; ``offer_reuse``: False where reusing one cannot be right (a search's trials
    each train their own)."""
    from adapterkit.errors import BesidesTaken

    also = getattr(trainer, "also_saves", None)
    declared = [str(n) for n in also(name=name, trainer_options=trainer_options)] if also \
        else []
    for taken in taken_besides(library, declared, saved):
        held = taken.held
        named = f"the {trainer.name} run of {name} saves a pocket book under the name " \
            f"{held.split('@')[0]} besides its own"
        if taken.why:
            raise BesidesTaken(f"{named}, which the library refuses ({taken.why}): give the run "
                               "another name", held)
        option = reuse_option(trainer) if taken.reusable and offer_reuse else None
        own_drops, training_drops = drops_given(trainer, options)
        drops = [*own_drops, *training_drops]
        then = None if not taken.own or restart else "fresh" if checkpoint is None else \
            "restart" if finished else "resume"
        how = {None: "", "fresh": ", and start it without --resume (it wrote no checkpoint "
                                  "past it)",
               "resume": f", and pass --resume (to continue from {checkpoint})",
               "restart": f", and pass --restart, not --resume (its {checkpoint} is of its "
                          "last step: a resume would train nothing)"}[then]
        raise BesidesTaken(
            f"{named}, and " + (f"its interrupted run saved {held}" if taken.own else
                                f"the library holds {held} already")
            + ": " + (f"to use it instead of training one, set the trainer option {option} to "
                      f"{held}" + (f", leave out {', '.join(drops)}" if drops else "") + how
                      + "; or " if option else "")
            + taken.rm
            + (" and pass --restart (not --resume) to train it anew" if taken.own else "")
            + "; or pick another name", held, offers_reuse=option is not None,
            then=then if option else None)


def _reward_head(library: Any, name: str) -> bool:
    from adapterkit.errors import AdapterkitError
    from adapterkit.lora.underlay import is_reward_book

    try:
        return is_reward_book(library.get(name))
    except AdapterkitError:
        return False


def in_stage(trainer: Any, book: str, options: TrainOptions, where: str,
             key: str | None = None) -> str | None:
    """What a recipe's stage (``where``) takes to reuse ``book``, as one instruction: the whole
    mapping of trainer options it then gives (its own, less what the reuse refuses, plus
    ``reuse_option``) under the key it gives them with (``key``: ``set`` or
    ``trainer_options``; None where it gives none, and ``set:`` is added), and the training
    options it sets back to their default. None where the trainer has no ``reuse_option``."""
    option = reuse_option(trainer)
    if option is None:
        return None
    own, training = drops_given(trainer, options)
    given = options.trainer_options or {}
    kept = {**{k: v for k, v in given.items() if k not in own and k != option}, option: book}
    instead = (f" (in place of its {key}:)" if key else
               " (in place of the recipe's trainer_options:, which a stage's set: replaces)"
               if given else "")
    resets = [f"set its {k}: {_yaml(_TRAINING_DEFAULTS[k])}" for k in training]
    return (f"give {where} {key or 'set'}: {_yaml(kept)}{instead}"
            + (f", {', '.join(resets)}" if resets else "")
            + f", so that its run uses {book} instead of training it")


def _yaml(value: Any) -> str:
    """``value`` as a recipe writes it, on one line (YAML's flow style)."""
    import yaml

    return str(yaml.safe_dump(value, default_flow_style=True, sort_keys=False,
                              width=float("inf"))).strip().removesuffix("\n...").strip()


def after_stop(trainer: Any, books: list[str], options: TrainOptions, where: str,
               key: str | None = None, removal: str | None = None) -> str:
    """How to go on with a recipe's stage (``where``, giving its trainer options under
    ``key``) whose run saved ``books`` besides its own pocket book and then stopped: keep the
    one it reuses (:func:`in_stage`), or remove them (``removal``: how, where the library
    was asked, :attr:`Taken.rm`). Either way ``--resume --restart``: a resume would train its
    run again under a taken name, and reusing one is another definition of the stage."""
    keep = in_stage(trainer, books[0], options, where, key) if len(books) == 1 else None
    rm = removal or (f"remove {'it' if len(books) == 1 else 'them'} ("
                     + ", ".join(f"adapterkit rm {b}" for b in books) + ")")
    return (f"{', '.join(books)} before it stopped: "
            + (f"to keep it, {keep}, and pass --resume --restart; or " if keep else "")
            + f"{rm} and pass --resume --restart to train {where} anew")
