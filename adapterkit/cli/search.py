"""``train --search``: the flags, their checks, and the report (the search itself is
:mod:`adapterkit.training.search`)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import click

from adapterkit.cli.common import say
from adapterkit.errors import ConfigError

#: Each searchable option, and the ``train`` flag that would set it by hand.
_FLAG_OF = {"lr": "lr", "r": "rank", "steps": "max_steps"}


def options() -> list[Any]:
    """The ``train`` options of a search (decorators, applied in order)."""
    return [
        click.option("--search", "search_space", metavar="lr,r[,steps]",
                     help="Train --trials pocket books over these options (Optuna's TPE sampler, "
                          "seeded with --seed: half the trials, at least 1 and at most 10, are "
                          "drawn at random first, the rest by TPE from the finished ones), score "
                          "each on a held-out split (--eval-split, default 20%), keep the best "
                          "under NAME (or NAME@N, a new version) and discard the others; the "
                          "trial table goes into the metadata and the card. Trials are saved as "
                          "NAME-trial-K while it runs, K counted from 0 everywhere it reports "
                          "them. --resume continues an interrupted search; with --processes N "
                          "each trial trains on N processes of this machine. A dpo trial with "
                          "--forgetting-budget evaluates at every guard_every-th step too (a recipe "
                          "key, default 10; not only every --save-steps), so the weights its "
                          "guard keeps are scored."),
        click.option("--trials", type=int, help="Trainings of --search (default 8)."),
        click.option("--budget", metavar="PCT",
                     help="--search keeps only trials whose general-text loss rises by at most "
                          "PCT (e.g. 1%); with none within it, nothing is kept."),
    ]


def pop(flags: dict[str, Any]) -> tuple[str | None, int | None, str | None]:
    """Take the search flags out of ``train``'s flags (the rest are training options)."""
    return flags.pop("search_space", None), flags.pop("trials", None), flags.pop("budget", None)


def check(space_text: str | None, trials: int | None, budget: str | None,
          flags: dict[str, Any], launch: dict[str, Any], recipe: str | None = None
          ) -> tuple[list[str], int, float | None]:
    """The parsed search, or a refusal of flags (and ``--config`` recipe keys) that cannot
    act together."""
    from adapterkit.training.search import parse_space

    if space_text is None:
        given = [f for f, v in (("--trials", trials), ("--budget", budget)) if v is not None]
        if given:
            goes = "go" if len(given) > 1 else "goes"
            raise ConfigError(f"{' and '.join(given)} {goes} only with --search (e.g. --search lr,r "
                              "--trials 8)")
        return [], 0, None
    space = parse_space(space_text)
    clash = [f"--{_FLAG_OF[n].replace('_', '-')}" for n in space
             if flags.get(_FLAG_OF[n]) is not None]
    if clash:
        raise ConfigError(f"{', '.join(clash)} sets what --search {space_text} varies: give one "
                          "or the other")
    if recipe is not None:  # a recipe's value would be replaced in every trial, as a flag's
        from adapterkit.training.options import read_recipe_values
        from adapterkit.training.search import SEARCHABLE

        keys = {str(k).replace("-", "_") for k in read_recipe_values(Path(recipe))}
        set_there = [SEARCHABLE[n] for n in space if SEARCHABLE[n] in keys]
        if set_there:
            raise ConfigError(f"{recipe} sets {', '.join(set_there)}, which --search "
                              f"{space_text} varies: take it out of the recipe, or leave it out "
                              "of --search")
    # each trial may train on several processes of this machine; the study itself follows
    # one sequence of draws, which machines apart would each have to share
    elsewhere = [f"--{k.replace('_', '-')}" for k, v in launch.items()
                 if v is not None and k not in ("processes", "accelerate_config",
                                                "rendezvous_timeout")]
    if elsewhere:
        raise ConfigError(f"--search trains its trials on this one machine (--processes N "
                          f"acts); leave out {', '.join(elsewhere)}")
    return space, 8 if trials is None else trials, _percent(budget)


def _percent(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text.strip().rstrip("%"))
    except ValueError:
        raise ConfigError(f"--budget: expected a percentage such as 1%, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"--budget must be a positive percentage, got {text}")
    return value


def run(trainer: str, *, base: str, data: str, name: str, train_options: Any, state: Any,
        space: list[str], trials: int, budget: float | None, on: str | None,
        start_from: str | None, resume: bool, restart: bool, as_json: bool,
        launch: dict[str, Any] | None = None) -> None:
    """Run the search and report it: the trial table, then the kept pocket book."""
    from adapterkit.training.launch import asks_for_launcher, quiet_launcher
    from adapterkit.training.progress import progress_callback
    from adapterkit.training.search import search

    if launch and asks_for_launcher(launch):
        quiet_launcher()  # before torch is first imported, as train --processes does
    try:
        result = search(trainer, base=base, data=data, name=name, space=space, trials=trials,
                        budget=budget, options=train_options, home=state["home"],
                        plugins=state["plugins"], on=on, start_from=start_from, resume=resume,
                        restart=restart, launch=launch,
                        callbacks=[progress_callback(f"{trainer}/{train_options.method}")],
                        progress=None if as_json else say)
    except KeyboardInterrupt:
        say("Interrupted: the finished trials are kept in the search's study; run the same "
            "command with --resume to continue it (nothing was saved under "
            f"{name}).")
        sys.exit(130)
    book = result.kept.pocket_book
    if as_json:
        click.echo(json.dumps({"ref": book.ref, "path": str(book.path),
                               "metrics": result.kept.metrics}, indent=2, default=str))
        return
    best = book.meta.metrics["search"]["kept"]
    kept = next(row for row in result.trials if row["trial"] == best)
    # the trial by its number (NAME-trial-K's, as its progress line and the table give it),
    # which a failed or interrupted trial can carry past the count of finished ones
    within = " within the budget" if budget is not None else ""
    click.echo(f"Saved {book.ref}: trial {best}, the best{within} of {len(result.trials)} "
               f"finished trials, held-out loss {kept['eval_loss']:.4f}"
               + (f", forgetting {kept['forgetting_pct']:+.2f}%"
                  if kept["forgetting_pct"] is not None else ""))
