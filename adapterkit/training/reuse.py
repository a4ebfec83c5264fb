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

from adapterkit.training.options import TrainOptions

_TRAINING_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainOptions)
                      if f.default is not dataclasses.MISSING}


def reuse_option(trainer: Any) -> str | None:
    """The trainer option through which a run uses a pocket book already in the library
    instead of training the one ``also_saves`` names (``Trainer.reuse_option``), or None."""
    return getattr(trainer, "reuse_option", None)


def drops_given(trainer: Any, options: TrainOptions) -> tuple[list[str], list[str]]:
    """The options in ``trainer.reuse_drops`` that ``options`` sets, which a run reusing a
    pocket book refuses (they configure only its training): the trainer's own ones given at
    all, and the training options not at their default (a recipe's defaults or a ``--config``
    file may give those: they are set back, not left out). Other names never."""
    own = {f.name for f in dataclasses.fields(trainer.options)} if trainer.options else set()
    given = options.trainer_options or {}
    drops = getattr(trainer, "reuse_drops", ())
    return ([k for k in drops if k in own and k in given],
            [k for k in drops if k not in own and k in _TRAINING_DEFAULTS
             and getattr(options, k, None) != _TRAINING_DEFAULTS[k]])


def training_default(key: str) -> Any:
    """A training option's default, which a run reusing a pocket book sets it back to."""
    return _TRAINING_DEFAULTS[key]


def in_stage(trainer: Any, book: str, options: TrainOptions, where: str) -> str | None:
    """What a recipe's stage (``where``) takes to reuse ``book``: its ``set:`` entry, the
    trainer options it drops and the training options it sets back; None where the trainer
    has no ``reuse_option``."""
    option = reuse_option(trainer)
    if option is None:
        return None
    own, training = drops_given(trainer, options)
    changes = [f"drop {k} from its set:" for k in own] + [
        f"set its {k}: {_yaml(training_default(k))}" for k in training]
    return (f"set: {{{option}: {book}}} to {where}"
            + (f", {', '.join(changes)}" if changes else "")
            + f", so that its run uses {book} instead of training it")


def _yaml(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) \
        else str(value)


def after_stop(trainer: Any, books: list[str], options: TrainOptions, where: str) -> str:
    """How to go on with a recipe's stage (``where``) whose run saved ``books`` besides its
    own pocket book and then stopped: keep the one it reuses (:func:`in_stage`), or remove
    them. Either way ``--resume --restart``: a resume would train its run again under a taken
    name, and reusing one is another definition of the stage."""
    keep = in_stage(trainer, books[0], options, where) if len(books) == 1 else None
    rm = ", ".join(f"adapterkit rm {b}" for b in books)
    return (f"{', '.join(books)} before it stopped: "
            + (f"to keep it, add {keep}, and pass --resume --restart; or " if keep else "")
            + f"remove {'it' if len(books) == 1 else 'them'} ({rm}) and pass --resume "
            f"--restart to train {where} anew")
