"""CLI commands that run models: ``train``, ``eval`` and ``generate``.

Kept apart from the library commands because these are the heavy ones; torch and friends are imported
inside the command bodies, never at module level.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NoReturn

import click

from adapterkit.cli.common import check_sampling, library, loaded_in, obj, say, then_say
from adapterkit.errors import (
    BesidesTaken,
    ConfigError,
    NameTaken,
    PocketBookNotFound,
    RunStateError,
)
from adapterkit.home import resolve_home
from adapterkit.training.launch import DEFAULT_RENDEZVOUS_TIMEOUT

if TYPE_CHECKING:  # pragma: no cover
    from adapterkit.training.options import TrainOptions

_OPTION_FLAGS = {
    "method": "method", "rank": "r", "alpha": "alpha", "dropout": "dropout",
    "target_modules": "target_modules", "lr": "learning_rate", "epochs": "epochs",
    "min_steps": "min_steps", "max_steps": "max_steps", "batch_size": "batch_size",
    "grad_accum": "grad_accum",
    "max_length": "max_length", "packing": "packing", "seed": "seed", "eval_split": "eval_split",
    "early_stopping": "early_stopping",
    "general": "general", "forgetting_budget": "forgetting_budget",
    "guard_weight": "guard_weight", "anchor": "anchor", "chat": "chat",
    "save_steps": "save_steps", "logging_steps": "logging_steps",
    "skip_bad_rows": "skip_bad_rows", "report_to": "report_to", "precision": "precision",
}
#: The flag that gives each training option, as a user types it (``-r``, ``--lr``).
_FLAG_OF = {option: "-r" if flag == "rank" else "--" + flag.replace("_", "-")
            for flag, option in _OPTION_FLAGS.items()}


#: ``ctx.meta`` key: the arguments a :class:`LaunchableCommand` was given, as typed.
RAW_ARGS = "adapterkit.raw_args"


class LaunchableCommand(click.Command):
    """A command that can start itself again on several processes: it keeps the arguments it
    was given, which each rank runs (less the launch options)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta[RAW_ARGS] = list(args)
        return super().parse_args(ctx, args)


def _search_options(command: Any) -> Any:
    """``--search``, ``--trials``, ``--budget`` (:mod:`adapterkit.cli.search`)."""
    from adapterkit.cli.search import options

    for option in reversed(options()):
        command = option(command)
    return command


def launch_options(command: Any) -> Any:
    """The launch options (``--processes``, ``--accelerate-config``, ``--num-machines``,
    ``--machine-rank``, ``--main-address``, ``--rendezvous-timeout``), for
    :func:`relaunch_if_asked`."""
    options = [
        click.option("--processes", type=int, help="Processes on this machine (default 1: train "
                     "in this process). One per GPU; on a CPU-only machine at most one per "
                     "core. Started through accelerate's launcher (gloo on CPUs, NCCL on GPUs)."),
        click.option("--accelerate-config", type=click.Path(dir_okay=False), help="accelerate "
                     "config file (DDP; on GPUs also FSDP 2, DeepSpeed ZeRO-1/2), passed to "
                     "accelerate's launcher; its num_processes is the total of all machines."),
        click.option("--num-machines", type=int, help="Machines in the run (default 1); start "
                     "the same command on each, with its own --machine-rank."),
        click.option("--machine-rank", type=int, help="This machine's rank, 0 to "
                     "--num-machines - 1 (0: the main machine, which saves)."),
        click.option("--main-address", metavar="HOST:PORT", help="Where every machine meets "
                     "the main machine (--machine-rank 0)."),
        click.option("--rendezvous-timeout", type=float, help="Seconds the machines wait "
                     f"for each other before giving up (default {DEFAULT_RENDEZVOUS_TIMEOUT})."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def relaunch_if_asked(ctx: click.Context, launch: dict[str, Any],
                      preflight: Any = None) -> bool:
    """Start this command again through accelerate's launcher when ``launch`` (the values of
    :func:`launch_options`) asks for more than one process, after ``preflight()`` has refused
    what it would refuse; returns whether it did (the ranks then ran the command).

    Under a launcher already (a rank), launch options are refused: the launcher placed the
    processes.
    """
    from adapterkit.training.launch import (
        asks_for_launcher,
        plan_launch,
        quiet_launcher,
        ranks,
        relaunch,
        strip_launch_options,
    )

    where = ranks()
    if where.distributed:
        flags = {"config_file": "--accelerate-config"}
        given = [flags.get(k, f"--{k.replace('_', '-')}") for k, v in launch.items()
                 if v is not None]
        if given:
            raise ConfigError(f"this is rank {where.rank} of {where.world_size} under a "
                              f"launcher already: leave out {', '.join(given)} (the launcher "
                              "placed the processes)")
        return False
    if all(v is None for v in launch.values()):
        return False  # today's path: this process trains
    if asks_for_launcher(launch):
        quiet_launcher()  # before torch is first imported (below)
    if not plan_launch(**launch).needed:
        return False
    state = obj(ctx)
    if preflight is not None:
        try:
            preflight()
        except (NameTaken, PocketBookNotFound, RunStateError) as exc:
            if not (launch["machine_rank"] or 0) > 0:
                raise
            # what this machine's own library says: the main machine's may say otherwise
            raise type(exc)(f"{exc} (checked in machine {launch['machine_rank']}'s own "
                            f"library, {resolve_home(state.get('home'))}; if it is not the "
                            "main machine's, give every machine the same --home on a shared "
                            "filesystem)") from None
    argv = (["--home", str(state["home"])] if state.get("home") else []) + \
        [str(ctx.info_name)] + strip_launch_options(ctx.meta.get(RAW_ARGS, []))
    relaunch(argv, **launch)
    return True


@contextmanager
def as_rank() -> Iterator[None]:
    """Run a command's body as one rank: SIGTERM (the launcher stopping it) unwinds like
    Ctrl-C, so nothing half-written stays; under ``adapterkit … --processes N`` its errors go
    to the launching process (one line), elsewhere the other ranks' messages name their
    rank."""
    import signal

    from adapterkit.errors import AdapterkitError
    from adapterkit.training.launch import (
        LAUNCHED_ENV,
        hand_over,
        leave,
        leave_on_failure,
        ranks,
        watch_launcher,
    )

    where = ranks()
    if not where.distributed:
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise _Stopped

    previous = signal.signal(signal.SIGTERM, stop)
    # a launcher killed outright takes its ranks with it — torchrun's (which accelerate's
    # uses) or ours; a rank started some other way (by hand, mpirun) is left to its starter
    launched = os.environ.get(LAUNCHED_ENV) or os.environ.get("TORCHELASTIC_RUN_ID")
    unwatch = watch_launcher() if launched else (lambda: None)
    try:
        yield
    except BaseException as exc:
        # on its way out: the launcher's SIGTERM must not cut the exit short (a traceback
        # from inside some clean-up at interpreter exit)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        # out of the process group before the interpreter's teardown (a gloo abort otherwise);
        # a group that would not let go in time: exit at once, past the teardown, said first
        left = leave_on_failure()
        if isinstance(exc, _Stopped):
            _exit(143, left)  # the launcher stops the ranks when one failed: it says which, why
        if isinstance(exc, AdapterkitError):
            follows = bool(getattr(exc, "after_another", False))  # the main one says why
            if hand_over(str(exc), after_another=follows) or follows:
                _exit(1, left)
            if not where.is_main:
                _fail(click.ClickException(f"rank {where.rank}: {exc}"), left)
        elif isinstance(exc, Exception) and _lost_contact(exc):
            detail = " ".join(str(exc).split())[:160]
            if hand_over(f"lost contact with another rank, which stopped ({detail})",
                         after_another=True):
                _exit(1, left)
            # started by hand: no launcher to say which rank failed first, or why
            _fail(click.ClickException(
                f"rank {where.rank}: a collective operation with the other ranks failed "
                f"({detail}); usually another rank stopped first, and its own output says "
                "why"), left)
        if not left:  # what the command line would have said, then out
            if isinstance(exc, AdapterkitError):
                _fail(click.ClickException(str(exc)), left)
            traceback.print_exception(exc)
            _exit(1, left)
        raise  # still watched on the way out: an orphan that hangs in clean-up is ended
    unwatch()
    leave()
    signal.signal(signal.SIGTERM, previous)


def _exit(code: int, left: bool) -> NoReturn:
    """Exit with ``code``: normally once this rank has left its process group, at once
    (``os._exit``, output flushed) when it could not (:func:`leave_on_failure`)."""
    if left:
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _fail(error: click.ClickException, left: bool) -> NoReturn:
    """Raise ``error`` for click to print; printed here and exited at once when this rank could
    not leave its process group."""
    if left:
        raise error from None
    error.show()
    _exit(error.exit_code, left)


def _lost_contact(exc: Exception) -> bool:
    """Whether ``exc`` is a collective that failed because another rank is gone."""
    from torch.distributed import DistError

    text = str(exc)
    return isinstance(exc, DistError) or (isinstance(exc, RuntimeError) and any(
        mark in text for mark in ("gloo", "NCCL", "Connection reset", "Connection closed")))


class _Stopped(KeyboardInterrupt):
    """SIGTERM from the launcher: unwinds ``finally`` blocks (staging folders) like Ctrl-C."""


@click.command("train", cls=LaunchableCommand)
@click.argument("trainer")
@click.option("--base", required=True, help="Base: Hub id, folder, .gguf file or alias "
                                            "(smollm2-135m).")
@click.option("--data", required=True, help="JSONL/JSON/CSV/Parquet/TXT file or Hub dataset id.")
@click.option("--name", required=True, help="Library name: NAME, or NAME@N for a new version.")
@click.option("--method", default=None, help="Adapter method: lora (default), qlora, ... "
                                             "(see `adapterkit plugins`).")
@click.option("--config", "recipe", type=click.Path(dir_okay=False),
              help="YAML recipe with any of these options; flags override it.")
@click.option("-r", "--rank", type=int, help="LoRA rank (default 16).")
@click.option("--alpha", type=int, help="LoRA alpha (default 32).")
@click.option("--dropout", type=float, help="LoRA dropout (default 0.05; dpo and reward train without "
              "dropout, as TRL does, and refuse it unless 0).")
@click.option("--target-modules", help="Comma-separated linear layers, or all-linear (default).")
@click.option("--lr", type=float, help="Learning rate (default: the trainer's; sft 1e-3, "
                                       "measured in docs/defaults.md; the others 2e-4).")
@click.option("--epochs", type=float, help="Epochs (default 1; sft: more on small data, so "
                                           "that a run takes at least --min-steps steps, at "
                                           "most 3 epochs).")
@click.option("--min-steps", type=int, help="Without --epochs: the fewest optimizer steps a "
                                            "run takes (rows per global batch), small data "
                                            "getting up to 3 epochs (sft default 30, measured "
                                            "in docs/defaults.md; 0: one epoch; not with "
                                            "--packing).")
@click.option("--max-steps", type=int, help="Stop after this many optimizer steps.")
@click.option("--batch-size", type=int, help="Per-device batch size (default 8).")
@click.option("--grad-accum", type=int, help="Gradient accumulation steps (default 1).")
@click.option("--max-length", type=int, help="Max tokens per example (default 512).")
@click.option("--packing/--no-packing", default=None, help="Pack short examples together.")
@click.option("--seed", type=int, help="Random seed (default 0).")
@click.option("--eval-split", type=float, help="Fraction of the data held out for eval loss.")
@click.option("--early-stopping", type=int, metavar="PATIENCE",
              help="With --eval-split: stop when the eval loss has not improved for PATIENCE "
                   "evaluations (about ten a run) and keep the best evaluation's pocket book "
                   "(default 3 with an eval split; 0: off). With the forgetting guard, its "
                   "budget is checked on that pocket book.")
@click.option("--chat/--no-chat", default=None,
              help="Render rows with the base's chat template (default: if it has one).")
@click.option("--general", help="General-English text for the forgetting check "
                                "(`general` = the text shipped with adapterkit, sft's default; "
                                "`off`: no forgetting figure; the guard, when on, still checks "
                                "its budget on the shipped text).")
@click.option("--forgetting-budget", help="Max rise of general-text loss, e.g. 1%: the "
                                          "forgetting guard (sft: on at 1% by default, 0 or off "
                                          "turns it off; dpo: off by default; reward and rlhf "
                                          "refuse it, as does a plugin trainer that does not "
                                          "declare uses_guard).")
@click.option("--guard-weight", type=float, help="Weight of the KL-to-base term (default with a "
                                                 "budget: sft 3, dpo 0.3). 0 drops the term; "
                                                 "without --forgetting-budget it also turns sft's "
                                                 "default guard off.")
@click.option("--anchor", help="Anchor prose for the KL term (default: shipped anchor text).")
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp32"]),
              help="auto (default): bfloat16 where the hardware computes it fast (a GPU with "
                   "bf16, a CPU with AVX512-BF16 or AMX: the frozen base held in bf16, the "
                   "pocket book and optimizer in fp32, each step under autocast), fp32 "
                   "elsewhere. fp32: exact float32 training, slower.")
@click.option("--save-steps", type=int, help="Steps between resumable checkpoints (default 50).")
@click.option("--logging-steps", type=int, help="Steps between loss logs (default 5).")
@click.option("--skip-bad-rows", is_flag=True, default=None,
              help="Train on the usable rows when some have the wrong shape (a needed field "
                   "missing or empty), saying how many were skipped. Default: refuse the file, "
                   "naming the bad rows.")
@click.option("--report-to", multiple=True, metavar="TRACKER",
              help="Log the run to tensorboard, trackio, wandb or mlflow (repeatable, or a "
                   "comma list; default none). Offline by default: TensorBoard and MLflow "
                   "files under the library home, trackio's local store, W&B offline unless "
                   "WANDB_MODE or WANDB_API_KEY says otherwise. Needs the extra "
                   "adapterkit[trackers] (wandb, mlflow: their own extras).")
@click.option("--set", "trainer_sets", multiple=True, metavar="KEY=VALUE",
              help="Trainer-specific option (repeatable), e.g. --set beta=0.1 for dpo.")
@click.option("--on", "on", metavar="BOOK", help="Train on top of pocket book BOOK: it stays "
              "frozen and active underneath (and is the DPO/RL reference); loading the result "
              "brings the stack back.")
@click.option("--from", "start_from", metavar="BOOK", help="Continue training a copy of pocket "
              "book BOOK (its LoRA rank and targets are kept).")
@click.option("--reward", metavar="BOOK", help="rlhf: optimise against this reward pocket book "
              "instead of training one first from the preference file (the data may then be "
              "prompts alone).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run of NAME.")
@click.option("--restart", is_flag=True, help="Discard an interrupted run of NAME; start over.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_search_options
@launch_options
@click.pass_context
def train_cmd(ctx: click.Context, trainer: str, base: str, data: str, name: str,
              recipe: str | None, trainer_sets: tuple[str, ...], on: str | None,
              start_from: str | None, reward: str | None, resume: bool, restart: bool,
              as_json: bool, processes: int | None, accelerate_config: str | None,
              num_machines: int | None, machine_rank: int | None, main_address: str | None,
              rendezvous_timeout: float, **flags: Any) -> None:
    """Train a new pocket book with TRAINER (sft, ...) on BASE and save it in the library.

    \b
    Examples:
      adapterkit train sft --base smollm2-135m --data triage.jsonl --name triage
      adapterkit train sft --base smollm2-135m --data notes.txt --name notes --method qlora
      adapterkit train sft ... --general general --forgetting-budget 1%
      adapterkit train sft ... --report-to tensorboard,trackio
      adapterkit train sft ... --search lr,r --trials 8 --budget 1%
      adapterkit train dpo --base smollm2-135m --data prefs.jsonl --name manner --on triage
      adapterkit train rlhf --base smollm2-135m --data prefs.jsonl --name kind
      adapterkit train rlhf ... --reward kind-reward --set beta=0.1 --set max_new_tokens=48
      adapterkit train sft ... --processes 2                # 2 processes on this machine
      adapterkit train sft ... --processes 8 --num-machines 2 --machine-rank 0 \\
          --main-address 10.0.0.1:29500                     # and the same on machine 1
    """
    from adapterkit.cli import search
    from adapterkit.training.options import LORA_SHAPE, build_options
    from adapterkit.training.progress import progress_callback
    from adapterkit.training.run import check_train, train

    space_text, trials, budget = search.pop(flags)
    space, trials, budget_pct = search.check(
        space_text, trials, budget, flags,
        dict(processes=processes, accelerate_config=accelerate_config,
             num_machines=num_machines, machine_rank=machine_rank, main_address=main_address,
             rendezvous_timeout=rendezvous_timeout), recipe=recipe)
    flags["report_to"] = ",".join(flags.get("report_to") or ()) or None  # none: the recipe's
    overrides = {_OPTION_FLAGS[k]: v for k, v in flags.items() if k in _OPTION_FLAGS}
    in_recipe: dict[str, Any] = {}
    if start_from and recipe:
        from pathlib import Path

        from adapterkit.training.options import read_recipe_values

        in_recipe = {str(k).replace("-", "_"): v
                     for k, v in read_recipe_values(Path(recipe)).items()}
    shape = [_FLAG_OF[key] if overrides.get(key) is not None
             else f"{key} (in {recipe})" for key in LORA_SHAPE
             if overrides.get(key) is not None or in_recipe.get(key) is not None]
    if start_from and shape:  # the copy keeps its LoRA shape: the flags would do nothing
        raise ConfigError(f"--from {start_from} continues a copy of that pocket book, with its "
                          f"rank, alpha, dropout and target modules: drop {', '.join(shape)}")
    sets = _parse_sets(trainer_sets)
    if reward:
        schema = obj(ctx)["plugins"].trainer(trainer).options
        if schema is None or "reward" not in getattr(schema, "__dataclass_fields__", {}):
            raise ConfigError(f"--reward names the reward pocket book rlhf optimises against; "
                              f"the {trainer} trainer takes none: drop --reward")
        if "reward" in sets:  # two spellings of one option: neither may silently win
            raise ConfigError(f"--reward {reward} and --set reward={sets['reward']} both name "
                              "the reward pocket book: give it once (--reward)")
        sets["reward"] = reward
    overrides["trainer_options"] = sets or None
    state = obj(ctx)
    # the trainer's own options are checked with the rest: one error lists every problem
    options = build_options(recipe, overrides, trainer=state["plugins"].trainer(trainer))
    if options.epochs is not None and options.max_steps > 0:  # flags or --config alike
        raise ConfigError("--max-steps sets the run's length, and the trainer ignores --epochs "
                          "beside it: give one (max_steps: or epochs: in a recipe)")
    if space:
        search.run(trainer, base=base, data=data, name=name, train_options=options, state=state,
                   space=space, trials=trials, budget=budget_pct, on=on, start_from=start_from,
                   resume=resume, restart=restart, as_json=as_json,
                   launch=dict(processes=processes, config_file=accelerate_config,
                               rendezvous_timeout=rendezvous_timeout))
        return
    launch = dict(processes=processes, config_file=accelerate_config, num_machines=num_machines,
                  machine_rank=machine_rank, main_address=main_address,
                  rendezvous_timeout=rendezvous_timeout)
    try:
        launched = relaunch_if_asked(ctx, launch, preflight=lambda: check_train(
            trainer, base=base, data=data, name=name, options=options, home=state["home"],
            plugins=state["plugins"], resume=resume, restart=restart, on=on,
            start_from=start_from))
    except KeyboardInterrupt:
        sys.exit(130)  # the main rank said what was saved, and how to resume
    except BesidesTaken as exc:
        _reuse_said(exc, state["plugins"].trainer(trainer), options, overrides, recipe, resume)
        raise
    if launched:
        return  # the main rank printed the result
    try:
        with as_rank():
            result = train(trainer, base=base, data=data, name=name, options=options,
                           home=state["home"], plugins=state["plugins"], resume=resume,
                           restart=restart, on=on, start_from=start_from,
                           callbacks=[progress_callback(f"{trainer}/{options.method}")],
                           progress=say)
    except KeyboardInterrupt as exc:
        if not _reports():
            sys.exit(130)
        saved = getattr(exc, "stages_saved", [])  # (the run said what it saved, if anything)
        if getattr(exc, "saved_own", None):
            say("Interrupted.")
            sys.exit(130)
        try:  # (never in the way of the interruption)
            past, removes = _past_saved(saved, state["plugins"].trainer(trainer), options,
                                        overrides, recipe)
            command, how = _how_on(exc, past, removes, resume)
        except Exception:
            say("Interrupted.")
            sys.exit(130)
        say(f"Interrupted: {how}." if saved else "Interrupted: nothing was saved to the library"
            + (f". {how[0].upper()}{how[1:]}" if command else f"; {how}") + ".")
        sys.exit(130)
    except Exception as exc:  # (the error itself is said by the command line's handler)
        if isinstance(exc, BesidesTaken) and _reports():
            _reuse_said(exc, state["plugins"].trainer(trainer), options, overrides, recipe,
                        resume)
        saved = getattr(exc, "stages_saved", [])
        if saved and not getattr(exc, "saved_own", None) and _reports():  # (the run said what
            try:  # it kept; past what it saved, how on; never in the way of the error itself)
                past, removes = _past_saved(saved, state["plugins"].trainer(trainer), options,
                                            overrides, recipe)
                then_say(exc, f"Once the cause is fixed: "
                              f"{_how_on(exc, past, removes, resume)[1]}.")
            except Exception:
                pass
        raise
    if not _reports():
        return  # the main rank reports the run
    book, m = result.pocket_book, result.metrics
    if as_json:
        click.echo(json.dumps({"ref": book.ref, "path": str(book.path), "metrics": m,
                               "tracking": book.meta.tracking}, indent=2, default=str))
        return
    line = f"Saved {book.ref}"
    if book.meta.stacked_on:
        line += f" (on top of {' + '.join(book.meta.stacked_on)})"
    done = m["steps"] - m.get("resumed_at_step", 0)
    line += (f": {m['steps']} steps" + (f" ({done} in this run, resumed at step "
                                        f"{m['resumed_at_step']})" if "resumed_at_step" in m
                                        else "") + f" in {m['train_seconds']:.0f} s")
    if m.get("train_loss_first") is not None and m.get("loss_logs") == 1:
        line += f", loss {m['train_loss_final']:.3f} (one logged value)"
    elif m.get("train_loss_first") is not None:
        line += f", loss {m['train_loss_first']:.3f} → {m['train_loss_final']:.3f}"
    if m.get("tokens_per_second"):
        line += f", {m['tokens_per_second']:.0f} tokens/s"
    if m.get("processes"):
        line += f" ({m['processes']} processes together)"
    if m.get("weights_step") is not None:  # the last step's loss is not the saved weights'
        from adapterkit.library.card import kept_weights_line

        line += f"; {kept_weights_line(m)}"
    click.echo(line)
    if m.get("early_stopping"):
        from adapterkit.library.card import early_stopping_line

        click.echo(early_stopping_line(m["early_stopping"], m.get("precision"),
                                       m.get("weights_step")))
    if m.get("forgetting"):
        from adapterkit.training.metrics import base_loss_note

        f = m["forgetting"]
        click.echo(f"Forgetting: general-text loss {f['general_loss_base']:.4f} → "
                   f"{f['general_loss']:.4f} ({f['general_loss_change_pct']:+.2f}%)"
                   + _guard_words(m.get("guard")) + base_loss_note(f))
    from adapterkit.library.card import tracking_lines

    for tracked in tracking_lines(book.meta.tracking):
        click.echo(f"Tracked: {tracked}")


def _guard_words(guard: dict[str, Any] | None) -> str:
    """How the forgetting guard acted, for the forgetting line: a figure measured without a
    guard reads the same as one a guard held to its budget otherwise (``--guard-weight 0``
    without a budget turns sft's default guard off)."""
    if not guard:
        return ", no guard"
    kl = f"KL weight {guard['weight']:g}" if guard.get("weight") else "no KL term"
    budget = guard.get("budget_pct")  # (none: a KL term alone, e.g. dpo --guard-weight 0.3)
    return f", guard: {f'budget {budget:g}%' if budget is not None else 'no budget'}, {kl}"


def _reports() -> bool:
    """Whether this process reports the run: the only one, or the main rank of several
    (unless the caller that launched it reports it: a ``--search`` trial)."""
    from adapterkit.training.launch import NO_REPORT_ENV, ranks

    return ranks().is_main and not os.environ.get(NO_REPORT_ENV)


def _parse_sets(items: tuple[str, ...]) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _load_for_book(ctx: click.Context, ref: str, base: str | None, force: bool = False,
                   exact: bool = False):
    """Load the pocket book's base (in its method's precision) and attach the pocket book.

    ``exact``: hold a 4-bit base in the layout it was trained in (evaluation), rather than
    bitsandbytes' faster but rounding CPU inference layout (generation).
    """
    from adapterkit.runtime.peft_model import peft_model

    library, book, loaded = _base_for_book(ctx, ref, base, exact=exact)
    return book, loaded, peft_model(loaded, book, force=force, library=library)


def _base_for_book(ctx: click.Context, ref: str, base: str | None, *, exact: bool = False):
    """``(library, book, base)``: the base pocket book ``ref`` was made on (or ``base``),
    loaded as it was trained (:func:`~adapterkit.runtime.peft_model.quantization_of`, the rule
    of every path), the loading line saying how."""
    from adapterkit.base.load import load_base
    from adapterkit.base.resolve import base_spec_for
    from adapterkit.library.store import Library
    from adapterkit.runtime.session import quantizations

    state = obj(ctx)
    library = Library(state["home"], plugins=state["plugins"])
    book = library.get(ref)
    needs = quantizations(library, {book.ref: [book]})
    quantization = needs[book.ref]
    base_name = base or base_spec_for(book.meta.base, state["home"])
    say(f"Loading base {base_name} in {loaded_in(quantization, needs)}...")
    loaded = load_base(base_name, quantization=quantization, home=state["home"], progress=say)
    if exact:
        from adapterkit.base.load import keep_4bit_layout

        keep_4bit_layout(loaded.model)
    return library, book, loaded


@click.command("eval")
@click.argument("ref")
@click.option("--data", help="Evaluation data: text, prompt/completion or messages rows; not "
                             "with --harness.")
@click.option("--general", help="General-English text for the forgetting check "
                                "(`general` = the text shipped with adapterkit; `off` or "
                                "left out: no check).")
@click.option("--base", help="Base to evaluate on (default: the one the pocket book records).")
@click.option("--scorer", default="exact_match", show_default=True,
              help="Scorer for generated answers (prompt/completion data).")
@click.option("--max-new-tokens", type=int, default=32, show_default=True)
@click.option("--chat/--no-chat", default=None,
              help="Use the chat template (default: if the base has one; with --harness "
                   "only when given, as lm-evaluation-harness itself defaults).")
@click.option("--skip-bad-rows", is_flag=True,
              help="Evaluate on the usable rows when some have the wrong shape, saying how "
                   "many were skipped. Default: refuse the file, naming the bad rows.")
@click.option("--harness", metavar="TASKS", help="lm-evaluation-harness tasks (comma list, or "
              "task YAML files) run on the plain base and with REF, side by side; recorded in "
              "the metadata and card. Needs adapterkit[eval].")
@click.option("--limit", type=click.IntRange(min=1), help="--harness: the first N samples of "
              "each task (quick, not comparable with full-set scores).")
@click.option("--include-path", "include", multiple=True, type=click.Path(),
              help="--harness: a folder of your own task YAML files (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def eval_cmd(ctx: click.Context, ref: str, data: str | None, general: str | None,
             base: str | None, scorer: str, max_new_tokens: int, chat: bool | None,
             skip_bad_rows: bool, harness: str | None, limit: int | None,
             include: tuple[str, ...], as_json: bool) -> None:
    """Evaluate pocket book REF: task loss and perplexity, exact match on generated answers
    (prompt/completion data), and with --general the forgetting check (general-text loss with
    and without the pocket book, as a relative change).

    With --harness TASKS, standard benchmarks instead: lm-evaluation-harness runs TASKS on the
    plain base and with REF (a pocket book, a saved stack, or an inline stack a+b), and both
    scores are shown side by side and recorded in REF's metadata and card.

    \b
    Examples:
      adapterkit eval triage --data held_out.jsonl --general general
      adapterkit eval triage --harness arc_easy,hellaswag --limit 200
      adapterkit eval triage+manner --harness my_task.yaml
    """
    from adapterkit.training.data import load_data
    from adapterkit.training.metrics import accuracy, forgetting, task_loss, uses_chat

    if harness is not None:
        _refuse_with_harness(ctx)
        _eval_harness(ctx, ref, harness, base=base, limit=limit, include=list(include),
                      chat=chat, as_json=as_json)
        return
    given = [f"--{n.replace('_', '-')}" for n, v in (("limit", limit), ("include_path", include))
             if v]
    if given:
        raise ConfigError(f"{', '.join(given)}: only with --harness TASKS")
    if not data:
        raise ConfigError("give --data FILE (evaluation data) or --harness TASKS "
                          "(lm-evaluation-harness tasks)")
    check_sampling(max_new_tokens=max_new_tokens)
    pm = obj(ctx)["plugins"]
    score_fn = pm.scorers.get(scorer)
    dataset = load_data(data, formats=pm.data_formats,
                        shapes=("text", "prompt_completion", "messages"), reader="eval",
                        skip_bad_rows=skip_bad_rows)
    if dataset.skipped:
        say(f"Skipped {len(dataset.skipped)} row(s) of the wrong shape (--skip-bad-rows)")
    from click.core import ParameterSource

    answers = [f"--{n.replace('_', '-')}" for n in ("scorer", "max_new_tokens")
               if ctx.get_parameter_source(n) not in (ParameterSource.DEFAULT, None)]
    if answers and dataset.shape != "prompt_completion":  # they would do nothing
        raise ConfigError(f"{' and '.join(answers)} score generated answers, which only "
                          f"prompt/completion rows have ({dataset.source} holds "
                          f"{dataset.shape} rows): leave them out")
    if dataset.shape == "messages" and chat is False:
        raise ConfigError("--no-chat: messages rows are chat turns, read through the base's "
                          "chat template; leave --no-chat out (or give prompt/completion rows)")
    general_texts = None
    if general and general.lower() != "off":  # (off: no check, as for train; eval's default)
        # as train reads it: a file without text rows is refused, not skipped
        from adapterkit.training.build import general_texts as read_general

        general_texts = read_general(general)
    book, loaded, model = _load_for_book(ctx, ref, base, exact=True)
    use_chat = uses_chat(loaded.tokenizer, chat)
    if dataset.shape == "messages" and not use_chat:
        raise ConfigError(f"base {loaded.name} has no chat template, and messages rows are "
                          "chat turns: evaluate prompt/completion or text rows on it")
    report: dict[str, Any] = {"pocket_book": book.ref, "data": dataset.describe()}
    report["task"] = task_loss(model, loaded.tokenizer, dataset.rows, chat=use_chat)
    with model.disable_adapter():
        report["task_base"] = task_loss(model, loaded.tokenizer, dataset.rows, chat=use_chat)
    if dataset.shape == "prompt_completion":
        acc, _ = accuracy(model, loaded.tokenizer, dataset.rows, chat=use_chat,
                          scorer=score_fn.score, max_new_tokens=max_new_tokens)
        with model.disable_adapter():
            acc_base, _ = accuracy(model, loaded.tokenizer, dataset.rows, chat=use_chat,
                                   scorer=score_fn.score, max_new_tokens=max_new_tokens)
        report[scorer] = {"pocket_book": acc, "base": acc_base}
    if general_texts:
        report["forgetting"] = forgetting(model, loaded.tokenizer, general_texts)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    t, tb = report["task"], report["task_base"]
    click.echo(f"{book.ref} on {dataset.source}")
    click.echo(f"  task loss      {t['loss']:.4f} (perplexity {t['perplexity']:.2f})   "
               f"plain base {tb['loss']:.4f} (perplexity {tb['perplexity']:.2f})")
    if scorer in report:
        click.echo(f"  {scorer:<14} {report[scorer]['pocket_book']:.1%}   "
                   f"plain base {report[scorer]['base']:.1%}")
    if "forgetting" in report:
        f = report["forgetting"]
        click.echo(f"  forgetting     general-text loss {f['general_loss_base']:.4f} → "
                   f"{f['general_loss']:.4f} ({f['general_loss_change_pct']:+.2f}%)")


def _refuse_with_harness(ctx: click.Context) -> None:
    """--harness runs benchmark tasks; the options of the data evaluation have no part in it."""
    from click.core import ParameterSource

    data_only = ("data", "general", "scorer", "max_new_tokens", "skip_bad_rows")
    given = [f"--{n.replace('_', '-')}" for n in data_only
             if ctx.get_parameter_source(n) not in (ParameterSource.DEFAULT, None)]
    if given:
        raise ConfigError(f"{', '.join(given)} evaluate on your own data, --harness on "
                          "lm-evaluation-harness tasks: run them as two commands")


def _eval_harness(ctx: click.Context, ref: str, harness: str, *, base: str | None,
                  limit: int | None, include: list[str], chat: bool | None,
                  as_json: bool) -> None:
    """``eval REF --harness TASKS``: check the tasks, load the base with REF, run, record."""
    from adapterkit.runtime.harness import check_tasks, parse_tasks, record_harness, run_harness

    tasks = check_tasks(parse_tasks(harness), include)  # before the base loads
    book, loaded, model, target = _load_target(ctx, ref, base)
    if chat and not getattr(loaded.tokenizer, "chat_template", None):
        raise ConfigError(f"--chat: base {loaded.name} has no chat template")
    report = run_harness(model, loaded.tokenizer, tasks, target=target, limit=limit,
                         chat_template=bool(chat), progress=say)
    recorded = None
    if book is not None and report.tasks:
        recorded = record_harness(library(ctx), book, report, base=loaded.name).ref
    if as_json:
        click.echo(json.dumps({**report.as_dict(), "recorded_in": recorded}, indent=2))
        return
    click.echo(_harness_table(report, loaded.name))
    if recorded:
        click.echo(f"Recorded in {recorded}'s metadata and card.")
    elif book is None:
        click.echo("Not recorded: an inline stack has no library entry (save it with "
                   "`adapterkit stack` and evaluate that to keep the results).")


def _harness_table(report: Any, base_name: str) -> str:
    """The harness report as a table: each task's metrics, plain base beside pocket book."""
    from adapterkit.cli.common import table

    def cell(value: Any, stderr: Any) -> str:
        if not isinstance(value, (int, float)):
            return "–"
        return f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")

    rows = []
    for task, rec in report.tasks.items():
        for metric, pair in rec["metrics"].items():
            b, p = pair["base"], pair["pocket_book"]
            change = f"{p - b:+.4f}" if isinstance(b, (int, float)) else "–"
            rows.append([task, metric, cell(b, pair["base_stderr"]),
                         cell(p, pair["pocket_book_stderr"]), change, str(rec["samples"])])
    limit = f", first {report.limit} samples per task" if report.limit else ""
    head = (f"lm-evaluation-harness {report.lm_eval} on base {base_name}{limit}"
            + (", chat template" if report.chat_template else ""))
    if not rows:
        return head + "\n(no metrics came back)"
    return head + "\n" + table(rows, ["task", "metric", "plain base", report.target,
                                       "change", "samples"])


def _load_target(ctx: click.Context, ref: str, base: str | None) -> tuple[Any, Any, Any, str]:
    """REF's base loaded with REF on it through plain PEFT: a pocket book, a saved stack, or
    an inline stack ``a+b`` / ``a*1+b*0.5`` (then no library entry: the book is ``None``)."""
    if "+" not in ref and "*" not in ref:
        book, loaded, model = _load_for_book(ctx, ref, base, exact=True)
        return book, loaded, model, book.ref
    from adapterkit.base.load import load_base
    from adapterkit.base.resolve import base_spec_for
    from adapterkit.runtime.peft_model import peft_model
    from adapterkit.runtime.session import quantizations
    from adapterkit.serving.names import parse, resolve

    state = obj(ctx)
    lib = library(ctx)
    named = [lib.get(name) for name, _ in parse(ref)]  # unknown ones: before the base loads
    # a 4-bit member (qlora) needs the base in 4 bits, as it was trained: the stack with it
    trained = {r: q for r, q in quantizations(lib, {b.ref: [b] for b in named}).items() if q}
    quantization = next(iter(trained.values()), None)
    base_name = base or base_spec_for(named[0].meta.base, state["home"])
    say(f"Loading base {base_name} in {loaded_in(quantization, trained)}...")
    loaded = load_base(base_name, quantization=quantization, home=state["home"], progress=say)
    if quantization:
        from adapterkit.base.load import keep_4bit_layout

        keep_4bit_layout(loaded.model)
    target = resolve(lib, loaded, ref, base_id=None)  # here every name is a pocket book's
    members = [(lib.get(name), weight) for name, weight in target.members]
    model = peft_model(loaded, members[-1][0], library=lib, weights=members)
    return None, loaded, model, target.key


@click.command("generate")
@click.argument("prompt")
@click.option("--base", help="Base (default: the base of --adapter).")
@click.option("--adapter", "adapter", help="Pocket book to answer with (NAME or NAME@V).")
@click.option("--no-adapter", is_flag=True, help="Answer with the plain base, for comparison "
              "(with --adapter NAME: the base NAME was made on, without NAME).")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True,
              help="0 = greedy decoding.")
@click.option("--chat/--no-chat", default=None, help="Use the chat template (default: if any).")
@click.option("--force", is_flag=True, help="Attach even if the pocket book's base differs.")
@click.pass_context
def generate_cmd(ctx: click.Context, prompt: str, base: str | None, adapter: str | None,
                 no_adapter: bool, max_new_tokens: int, temperature: float, chat: bool | None,
                 force: bool) -> None:
    """Answer PROMPT with a pocket book (or the plain base); chat template applied for
    instruct bases."""
    from adapterkit.base.load import load_base
    from adapterkit.training.metrics import generate, uses_chat

    check_sampling(max_new_tokens=max_new_tokens, temperature=temperature)
    if force and (not adapter or no_adapter):
        raise ConfigError("--force attaches a pocket book made on another base; with "
                          f"{'--no-adapter' if no_adapter else 'no --adapter'} none is attached, "
                          "so drop --force")
    state = obj(ctx)
    if adapter and not no_adapter:
        _, loaded, model = _load_for_book(ctx, adapter, base, force=force)
    elif adapter:  # the base NAME was made on, loaded as NAME answers on it, without NAME
        _, _, loaded = _base_for_book(ctx, adapter, base)
        model = loaded.model
    elif base:
        say(f"Loading base {base} in {loaded_in(None, {})}...")
        loaded = load_base(base, home=state["home"], progress=say)
        model = loaded.model
    else:
        raise ConfigError("give --base BASE or --adapter NAME")
    answer = generate(model, loaded.tokenizer, [prompt], chat=uses_chat(loaded.tokenizer, chat),
                      max_new_tokens=max_new_tokens, temperature=temperature)[0]
    click.echo(answer)


def _past_saved(saved: list[str], trainer: Any, options: TrainOptions,
                given: dict[str, Any] | None = None,
                config: str | None = None) -> tuple[str, bool]:
    """What a run again adds past the pocket books a run saved besides its own, and whether
    that is their removal: the option that reuses it (``Trainer.reuse_option``, less what
    that refuses, ``reuse_drops``), else removing them (a run again would train them under
    taken names). ``given``: the options its flags gave; ``config``: its ``--config`` file."""
    if not saved:
        return "", False
    reuse = _reuse_flags(trainer, saved[0], options, given or {}, config) \
        if len(saved) == 1 else None
    if reuse:
        return f" (reuse {saved[0]}: add {reuse})", False
    return f" (remove {', '.join(saved)} first: " + ", ".join(
        f"adapterkit rm {b}" for b in saved) + ")", True


def _reuse_said(exc: BesidesTaken, trainer: Any, options: TrainOptions, given: dict[str, Any],
                config: str | None, resumed: bool) -> None:
    """Below a run refused for a pocket book it saves besides its own that the library holds:
    the flags that reuse it (:func:`_reuse_flags`); never in the way of the refusal.
    ``resumed``: the command has --resume (which --restart then replaces)."""
    try:
        reuse = _reuse_flags(trainer, exc.name, options, given, config) \
            if exc.offers_reuse else None
        if reuse:
            then_say(exc, f"On the command line: add {reuse}" + {
                "resume": ", and pass --resume", "fresh": ", and run it without --resume",
                "restart": ", and pass --restart" + (" in place of --resume" if resumed else "")
            }.get(exc.then or "", "") + ".")
    except Exception:
        pass


def _reuse_flags(trainer: Any, book: str, options: TrainOptions, given: dict[str, Any],
                 config: str | None) -> str | None:
    """The flag that reuses ``book`` (``--reward NAME`` is ``--set reward=NAME``; another
    trainer's ``--set OPTION=NAME``), and the options that reuse refuses (``reuse_drops``):
    left out where a flag gave them, removed from the ``--config`` file where it did. None
    where the trainer has no ``reuse_option``."""
    from adapterkit.training.reuse import drops_given, reuse_option

    option = reuse_option(trainer)
    if option is None:
        return None
    own, training = drops_given(trainer, options)
    sets = given.get("trainer_options") or {}
    out = [f"--set {k}" for k in own if k in sets] + [
        _FLAG_OF[k] for k in training if given.get(k) is not None and k in _FLAG_OF]
    filed = [k for k in own if k not in sets] + [
        k for k in training if given.get(k) is None or k not in _FLAG_OF]
    return (f"--reward {book}" if option == "reward" else f"--set {option}={book}") \
        + (f" and leave out {', '.join(out)}" if out else "") \
        + (f", and remove {', '.join(filed)} from {config or 'the --config file'}"
           if filed else "")


def _how_on(exc: BaseException, past: str, removes: bool = False,
            resumed: bool = False) -> tuple[bool, str]:
    """What a next run can do, from what the run left on ``exc``
    (:func:`adapterkit.training.run._left_behind`: --resume only from a checkpoint it can
    continue), with ``past`` (:func:`_past_saved`); and whether it is a command alone. Past
    a removal, never --resume: the run would train the removed book again, and go on from
    steps taken against the one removed. ``resumed``: the command had --resume, which a run
    with no checkpoint to go on from refuses."""
    again = "command again" + (" without --resume" if resumed else "")
    checkpoint, every = getattr(exc, "checkpoint", None), getattr(exc, "save_steps", None)
    if getattr(exc, "finished", False):
        return False, (f"training had finished ({checkpoint}) but was not measured: run the "
                       f"same command with --restart to train it again{past}")
    if checkpoint and removes:
        return False, (f"{checkpoint} was trained against what a run again trains anew: run "
                       f"the same command with --restart{past}")
    if checkpoint:
        return True, f"run the same command with --resume to continue from {checkpoint}{past}"
    if every is not None:
        return False, (f"no checkpoint was written yet (one every --save-steps {every} "
                       f"steps): run the {again}{past}")
    return True, f"run the same {again}{past}"  # (before training started)
