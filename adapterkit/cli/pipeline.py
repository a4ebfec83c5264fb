"""CLI command ``pipeline``: a recipe's training stages (sft → dpo → rlhf...) as one command.

A thin layer over :mod:`adapterkit.training.pipeline`, imported inside the command so that
``adapterkit --help`` never loads torch. ``--processes N`` (and the other launch options of
``train``) start the command again as N ranks through accelerate's launcher, after the recipe
has been checked here once; every stage then runs on all of them.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from adapterkit.cli.common import obj, say
from adapterkit.cli.train import LaunchableCommand, as_rank, launch_options, relaunch_if_asked


@click.command("pipeline", cls=LaunchableCommand)
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--resume", is_flag=True,
              help="Skip the stages an earlier run of this recipe finished (found in the "
                   "library, made by the same stage definition) and continue the interrupted "
                   "one from its last checkpoint.")
@click.option("--restart", is_flag=True,
              help="Discard the interrupted run of a stage and train it anew (with --resume: "
                   "after skipping the stages already finished).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@launch_options
@click.pass_context
def pipeline_cmd(ctx: click.Context, recipe: str, resume: bool, restart: bool, as_json: bool,
                 processes: int | None, accelerate_config: str | None,
                 num_machines: int | None, machine_rank: int | None, main_address: str | None,
                 rendezvous_timeout: float) -> None:
    """Run the training stages of RECIPE (YAML) in order, each on the one before.

    Every stage's options, trainer options and data, the references between stages and the
    names are checked before the first stage trains; every problem is reported at once and
    nothing is written. Each stage is `adapterkit train` on the same resident base. At the end,
    one line per stage: pocket book, steps, final loss, forgetting figure; the last pocket
    book's card shows the whole lineage. With --processes N (and the other launch options of
    `train`) every stage runs on N processes: the recipe is checked once here, then the
    command starts again as N ranks through accelerate's launcher.

    \b
    RECIPE keys:
      base: BASE               required; as `train --base` (Hub id, folder, .gguf, alias)
      OPTION: VALUE            any training option (learning_rate, r, general,
                               max_steps...; the keys of `train --config`), a default
                               for every stage
      stages:                  required; a list, run in order, each with:
        - name: NAME           required; the library name it saves as (NAME or NAME@N)
          trainer: TRAINER     required; sft, dpo, reward, rlhf, or a plugin's
          data: FILE           required; relative paths are read from the recipe's
                               folder (or a Hub dataset id)
          on: STAGE|BOOK       train on top of an earlier stage of this recipe, or a
                               pocket book in the library; default: the stage before
                               (the first stage: the base); `on: null`: the base
          from: STAGE|BOOK     instead of on:, continue a copy of one
          set: {KEY: VALUE}    trainer options (`train --set`), e.g. {beta: 0.1}
          OPTION: VALUE        any training option, overriding the default
                               (`OPTION: null`: back to the trainer's default;
                               `forgetting_budget: off`: no guard)

    \b
    Example (examples/quickstart_recipe.yaml):
      base: smollm2-135m
      learning_rate: 1e-3
      general: general
      stages:
        - {name: triage, trainer: sft, data: data/triage_train.jsonl,
           forgetting_budget: 1%}
        - {name: bedside, trainer: dpo, data: data/preferences_train.jsonl,
           max_steps: 64, batch_size: 2, forgetting_budget: 1%,
           set: {beta: 0.1, loss_type: [sigmoid, sft]}}

    \b
      adapterkit pipeline examples/quickstart_recipe.yaml
      adapterkit pipeline examples/quickstart_recipe.yaml --resume   # after a failure
      adapterkit pipeline examples/quickstart_recipe.yaml --resume --restart  # its stage anew
      adapterkit pipeline examples/quickstart_recipe.yaml --processes 2
    """
    from adapterkit.training.launch import ranks
    from adapterkit.training.pipeline import load_recipe, run_pipeline, stage_line

    state = obj(ctx)
    launch = dict(processes=processes, config_file=accelerate_config, num_machines=num_machines,
                  machine_rank=machine_rank, main_address=main_address,
                  rendezvous_timeout=rendezvous_timeout)
    try:  # the recipe is checked here, once, before any process starts
        if relaunch_if_asked(ctx, launch, preflight=lambda: _preflight(state, recipe, resume,
                                                                       restart)):
            return  # the main rank printed the result
    except KeyboardInterrupt:
        sys.exit(130)  # the main rank said where it stopped, and how to resume
    from adapterkit.training.progress import progress_callback

    reports = ranks().is_main  # one process, or the main rank of several
    try:
        with as_rank():
            # every stage checked before anything trains: one error lists every problem
            plan = load_recipe(recipe, home=state["home"], plugins=state["plugins"],
                               resume=resume, restart=restart)
            total = len(plan.stages)
            result = run_pipeline(
                plan, home=state["home"], plugins=state["plugins"], resume=resume,
                restart=restart, callbacks=lambda s: [progress_callback(f"{s.index}/{total} {s.name}")],
                progress=say)
    except KeyboardInterrupt as exc:
        stage = getattr(exc, "pipeline_stage", None)
        if reports:  # (past what a stage's run saved besides its own, the stage said how)
            say("Interrupted" + (f" in stage {stage}" if stage else "") + (
                "" if getattr(exc, "saved_own", None) else  # (the stage said what is left)
                ": go on as said above" if getattr(exc, "stages_saved", None) else
                f". Run `adapterkit pipeline {recipe} --resume` to continue from there") + ".")
        sys.exit(130)
    if not reports:
        return
    if as_json:
        click.echo(json.dumps({
            "recipe": str(plan.path), "recipe_sha256": plan.sha256,
            "pocket_book": result.pocket_book.ref,
            "stages": [{"stage": r.stage.index, "name": r.stage.name, "ref": r.pocket_book.ref,
                        "trainer": r.stage.trainer, "skipped": r.skipped, "metrics": r.metrics}
                       for r in result.stages]}, indent=2, default=str))
        return
    for r in result.stages:
        click.echo(stage_line(r, total))
    if all(r.skipped for r in result.stages):
        click.echo(f"Nothing trained: every stage was finished by an earlier run; "
                   f"{result.pocket_book.ref}'s card shows the lineage: "
                   f"{result.pocket_book.path / 'README.md'}")
    else:
        click.echo(f"Saved {result.pocket_book.ref}; its card shows the lineage: "
                   f"{result.pocket_book.path / 'README.md'}")


def _preflight(state: dict[str, Any], recipe: str, resume: bool, restart: bool) -> None:
    """What the launching process checks before it starts the ranks: the whole recipe, and the
    base resolved (a GGUF file converted here, once, rather than by every rank)."""
    from adapterkit.base.resolve import resolve_base
    from adapterkit.training.pipeline import load_recipe

    plan = load_recipe(recipe, home=state["home"], plugins=state["plugins"], resume=resume,
                       restart=restart)
    resolve_base(plan.base, state["home"])
