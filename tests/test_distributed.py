"""Training across processes and machines: real ranks on CPU (gloo), started through
accelerate's launcher, on the tiny base.

The reference for every multi-process run is a single-process run with the same global batch
(2 ranks × per-device 2 against 1 × 4): data-parallel training sums the same rows' gradients,
so the two pocket books must agree to float round-off.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from adapterkit import TrainOptions, train
from adapterkit.library.store import Library
from adapterkit.training.launch import places, strip_launch_options

pytestmark = pytest.mark.slow

STEPS = 5
#: Learning rates that move the loss well in 5 steps without saturating it (a DPO loss near 0
#: leaves gradients so small that Adam's normalisation magnifies their round-off).
LR = {"sft": 1e-2, "dpo": 1e-3, "reward": 1e-2}


def flags(trainer: str) -> list[object]:
    """What the two-rank runs take: global batch 2 × 2 = the reference's 4 (float32: the
    bound below is float32 round-off)."""
    return ["--max-steps", STEPS, "--lr", LR[trainer], "--dropout", "0", "-r", "8", "--alpha",
            "16", "--logging-steps", "1", "--max-length", "64", "--batch-size", "2",
            "--precision", "fp32"]


#: Float round-off after 5 Adam steps (measured: ~2e-6 against weights of ~0.13); a rank that
#: trained on other rows, or a gradient averaged wrongly, is off by ~1e-2.
ROUND_OFF = 1e-4


def reference(trainer: str, data: Path, home: Path, tiny_base: Path) -> Path:
    """The single-process pocket book with the global batch the ranks share."""
    options = TrainOptions(max_steps=STEPS, learning_rate=LR[trainer], dropout=0.0, r=8,
                           alpha=16, batch_size=4, logging_steps=1, max_length=64,
                           precision="fp32")
    return train(trainer, base=str(tiny_base), data=str(data), name="one", options=options,
                 home=home).pocket_book.path


def lora_gap(a: Path, b: Path) -> float:
    wa, wb = (load_file(str(p / "adapter_model.safetensors")) for p in (a, b))
    assert wa.keys() == wb.keys() and wa
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def adapterkit(*args: object, home: Path, extra_env: dict[str, str] | None = None,
               **popen: object) -> subprocess.Popen:
    env = {**os.environ, "ADAPTERKIT_HOME": str(home), "OMP_NUM_THREADS": "1",
           **(extra_env or {})}
    return subprocess.Popen([sys.executable, "-m", "adapterkit", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_nothing_saved(home: Path, name: str) -> None:
    """No library entry, no folder of it, no staging folder left behind."""
    assert Library(home).list() == []
    assert not (home / "library" / name).exists()
    assert list(home.glob("tmp/stage-*")) == []


def test_two_processes_train_the_sft_pocket_book_of_one(tiny_base, adapterkit_data, home,
                                                        tmp_path, adapterkit_cli, capfd):
    one = reference("sft", adapterkit_data["prompt_completion"], tmp_path / "one", tiny_base)
    result = adapterkit_cli("train", "sft", "--base", tiny_base, "--data",
                            adapterkit_data["prompt_completion"], "--name", "two",
                            "--processes", 2, *flags("sft"))
    out, err = capfd.readouterr()
    assert result.exit_code == 0, result.output + err
    book = Library(home).get("two")
    gap = lora_gap(one, book.path)
    print(f"sft, 2 processes vs 1: max |ΔLoRA| = {gap:.2e}")
    assert gap < ROUND_OFF
    assert book.meta.metrics["processes"] == 2 and book.meta.metrics["steps"] == STEPS
    # shown once, by the main process, for the run as a whole
    assert err.count("Training two with sft") == 1 and err.count("global batch 4") == 1
    assert out.count("Saved two@1") == 1 and "2 processes together" in out
    assert not (home / "runs" / "two@1").exists() and not (home / "runs" / "two").exists()


def test_two_processes_under_accelerate_launch_train_the_dpo_pocket_book_of_one(
        tiny_base, adapterkit_data, home, tmp_path):
    data = adapterkit_data["preference"]
    one = reference("dpo", data, tmp_path / "one", tiny_base)
    run = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
         "2", "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no",
         "-m", "adapterkit", "train", "dpo", "--base", str(tiny_base), "--data", str(data),
         "--name", "two", *map(str, flags("dpo"))],
        env={**os.environ, "ADAPTERKIT_HOME": str(home), "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    book = Library(home).get("two")
    gap = lora_gap(one, book.path)
    print(f"dpo, 2 processes vs 1: max |ΔLoRA| = {gap:.2e}")
    assert gap < ROUND_OFF
    # the ranks computed the reference together (no cache from the other home), main wrote it
    assert book.meta.metrics["reference_cache"] == {"train": "computed"}
    assert len(list((home / "cache" / "dpo-ref").glob("*.safetensors"))) == 1
    assert run.stdout.count("Saved two@1") == 1


def test_two_processes_train_the_reward_pocket_book_of_one(tiny_base, adapterkit_data, home,
                                                           tmp_path, adapterkit_cli):
    """The reward head (a scalar score on the same base) trains data-parallel like the
    others: its LoRA and its head agree with the single-process run."""
    data = adapterkit_data["preference"]
    one = reference("reward", data, tmp_path / "one", tiny_base)
    result = adapterkit_cli("train", "reward", "--base", tiny_base, "--data", data, "--name",
                            "two", "--processes", 2, *flags("reward"))
    assert result.exit_code == 0, result.output
    book = Library(home).get("two")
    gap = lora_gap(one, book.path)
    print(f"reward, 2 processes vs 1: max |ΔLoRA| = {gap:.2e}")
    assert gap < ROUND_OFF
    assert book.meta.metrics["processes"] == 2 and book.meta.metrics["steps"] == STEPS


def test_a_launch_leaves_the_calling_process_as_it_found_it(monkeypatch):
    """relaunch() in a long-lived Python process (a notebook, a service): torch's launcher
    installs its own signal handlers and the launching side quiets torch's C++ log; both are
    put back."""
    import signal as signals

    from adapterkit.training.launch import quiet_launcher, relaunch

    monkeypatch.setenv("TORCH_CPP_LOG_LEVEL", "INFO")
    before = {sig: signals.getsignal(sig) for sig in (signals.SIGTERM, signals.SIGINT,
                                                      signals.SIGHUP, signals.SIGQUIT)}
    quiet_launcher()
    assert relaunch(["--version"], processes=2) == 0
    assert {sig: signals.getsignal(sig) for sig in before} == before
    assert os.environ["TORCH_CPP_LOG_LEVEL"] == "INFO"
    assert "ADAPTERKIT_USER_TORCH_CPP_LOG_LEVEL" not in os.environ


def test_two_machines_on_loopback_train_the_pocket_book_of_one(tiny_base, adapterkit_data,
                                                               home, tmp_path):
    data = adapterkit_data["prompt_completion"]
    one = reference("sft", data, tmp_path / "one", tiny_base)
    address = f"127.0.0.1:{free_port()}"
    machines = [adapterkit("train", "sft", "--base", tiny_base, "--data", data, "--name", "two",
                           *flags("sft"), "--processes", 1, "--num-machines", 2,
                           "--machine-rank", rank, "--main-address", address, home=home)
                for rank in (1, 0)]
    outputs = [m.communicate(timeout=600) for m in machines]
    assert [m.returncode for m in machines] == [0, 0], outputs
    assert "Saved two@1" in outputs[1][0] and outputs[0][0] == ""  # machine 0 reports
    gap = lora_gap(one, Library(home).get("two").path)
    print(f"sft, 2 machines × 1 process vs 1 process: max |ΔLoRA| = {gap:.2e}")
    assert gap < ROUND_OFF


def _ranks_of(parent: int) -> dict[int, int]:
    """rank → pid of the ranks the launching process started."""
    found = {}
    try:
        children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    except OSError:
        return found
    for pid in map(int, children):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        rank = [e[5:] for e in env if e.startswith(b"RANK=")]
        if rank:
            found[int(rank[0])] = pid
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc (Linux)")
def test_killing_one_rank_stops_every_rank_saves_nothing_and_resume_continues(
        tiny_base, adapterkit_data, home):
    data = adapterkit_data["prompt_completion"]
    # (a resume must keep the run's settings, its length included: 60 steps leave the kill
    # well inside the run, the first checkpoint coming at step 5)
    args = ["train", "sft", "--base", tiny_base, "--data", data, "--name", "k",
            "--batch-size", 2, "--processes", 2, "--max-steps", 60, "--save-steps", 5]
    launcher = adapterkit(*args, home=home)
    runs = home / "runs" / "k"
    deadline = time.monotonic() + 300
    while not list(runs.glob("checkpoint-*/trainer_state.json")):  # well into training
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()
        time.sleep(0.1)
    ranks = _ranks_of(launcher.pid)
    assert sorted(ranks) == [0, 1]
    killed = time.monotonic()
    os.kill(ranks[1], signal.SIGKILL)
    ranks_gone = None
    while ranks_gone is None or launcher.poll() is None:
        assert time.monotonic() - killed < 60, "ranks still running a minute after the kill"
        if ranks_gone is None and not any(_alive(pid) for pid in ranks.values()):
            ranks_gone = time.monotonic() - killed
        time.sleep(0.02)
    out, err = launcher.communicate()
    print(f"kill of rank 1 → every rank gone {ranks_gone:.2f} s, the launching command "
          f"{time.monotonic() - killed:.2f} s")
    assert launcher.returncode == 1
    lines = err.strip().splitlines()
    assert lines[-1].startswith("Error: rank 1 ") and "SIGKILL" in lines[-1], err[-2000:]
    assert "Traceback" not in err
    assert_nothing_saved(home, "k")

    # --resume continues the multi-process run from the main process's last checkpoint
    last = max(int(p.parent.name.split("-")[1])
               for p in runs.glob("checkpoint-*/trainer_state.json"))
    assert last < 60
    resumed = adapterkit(*args[:-2], "--save-steps", 1000, "--resume", home=home)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    book = Library(home).get("k")
    assert book.meta.metrics["steps"] == 60 and book.meta.metrics["processes"] == 2
    assert book.meta.metrics["resumed_at_step"] == last
    assert not runs.exists()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc (Linux)")
def test_ctrl_c_stops_every_rank_and_saves_nothing(tiny_base, adapterkit_data, home):
    launcher = adapterkit("train", "sft", "--base", tiny_base, "--data",
                          adapterkit_data["prompt_completion"], "--name", "c", "--batch-size", 2,
                          "--processes", 2, "--max-steps", 100000, "--save-steps", 5,
                          home=home, start_new_session=True)
    deadline = time.monotonic() + 300
    while not list(home.glob("runs/c/checkpoint-*/trainer_state.json")):
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()
        time.sleep(0.1)
    ranks = _ranks_of(launcher.pid)
    assert sorted(ranks) == [0, 1]
    pressed = time.monotonic()
    os.killpg(launcher.pid, signal.SIGINT)  # what Ctrl-C in its terminal does
    out, err = launcher.communicate(timeout=60)
    while any(_alive(pid) for pid in ranks.values()):
        assert time.monotonic() - pressed < 60, "ranks still running a minute after Ctrl-C"
        time.sleep(0.02)
    print(f"Ctrl-C → every rank and the launching command gone: "
          f"{time.monotonic() - pressed:.2f} s")
    assert launcher.returncode == 130
    assert err.strip().splitlines()[-1].startswith("Interrupted: nothing was saved"), err
    assert err.count("Interrupted") == 1 and "Traceback" not in err
    assert_nothing_saved(home, "c")


SLOTS, KIND = places()  # one process per CPU core here, per GPU on a GPU machine
GPU = KIND == "GPU"


@pytest.mark.parametrize("flags, says", [
    pytest.param(["--processes", 0], "--processes must be at least 1, got 0", id="zero"),
    pytest.param(["--main-address", "127.0.0.1:29555", "--machine-rank", 0],
                 "--main-address, --machine-rank only act when training on several",
                 id="launch-flags-without-a-launch"),
    pytest.param(["--processes", SLOTS + 1], f"it has {SLOTS} {KIND}", id="more-than-fit"),
    pytest.param(["--accelerate-config", "{bad}"], "cannot read accelerate config",
                 id="bad-config"),
    pytest.param(["--accelerate-config", "{fsdp}"], "asks for FSDP, which runs on GPUs",
                 id="fsdp-on-cpu", marks=pytest.mark.skipif(GPU, reason="a CPU-only rule")),
    pytest.param(["--num-machines", 2, "--machine-rank", 1, "--main-address",
                  "127.0.0.1:{port}", "--rendezvous-timeout", 2],
                 "could not reach the main machine at 127.0.0.1:", id="main-unreachable"),
    pytest.param(["--num-machines", 2, "--machine-rank", 0, "--main-address",
                  "127.0.0.1:{port}", "--rendezvous-timeout", 2],
                 "the other machines did not join", id="machines-missing"),
])
def test_bad_launches_are_one_line_and_write_nothing(flags, says, tiny_base, adapterkit_data,
                                                     home, tmp_path, adapterkit_cli):
    bad = tmp_path / "accelerate.yaml"
    bad.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: [MULTI_GPU\n")
    fsdp = tmp_path / "fsdp.yaml"
    fsdp.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\n"
                    "num_processes: 2\nfsdp_config: {fsdp_version: 2}\n")
    port = free_port()
    flags = [str(f).format(bad=bad, fsdp=fsdp, port=port) for f in flags]
    start = time.monotonic()
    result = adapterkit_cli("train", "sft", "--base", tiny_base, "--data",
                            adapterkit_data["text"], "--name", "x", "--max-steps", 2, *flags)
    assert result.exit_code == 1, result.output
    assert result.output.count("\n") == 1 and says in result.output, result.output
    assert time.monotonic() - start < 120  # a time-out, not a hang
    assert_nothing_saved(home, "x")
    assert not (home / "runs").exists()


def test_each_rank_runs_the_command_without_the_launch_options():
    argv = ["train", "sft", "--processes", "2", "--base=b", "--num-machines=2",
            "--accelerate-config", "a.yaml", "--machine-rank", "1", "--main-address",
            "h:1", "--rendezvous-timeout", "5", "--name", "n"]
    assert strip_launch_options(argv) == ["train", "sft", "--base=b", "--name", "n"]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc (Linux)")
def test_killing_the_launcher_outright_ends_its_ranks_and_saves_nothing(tiny_base,
                                                                        adapterkit_data, home):
    """``kill -9`` of the launching command leaves torchrun no chance to stop the ranks: they
    notice they were orphaned and stop themselves, before any of them saves."""
    launcher = adapterkit("train", "sft", "--base", tiny_base, "--data",
                          adapterkit_data["prompt_completion"], "--name", "o", "--batch-size", 2,
                          "--processes", 2, "--max-steps", 100000, "--save-steps", 5, home=home)
    deadline = time.monotonic() + 300
    while not list(home.glob("runs/o/checkpoint-*/trainer_state.json")):
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()
        time.sleep(0.1)
    ranks = _ranks_of(launcher.pid)
    assert sorted(ranks) == [0, 1]
    killed = time.monotonic()
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait(timeout=30)  # not communicate(): surviving ranks would hold its pipes open
    while any(_alive(pid) for pid in ranks.values()):
        # (alone they stop within a second or two; the bound leaves room for a loaded machine)
        assert time.monotonic() - killed < 60, "ranks still running 60 s after their launcher"
        time.sleep(0.02)
    print(f"kill -9 of the launcher → every rank gone: {time.monotonic() - killed:.2f} s")
    assert_nothing_saved(home, "o")


def test_a_machine_whose_library_differs_from_the_main_ones_is_refused(tiny_base,
                                                                       adapterkit_data, home,
                                                                       tmp_path):
    """Two machines, each with its own --home: machine 1's library already holds the name
    machine 0 is about to save, so the run would not be one run. It is refused before
    training, saying the machines need one shared library."""
    data = adapterkit_data["prompt_completion"]
    other = tmp_path / "other-home"
    reference("sft", data, other, tiny_base)  # saves "one" into machine 1's library
    address = f"127.0.0.1:{free_port()}"
    machines = [adapterkit("train", "sft", "--base", tiny_base, "--data", data, "--name", "one",
                           *flags("sft"), "--processes", 1, "--num-machines", 2,
                           "--machine-rank", rank, "--main-address", address,
                           home=other if rank else home)
                for rank in (1, 0)]
    outputs = [m.communicate(timeout=600) for m in machines]
    assert [m.returncode for m in machines] == [1, 1], outputs
    said = outputs[0][1].strip().splitlines()[-1]
    assert said.startswith("Error: a pocket book named 'one' already exists") and \
        f"(checked in machine 1's own library, {other}; if it is not the main machine's, " \
        "give every machine the same --home on a shared filesystem)" in said, said
    assert "did not join" in outputs[1][1].strip().splitlines()[-1]  # machine 0 waited
    assert "Traceback" not in outputs[0][1] + outputs[1][1]
    assert_nothing_saved(home, "one")


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                    reason="hides a folder from one rank in its own mount namespace (root)")
def test_a_rank_that_cannot_read_the_checkpoint_the_main_one_resumes_is_refused(
        tiny_base, adapterkit_data, home, tmp_path):
    """Resuming needs the checkpoint on every machine. Launched by hand (torchrun's own
    launcher, no preflight of ours), the rank on the machine without it refuses the run."""
    data = adapterkit_data["prompt_completion"]
    args = ["train", "sft", "--base", str(tiny_base), "--data", str(data), "--name", "r",
            *map(str, flags("sft"))]
    (home / "runs" / "r" / "checkpoint-1").mkdir(parents=True)  # what an interrupted run left
    (home / "runs" / "r" / "checkpoint-1" / "trainer_state.json").write_text("{}")
    other = tmp_path / "other-home"
    port = str(free_port())
    procs = []
    for rank, own in ((0, home), (1, other)):
        env = {**os.environ, "ADAPTERKIT_HOME": str(own), "OMP_NUM_THREADS": "1",
               "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        command = [sys.executable, "-m", "adapterkit", *args, "--resume"]
        if rank == 1:  # another machine: the main one's runs folder is not there
            command = ["unshare", "-m", "sh", "-c", f"mount -t tmpfs none {home / 'runs'} && "
                       'exec "$0" "$@"', *command]
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=600) for p in procs]
    assert procs[1].returncode == 1, outputs
    said = outputs[1][1].strip().splitlines()[-1]
    assert said.startswith("Error: rank 1: cannot read the checkpoint the main process resumes "
                           "from (") and "give every machine the same --home" in said, said
    assert Library(home).list() == []


LONER = '''
"""A trainer plugin with its own loop that does not keep its ranks in step."""
import os
import types

import torch

from adapterkit import Trainer, hookimpl


class Loner(Trainer):
    name = "loner"
    data_shapes = ("prompt_completion",)

    def train(self, *, job, **_):
        model = job.model
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.01 * (1 + int(os.environ.get("RANK", "0"))))
        return types.SimpleNamespace(global_step=1, log_history=[])


@hookimpl
def register_trainers(register):
    register(Loner())
'''


def test_ranks_that_end_with_different_pocket_books_save_nothing(tiny_base, adapterkit_data,
                                                                 home, tmp_path):
    plugin = tmp_path / "loner.py"
    plugin.write_text(LONER, encoding="utf-8")
    run = adapterkit("train", "loner", "--base", tiny_base, "--data",
                     adapterkit_data["prompt_completion"], "--name", "l", "--processes", 2,
                     home=home, extra_env={"ADAPTERKIT_LOAD_PLUGINS": str(plugin)})
    out, err = run.communicate(timeout=600)
    assert run.returncode == 1, err[-3000:]
    said = err.strip().splitlines()[-1]
    assert "the ranks ended with different pocket books (rank 1's LoRA weights differ from " \
           "rank 0's), so l was not saved: trainer 'loner' does not keep its processes in " \
           "step" in said, err[-3000:]
    assert_nothing_saved(home, "l")


def test_a_failure_after_a_save_names_what_was_saved(tmp_path, monkeypatch):
    """The main rank lists what it saved in the launcher's file; the launcher's failure line
    says so instead of "nothing was saved"."""
    from adapterkit.training.launch import SAVED_ENV, _saved, _with_saved, record_saved

    line = ("rank 1 (pid 7) was killed by SIGKILL; every rank was stopped and nothing was saved "
            "to the library. Run the same command with --resume to continue")
    assert _with_saved(line, []) == line
    monkeypatch.setenv(SAVED_ENV, str(tmp_path / "saved"))
    monkeypatch.setenv("RANK", "1")
    record_saved("not-main@1")  # only the main rank writes
    assert _saved(str(tmp_path / "saved")) == []
    monkeypatch.setenv("RANK", "0")
    record_saved("instruct@1")
    said = _with_saved(line, _saved(str(tmp_path / "saved")))
    assert "every rank was stopped and instruct@1 was saved to the library before the " \
           "failure" in said and "nothing was saved" not in said
    assert _with_saved("rank 1: boom", ["a@1", "b@1"]) == \
        "rank 1: boom (a@1, b@1 were saved to the library before the failure)"
    monkeypatch.setenv(SAVED_ENV, str(tmp_path / "gone" / "saved"))
    record_saved("x@1")  # the launcher is gone: nobody to tell, and no error


def _by_hand(home: Path, rank: int, port: str, args: list[str],
             hide: str | None = None) -> subprocess.Popen:
    """Rank ``rank`` of 2 started by hand (torchrun's environment, no launcher of ours);
    ``hide``: a shell command run first in the rank's own mount namespace (another machine)."""
    env = {**os.environ, "ADAPTERKIT_HOME": str(home), "OMP_NUM_THREADS": "1",
           "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    command = [sys.executable, "-m", "adapterkit", *args]
    if hide:
        command = ["unshare", "-m", "sh", "-c", f'{hide} && exec "$0" "$@"', *command]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                    reason="swaps a file for one rank in its own mount namespace (root)")
def test_a_rank_that_reads_other_data_is_refused(tiny_base, adapterkit_data, home, tmp_path):
    data = adapterkit_data["prompt_completion"]
    other = tmp_path / "other.jsonl"
    rows = data.read_text(encoding="utf-8").splitlines()
    other.write_text("\n".join(rows[1:] + rows[:1]) + "\n", encoding="utf-8")  # same rows,
    port = str(free_port())                                             # another order
    args = ["train", "sft", "--base", str(tiny_base), "--data", str(data), "--name", "d",
            *map(str, flags("sft"))]
    ranks = [_by_hand(home, 0, port, args),
             _by_hand(home, 1, port, args, hide=f"mount --bind {other} {data}")]
    outputs = [r.communicate(timeout=600) for r in ranks]
    assert ranks[1].returncode == 1, outputs
    said = outputs[1][1].strip().splitlines()[-1]
    assert said.startswith("Error: rank 1: this process (home ") and \
        "reads other data, unlike the main process (home " in said, said
    assert Library(home).list() == []


def test_pipeline_ranks_with_different_libraries_are_refused(tiny_base, adapterkit_data, home,
                                                            tmp_path):
    """A stage finished in the main process's library but not in another rank's: that rank
    would train it alone. It refuses, naming the stage."""
    import yaml

    general = tmp_path / "general.txt"
    general.write_text("The weather was mild and the market was busy.\n", encoding="utf-8")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "base": str(tiny_base), "max_steps": 2, "batch_size": 2, "r": 4, "alpha": 8,
        "general": str(general),
        "stages": [{"name": "first", "trainer": "sft",
                    "data": str(adapterkit_data["prompt_completion"])},
                   {"name": "second", "trainer": "sft",
                    "data": str(adapterkit_data["prompt_completion"])}]}), encoding="utf-8")
    one = subprocess.run([sys.executable, "-m", "adapterkit", "pipeline", str(recipe)],
                         env={**os.environ, "ADAPTERKIT_HOME": str(home)},
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    Library(home).remove("second")  # as if stage 2 had failed: stage 1 is done, in this home
    port = str(free_port())
    args = ["pipeline", str(recipe), "--resume"]
    ranks = [_by_hand(home, 0, port, args), _by_hand(tmp_path / "other-home", 1, port, args)]
    outputs = [r.communicate(timeout=600) for r in ranks]
    assert ranks[1].returncode == 1, outputs
    said = outputs[1][1].strip().splitlines()[-1]
    assert "stage 1 (first)" in said and "does not hold what the main process's does" in said \
        and "give every machine the same --home on a shared filesystem" in said, said
    # the main process lost its peer: one line that says so, no traceback, no abort
    assert ranks[0].returncode == 1 and "Traceback" not in outputs[0][1], outputs[0][1][-2000:]
    assert outputs[0][1].strip().splitlines()[-1].startswith(
        "Error: rank 0: a collective operation with the other ranks failed ("), \
        outputs[0][1][-2000:]
    assert [s.name for s in Library(home).list()] == ["first"]


def test_a_failing_rank_leaves_its_process_group_within_the_timeout(monkeypatch):
    """A shutdown that does not come back (NCCL waits on a collective whose peer is gone) does
    not hold a failing rank: leave_on_failure says it could not leave, in about ``timeout``
    seconds, and the rank exits at once; a shutdown that comes back says so."""
    import threading

    from adapterkit.training import launch

    release = threading.Event()
    monkeypatch.setattr(launch, "leave", lambda: release.wait(30))
    began = time.monotonic()
    assert launch.leave_on_failure(timeout=0.3) is False
    assert 0.3 <= time.monotonic() - began < 5
    release.set()
    calls: list[int] = []
    monkeypatch.setattr(launch, "leave", lambda: calls.append(1))
    assert launch.leave_on_failure(timeout=5) is True and calls == [1]
    monkeypatch.setattr(launch, "leave", lambda: 1 / 0)  # an error in it: already failing
    assert launch.leave_on_failure(timeout=5) is True


def test_a_machine_whose_main_one_is_refused_its_lock_says_why(tiny_base, adapterkit_data,
                                                               home):
    """Another run of the name holds its lock: the main machine refused the run, and
    machine 1, waiting for the main one's checks, said only "lost contact with another rank,
    which stopped". It now says the main one's reason (both exit 1, nothing saved)."""
    from adapterkit.library.run_locks import hold_run

    other = hold_run(home, "one")  # what another run of that name holds
    try:
        address = f"127.0.0.1:{free_port()}"
        machines = [adapterkit("train", "sft", "--base", tiny_base, "--data",
                               adapterkit_data["prompt_completion"], "--name", "one",
                               *flags("sft"), "--processes", 1, "--num-machines", 2,
                               "--machine-rank", rank, "--main-address", address, home=home)
                    for rank in (1, 0)]
        outputs = [m.communicate(timeout=600) for m in machines]
    finally:
        other.release()
    assert [m.returncode for m in machines] == [1, 1], outputs
    for machine, (_, err) in zip((1, 0), outputs):
        said = err.strip().splitlines()[-1]
        assert "another run of one is training in " in said and \
            said.endswith(": wait for it to finish, or train under another --name"), \
            (machine, err)
        assert "lost contact" not in err and "Traceback" not in err, (machine, err)
    assert_nothing_saved(home, "one")
