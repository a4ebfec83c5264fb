"""Training on several processes or machines: accelerate's launcher, and where a process stands.

``adapterkit train`` runs in this process by default. With ``--processes N``, an accelerate
config file, or ``--num-machines M``, the command starts itself again through accelerate's
launcher (:func:`relaunch`; torchrun underneath, which picks gloo on CPUs and NCCL on GPUs) and
waits for every rank. Each rank reads where it stands from the launcher's environment
(:func:`ranks`), so plain ``accelerate launch -m adapterkit train …`` and
``torchrun -m adapterkit train …`` run the same code.

Under :func:`relaunch` a rank does not print its error: it hands it to the launcher
(:func:`hand_over`), and the launching process says in one line which rank failed and why.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from adapterkit.errors import ConfigError, LaunchError

#: Set in every rank started by :func:`relaunch`: its errors go to the launcher, not stderr.
LAUNCHED_ENV = "ADAPTERKIT_LAUNCHED"
#: Set by a caller that reports the run itself (``--search`` for a launched trial): the main
#: rank then prints no result of its own on stdout.
NO_REPORT_ENV = "ADAPTERKIT_NO_REPORT"
#: Seconds the machines of a multi-machine run wait for each other before giving up.
DEFAULT_RENDEZVOUS_TIMEOUT = 60
#: Seconds a rank waits in a collective (a barrier, a gradient all-reduce) for the others;
#: transformers' default ``ddp_timeout``, long enough for the main process to save alone.
COLLECTIVE_TIMEOUT = 1800
_MARK = "adapterkit"  # key in an error file written by hand_over


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in a run (1 process, rank 0, when nothing launched it)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """The one process that writes: library entry, card, caches, checkpoints."""
        return self.rank == 0


def _env_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return default


def ranks() -> Ranks:
    """This process's rank and world size, as torchrun, ``accelerate launch`` or MPI set them;
    nothing is initialised."""
    world = _env_int(("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"), 1)
    rank = _env_int(("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"), 0)
    local = _env_int(("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK",
                      "MV2_COMM_WORLD_LOCAL_RANK"), 0)
    local_world = _env_int(("LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE",
                            "MV2_COMM_WORLD_LOCAL_SIZE"), world)
    return Ranks(rank, local, world, local_world)


# -- inside a run: what the ranks share ---------------------------------------------------------

def join() -> Any:
    """Join the run's process group through accelerate (it picks gloo on CPUs, NCCL on GPUs),
    the same one the TRL/transformers trainer uses later; returns accelerate's ``PartialState``
    (``.device`` is this rank's device)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available(),
                        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT))


@contextmanager
def main_first(*, local: bool = False) -> Iterator[None]:
    """Run the block on the main process before the other ranks (``local``: on each
    machine's first rank before that machine's others), so what it creates once — the
    library's catalog, a converted GGUF base — is there for them; a plain block in one
    process."""
    if not ranks().distributed:
        yield
        return
    state = join()
    with state.local_main_process_first() if local else state.main_process_first():
        yield


def wait_for_everyone() -> None:
    """A barrier: every rank gets here before any goes on."""
    from accelerate import PartialState

    PartialState().wait_for_everyone()


def share(value: Any = None) -> Any:
    """The main process's ``value``, on every rank (what the others pass is ignored)."""
    from accelerate.utils import broadcast_object_list

    join()  # accelerate's broadcast is a silent no-op before the process group exists
    return broadcast_object_list([value], from_process=0)[0]


def gather(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    import torch.distributed as dist

    join()
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


#: Set by :func:`relaunch` for its ranks: a file where the main one lists what it saved, so
#: that a failure after a save is never reported as "nothing was saved".
SAVED_ENV = "ADAPTERKIT_SAVED_FILE"


def record_saved(ref: str) -> None:
    """Tell the launcher that ``ref`` is in the library (no-op outside :func:`relaunch`)."""
    path = os.environ.get(SAVED_ENV)
    if path and ranks().is_main:
        try:
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(ref + "\n")
        except OSError:
            pass  # the launcher is gone (its folder with it): nobody to tell


def _saved(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as fh:
            return [line.strip() for line in fh if line.strip()]
    except OSError:
        return []


def _with_saved(line: str, saved: list[str]) -> str:
    """A failure line that says what was saved before the failure, when anything was."""
    if not saved:
        return line
    what = f"{', '.join(saved)} {'was' if len(saved) == 1 else 'were'} saved to the library " \
        "before the failure"
    if "nothing was saved to the library" in line:
        return line.replace("nothing was saved to the library", what)
    return f"{line} ({what})"


def leave() -> None:
    """Leave the process group at the end of a command (not between the trainings of one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


#: Seconds a failing rank waits for :func:`leave_on_failure` before it exits anyway.
LEAVE_TIMEOUT = 5.0


def leave_on_failure(timeout: float = LEAVE_TIMEOUT) -> bool:
    """Leave the process group on the way out of a failed command, for at most ``timeout``
    seconds; whether it was left.

    A gloo group left to the interpreter's teardown while a peer still waits on a collective
    can abort the process ("terminate called without an active exception", exit -6) after its
    error is printed; leaving it first avoids that. But a group's shutdown may wait for a
    collective in flight (NCCL's does, since PyTorch 2.6), and the peer may be gone, so it runs
    in a daemon thread. When it is not done in time the caller should exit at once
    (``os._exit``): a thread still inside the shutdown when the interpreter finalizes would be
    ended there and abort the process all the same.
    """
    import threading

    def quietly() -> None:
        try:
            leave()
        except Exception:  # already failing: the command's own error is the one to report
            pass

    worker = threading.Thread(target=quietly, name="adapterkit-leave", daemon=True)
    worker.start()
    worker.join(timeout)
    return not worker.is_alive()


#: Seconds between two looks at whether the launcher is still there (see :func:`watch_launcher`).
WATCH_INTERVAL = 0.2
#: Seconds a rank has, once its launcher is gone, to unwind before it is ended outright.
ORPHAN_GRACE = 15.0


def watch_launcher() -> Callable[[], None]:
    """End this rank when the process that launched it is gone (killed with ``kill -9``, or
    crashed): torchrun stops its ranks when it can, but a launcher killed outright cannot,
    and ranks left running would go on training — and the main one would save — for a
    command its user saw end. A daemon thread notices the rank has a new parent, sends this
    process SIGTERM (which unwinds like Ctrl-C: nothing is saved), and after
    :data:`ORPHAN_GRACE` seconds ends it outright. Returns a function that stops watching.
    """
    import signal
    import threading

    parent = os.getppid()
    done = threading.Event()

    def watch() -> None:
        while not done.wait(WATCH_INTERVAL):
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGTERM)
                if not done.wait(ORPHAN_GRACE):
                    os._exit(143)
                return

    threading.Thread(target=watch, name="adapterkit-launcher-watch", daemon=True).start()
    return done.set


def fsdp_enabled() -> bool:
    """Whether accelerate's launcher set this run up for FSDP (from an accelerate config)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def hand_over(message: str, *, after_another: bool = False) -> bool:
    """Give this rank's one-line error to :func:`relaunch`'s launcher instead of printing it.

    :param after_another: the error follows another rank's failure (a collective that lost
        its peer); the launcher names the other rank's failure first.
    :returns: ``False`` (print it yourself) outside a run that :func:`relaunch` started.
    """
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not os.environ.get(LAUNCHED_ENV) or not path:
        return False
    with open(path, "w", encoding="utf-8") as fh:
        json.dump({"message": message, "timestamp": int(time.time()), _MARK: ranks().rank,
                   "after_another": after_another}, fh)
    return True


# -- starting a run --------------------------------------------------------------------------------

@dataclass(frozen=True)
class LaunchPlan:
    """What :func:`relaunch` starts, checked: ``processes`` on this machine, ×
    ``num_machines``."""

    processes: int = 1
    num_machines: int = 1
    machine_rank: int = 0
    main_address: str | None = None
    config_file: str | None = None
    rendezvous_timeout: float = DEFAULT_RENDEZVOUS_TIMEOUT

    @property
    def needed(self) -> bool:
        """Whether this asks for more than today's single in-process run."""
        return self.processes * self.num_machines > 1 or self.config_file is not None


def places() -> tuple[int, str]:
    """How many processes this machine can place, and of what: one per visible GPU, or on a
    CPU-only machine one per core this process may run on."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count(), "GPU"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(int(cores or 1), 1), "CPU core"


def read_accelerate_config(path: str) -> Any:
    """accelerate's own reading of a config file; :class:`ConfigError` when it cannot read it."""
    from accelerate.commands.config.config_args import load_config_from_file

    if not os.path.isfile(path):
        raise ConfigError(f"accelerate config {path} does not exist; write one with "
                          "`accelerate config --config_file FILE`")
    try:
        return load_config_from_file(path)
    except Exception as exc:  # yaml/json errors, unknown keys: accelerate raises many kinds
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ConfigError(f"cannot read accelerate config {path}: {reason[:300]}") from None


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--main-address expects HOST:PORT (e.g. 10.0.0.1:29500), got {text!r}")
    return host.strip("[]"), int(port)


def plan_launch(*, processes: int | None = None, config_file: str | None = None,
                num_machines: int | None = None, machine_rank: int | None = None,
                main_address: str | None = None,
                rendezvous_timeout: float | None = None) -> LaunchPlan:
    """Check a launch before anything starts; every problem in one :class:`ConfigError`.

    Flags left ``None`` come from the accelerate config file (its ``num_processes`` is the
    total over all machines), then from one process on one machine; the rendezvous timeout
    from :data:`DEFAULT_RENDEZVOUS_TIMEOUT`.
    """
    if rendezvous_timeout is None:
        rendezvous_timeout = DEFAULT_RENDEZVOUS_TIMEOUT
    config = read_accelerate_config(config_file) if config_file else None
    machines = num_machines if num_machines is not None else \
        int(getattr(config, "num_machines", 1) or 1)
    if processes is None and config is not None and (getattr(config, "num_processes", 0) or 0) > 0:
        processes = max(int(config.num_processes) // max(machines, 1), 1)
    processes = 1 if processes is None else processes
    rank = machine_rank if machine_rank is not None else \
        int(getattr(config, "machine_rank", 0) or 0)
    if main_address is None and config is not None and getattr(config, "main_process_ip", None):
        main_address = f"{config.main_process_ip}:{config.main_process_port or 29500}"
    problems = [p for p in [_sharding_problem(config, str(config_file))] if p] \
        if config is not None else []
    if processes < 1:
        problems.append(f"--processes must be at least 1, got {processes}")
    else:
        slots, kind = places()
        if processes > slots:
            problems.append(
                f"--processes {processes} is more than this machine can place: it has {slots} "
                f"{kind}{'s' if slots != 1 else ''} (one process each); use --processes "
                f"{slots} or fewer, or add machines with --num-machines")
    if machines < 1:
        problems.append(f"--num-machines must be at least 1, got {machines}")
    elif not 0 <= rank < machines:
        problems.append(f"--machine-rank must be 0 to {machines - 1} (0 on the main machine), "
                        f"got {rank}")
    if machines > 1 and not main_address:
        problems.append("--num-machines above 1 needs --main-address HOST:PORT (the main "
                        "machine, --machine-rank 0, reachable from every machine)")
    if main_address:
        try:
            _address(main_address)
        except ConfigError as exc:
            problems.append(str(exc))
    if not rendezvous_timeout > 0:
        problems.append(f"--rendezvous-timeout must be above 0 seconds, got {rendezvous_timeout}")
    if machines == 1 and processes == 1 and config is None:
        # nothing would be launched: flags that only a launch uses would be silently dropped
        unused = [flag for flag, given in (
            ("--main-address", main_address is not None),
            ("--machine-rank", machine_rank is not None),
            ("--rendezvous-timeout", rendezvous_timeout != DEFAULT_RENDEZVOUS_TIMEOUT)) if given]
        if unused:
            many = len(unused) > 1
            problems.append(f"{', '.join(unused)} only act{'' if many else 's'} when training on "
                            "several processes or machines: add --processes N or --num-machines "
                            f"M, or leave {'them' if many else 'it'} out")
    if problems:
        raise ConfigError("; ".join(problems))
    return LaunchPlan(processes, machines, rank, main_address, config_file, rendezvous_timeout)


def _sharding_problem(config: Any, path: str) -> str | None:
    """Why a config's FSDP or DeepSpeed set-up cannot run here, or ``None``."""
    kind = str(getattr(config, "distributed_type", "")).rsplit(".", 1)[-1]
    if kind not in ("FSDP", "DEEPSPEED"):
        return None
    if places()[1] != "GPU":
        return (f"accelerate config {path} asks for {kind}, which runs on GPUs, and this "
                "machine has none (accelerate would quietly train with plain DDP instead): use "
                "distributed_type: MULTI_CPU, or leave --accelerate-config out")
    # adapterkit measures and saves the pocket book outside the trainer's wrapper, so the
    # weights must be whole there, or gathered by torch's own state-dict API (FSDP 2)
    if kind == "FSDP" and int((getattr(config, "fsdp_config", None) or {})
                              .get("fsdp_version", 1)) < 2:
        return (f"accelerate config {path} uses FSDP version 1, whose sharded weights "
                "adapterkit cannot read back after training: set fsdp_version: 2 under "
                "fsdp_config")
    if kind == "DEEPSPEED" and int((getattr(config, "deepspeed_config", None) or {})
                                   .get("zero_stage", 0) or 0) >= 3:
        return (f"accelerate config {path} uses DeepSpeed ZeRO stage 3, whose partitioned "
                "weights adapterkit cannot read back after training: use zero_stage 1 or 2 (a "
                "LoRA's weights are small), or FSDP version 2")
    return None


def _accelerate_args(plan: LaunchPlan, argv: list[str]) -> list[str]:
    """``accelerate launch`` arguments that run ``python -m adapterkit ARGV`` per the plan."""
    args = ["--num_processes", str(plan.processes * plan.num_machines),
            "--num_machines", str(plan.num_machines), "--machine_rank", str(plan.machine_rank),
            "--rdzv_conf", f"timeout={max(int(plan.rendezvous_timeout), 1)}",
            "--max_restarts", "0", "--monitor_interval", "0.1"]
    if plan.main_address:
        host, port = _address(plan.main_address)
        args += ["--main_process_ip", host, "--main_process_port", str(port)]
    else:
        args += ["--main_process_port", "0"]  # a free port: runs side by side never collide
    torchrun_path = True
    if plan.config_file:
        args += ["--config_file", plan.config_file]
        kind = str(getattr(read_accelerate_config(plan.config_file), "distributed_type", ""))
        # accelerate starts CPU processes through MPI only; torchrun is its path for the rest
        torchrun_path = kind.rsplit(".", 1)[-1] in ("NO", "MULTI_CPU", "MULTI_GPU")
    else:
        args += ["--mixed_precision", "no", "--dynamo_backend", "no"]  # the trainer decides
    if torchrun_path and plan.processes * plan.num_machines > 1:
        args.append("--multi_gpu")  # accelerate's name for "torchrun, N processes"
    return args + ["--module", "adapterkit", *argv]


_CPP_LOG = "TORCH_CPP_LOG_LEVEL"
_USER_CPP_LOG = "ADAPTERKIT_USER_TORCH_CPP_LOG_LEVEL"


def asks_for_launcher(launch: dict[str, Any]) -> bool:
    """Whether launch options (``--processes``, ``--accelerate-config``, ``--num-machines``)
    ask for more than this one process: then :func:`quiet_launcher` is due before torch is
    imported."""
    return (launch.get("processes") or 1) > 1 or bool(launch.get("config_file")) or \
        (launch.get("num_machines") or 1) > 1


def quiet_launcher() -> None:
    """Keep torch's C++ connection retries and their stack dumps out of the launching
    process's stderr (it says what happened in one line); call before torch is imported
    there. The ranks keep the user's setting."""
    if _USER_CPP_LOG not in os.environ:
        os.environ[_USER_CPP_LOG] = os.environ.get(_CPP_LOG, "")
        os.environ[_CPP_LOG] = "FATAL"


@contextmanager
def _launch_env(plan: LaunchPlan, saved_file: str) -> Iterator[None]:
    """The ranks' environment: marked as ours, and on CPUs the cores shared out between them
    (torchrun would give each one thread). Afterwards this process is as it was before
    :func:`quiet_launcher`: its environment, its loggers' levels, and its signal handlers
    (torch's launcher installs its own for SIGTERM, SIGINT, SIGHUP, SIGQUIT)."""
    import signal

    saved = dict(os.environ)
    user_level = saved.pop(_USER_CPP_LOG, None)
    if user_level is not None:  # the user's own setting, for the ranks and for afterwards
        saved.pop(_CPP_LOG, None)
        if user_level:
            saved[_CPP_LOG] = user_level
    os.environ.clear()
    os.environ.update(saved)
    os.environ[LAUNCHED_ENV] = "1"
    os.environ[SAVED_ENV] = saved_file
    signals = [getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")
               if hasattr(signal, n)]
    handlers = [(sig, signal.getsignal(sig)) for sig in signals]
    slots, kind = places()
    if kind == "CPU core" and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(slots // plan.processes, 1))
    import torch.distributed.run  # noqa: F401  (its loggers exist from here on)

    quiet = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)
             if n.startswith(("torch.distributed", "accelerate"))]  # each sets its own level
    levels = [q.level for q in quiet]
    for q in quiet:  # their failure reports are tracebacks; we say it in one line
        q.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
        for q, level in zip(quiet, levels):
            q.setLevel(level)
        for sig, handler in handlers:
            if handler is not None:
                signal.signal(sig, handler)


def relaunch(argv: list[str], *, processes: int | None = None, config_file: str | None = None,
             num_machines: int | None = None, machine_rank: int | None = None,
             main_address: str | None = None, rendezvous_timeout: float | None = None) -> int:
    """Run ``adapterkit ARGV`` as ``processes`` ranks on this machine (× ``num_machines``)
    through accelerate's launcher, and wait for all of them.

    ``argv`` is the command without the launch options (:func:`strip_launch_options`). Returns
    0 when every rank finished; raises :class:`ConfigError` for a bad launch (before anything
    starts), :class:`LaunchError` (one line: which rank, what happened) when a rank failed or
    the machines did not meet within ``rendezvous_timeout`` — every other rank is stopped
    then — and ``KeyboardInterrupt`` on Ctrl-C (the ranks are stopped too).
    """
    plan = plan_launch(processes=processes, config_file=config_file, num_machines=num_machines,
                       machine_rank=machine_rank, main_address=main_address,
                       rendezvous_timeout=rendezvous_timeout)
    import tempfile

    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(_accelerate_args(plan, argv))
    with tempfile.TemporaryDirectory(prefix="adapterkit-launch-") as folder:
        saved_file = os.path.join(folder, "saved")
        with _launch_env(plan, saved_file):
            try:
                launch_command(args)
            except ChildFailedError as exc:
                raise LaunchError(_with_saved(_failure_line(exc), _saved(saved_file))) from None
            except SignalException as exc:
                if exc.sigval.name == "SIGINT":
                    raise _interrupted(_saved(saved_file)) from None
                raise LaunchError(_with_saved(
                    f"the launcher was stopped by {exc.sigval.name}; every rank was stopped "
                    "and nothing was saved to the library", _saved(saved_file))) from None
            except KeyboardInterrupt:
                raise _interrupted(_saved(saved_file)) from None
            except Exception as exc:  # the rendezvous: the machines did not meet in time
                raise LaunchError(_rendezvous_line(plan, exc)) from None
    return 0


def _interrupted(saved: list[str]) -> KeyboardInterrupt:
    """Ctrl-C, carrying what the ranks saved before it (the command says so)."""
    exc = KeyboardInterrupt()
    exc.stages_saved = saved  # type: ignore[attr-defined]
    return exc


def _rendezvous_line(plan: LaunchPlan, exc: Exception) -> str:
    reason = " ".join(str(exc).split())[:200].rstrip(".") or type(exc).__name__
    timeout = f"{plan.rendezvous_timeout:g} s"
    if plan.num_machines > 1 and plan.machine_rank > 0:
        return (f"machine {plan.machine_rank} could not reach the main machine at "
                f"{plan.main_address} within {timeout} ({reason}); start machine rank 0 first, "
                "check the address and that the port is open, or raise --rendezvous-timeout")
    if plan.num_machines > 1:
        return (f"the other machines did not join at {plan.main_address} within {timeout} "
                f"({reason}); start them with --machine-rank 1..{plan.num_machines - 1} and the "
                "same --main-address, or raise --rendezvous-timeout")
    return f"could not start the {plan.processes} processes: {reason}"


def _failure_line(exc: Any) -> str:
    """One line for a failed run: the first rank that failed and why (its own message when it
    handed one over, else how it ended)."""
    def order(item: tuple[int, Any]) -> tuple[int, int, int]:
        rank, failure = item
        data = getattr(failure, "error_file_data", None) or {}
        if _MARK in data:  # its own message; "lost contact" only follows another's failure
            cause = 2 if data.get("after_another") else 0
        else:  # killed, or a crash; SIGTERM is the launcher stopping the others
            cause = 3 if failure.exitcode in (-15, 143) else 1
        return (cause, failure.timestamp, rank)

    failures = sorted(exc.failures.items(), key=order)
    if not failures:
        return "a rank failed; every rank was stopped and nothing was saved to the library"
    rank, failure = failures[0]
    data = getattr(failure, "error_file_data", None) or {}
    if _MARK in data:
        message = str(data.get("message", ""))
        return message if rank == 0 else f"rank {rank}: {message}"
    if failure.exitcode < 0:
        how = f"was killed by {failure.signal_name()}"
    else:
        how = f"ended with exit code {failure.exitcode}"
    return (f"rank {rank} (pid {failure.pid}) {how}; every rank was stopped and nothing was saved "
            "to the library. Run the same command with --resume to continue from the last "
            "checkpoint")


#: The launch options of ``adapterkit train``/``pipeline``, with whether each takes a value.
LAUNCH_OPTIONS = {"--processes": True, "--accelerate-config": True, "--num-machines": True,
                  "--machine-rank": True, "--main-address": True, "--rendezvous-timeout": True}


def strip_launch_options(args: list[str]) -> list[str]:
    """``args`` without the launch options (``--processes 2``, ``--processes=2``...): what
    each rank runs."""
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in LAUNCH_OPTIONS:
            skip = LAUNCH_OPTIONS[name] and "=" not in arg
            continue
        out.append(arg)
    return out
