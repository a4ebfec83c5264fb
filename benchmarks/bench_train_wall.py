"""The whole `adapterkit train sft|dpo` command against a plain TRL SFTTrainer|DPOTrainer + PEFT
script, as a user runs them: wall-clock time and peak resident memory of each process, start-up
and save included, one after the other on the same base folder, data, steps, batch, rank and lr.

Arms (each a fresh process):
  plain-fp32      the plain script, float32, gradient checkpointing off (the same settings)
  plain-trl-gc    the plain script with TRL's own default, gradient checkpointing on
  plain-bf16      the plain script with bf16 autocast (TrainingArguments.bf16), checkpointing off
  plain-qlora     the plain script as QLoRA model cards write it: 4-bit NF4 base (double
                  quantization, bf16 compute) + prepare_model_for_kbit_training, bf16 autocast
                  (sft only)
  ours-auto       adapterkit train sft --forgetting-budget off --general off (--precision auto),
                  as the plain script: no guard, no forgetting check (sft's defaults turn both
                  on); the process keeps freed memory for reuse (adapterkit.runtime.allocator)
  ours-system     ours-auto with ADAPTERKIT_MALLOC=system: glibc's allocator defaults (every
                  other ours arm runs with ADAPTERKIT_MALLOC unset, whatever the caller's is)
  ours-fp32       ours-auto with --precision fp32
  ours-qlora      ours-auto with --method qlora (4-bit NF4 base)
  ours-general    ours-auto measuring forgetting (--general general), no guard
  ours-guard      ours-general with the forgetting guard at the quickstart's settings
                  (--forgetting-budget 1% --guard-weight 0.3)
  ours-default    adapterkit train sft with no flag but the run's lr: sft's defaults (the
                  guard at 1%, weight 3, and the forgetting check)
  ...-warm        that arm again, on the caches its run before left (the plain base's
                  general-text loss; the guard's anchor targets); every other arm starts with
                  an empty cache

With --trainer dpo the pairs are preferences_train.jsonl and both compute the reference
alongside each step (the plain script: TRL's default for a PEFT model; ours:
--set precompute_ref_log_probs=false).

Every trained adapter is then scored in a separate process by the same code on the float32
base: held-out exact match on triage_test.jsonl (dpo: held-out pair ranking on
preferences_test.jsonl) and general-text loss change (forgetting). On a GPU each process also
reports the peak memory torch allocated there (--no-eval where the base's weights are random:
the speed and memory of a run do not depend on them, its scores do).

    python benchmarks/bench_train_wall.py [--trainer sft] [--steps 20] [--arms plain-fp32,ours-auto]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "adapterkit" / "data" / "quickstart"
ARMS = ("plain-fp32", "plain-trl-gc", "plain-bf16", "plain-qlora", "ours-auto", "ours-system", "ours-fp32",
        "ours-qlora", "ours-general", "ours-general-warm", "ours-guard", "ours-guard-warm",
        "ours-default")

SCORE = """
import json, sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from adapterkit.training.data import read_rows
from adapterkit.training.metrics import accuracy, forgetting
folder, adapter, test, trainer = sys.argv[1:5]
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
model = PeftModel.from_pretrained(model, adapter).eval()
rows = [json.loads(line) for line in open(test) if line.strip()]
if trainer == "dpo":
    from adapterkit.training.metrics import preference_accuracy
    acc = preference_accuracy(model, tok, rows)["implicit"]
else:
    acc, _ = accuracy(model, tok, rows, chat=True)
general = [r["text"] for r in read_rows("general")[0]]
print(json.dumps({"accuracy": acc,
                  "forgetting_pct": forgetting(model, tok, general)["general_loss_change_pct"]}))
"""


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    """Wall seconds of the whole process, and its stdout (its peak RSS: the PEAK wrapper)."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"{' '.join(cmd[4:9])}... failed:\n{proc.stderr[-3000:]}")
    return wall, proc.stdout


#: Runs a script or module in this interpreter and records its own peak RSS when it exits,
#: and on a GPU the peak memory torch's allocator held there (allocated: tensors alive at once;
#: reserved: what the caching allocator took from the driver).
PEAK = """
import atexit, json, os, resource, runpy, sys
out = sys.argv.pop(1)
def record():
    peak = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        peak["peak_gpu_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
    open(out, "w").write(json.dumps(peak))
atexit.register(record)
target = sys.argv.pop(1)
sys.argv = [target] + sys.argv[1:]
if target.endswith(".py"):
    runpy.run_path(target, run_name="__main__")
else:
    runpy.run_module(target, run_name="__main__")
"""


def run_arm(arm: str, args: argparse.Namespace, folder: str, home: str, tmp: Path) -> dict:
    rss = tmp / f"{arm}-rss.json"
    adapter = tmp / f"{arm}-adapter"
    common = ["--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
              "--lr", str(args.lr)]
    dpo = args.trainer == "dpo"
    train_file = DATA / ("preferences_train.jsonl" if dpo else "triage_train.jsonl")
    test_file = DATA / ("preferences_test.jsonl" if dpo else "triage_test.jsonl")
    script = "plain_trl_dpo.py" if dpo else "plain_trl_sft.py"
    if arm.startswith("plain"):
        figures = tmp / f"{arm}.json"
        cmd = [sys.executable, "-c", PEAK, str(rss), str(ROOT / "benchmarks" / script),
               folder, str(train_file), *common, "--out", str(figures),
               "--save-to", str(adapter)]
        cmd += {"plain-trl-gc": ["--gradient-checkpointing"], "plain-bf16": ["--bf16"],
                "plain-qlora": ["--load-in-4bit", "--bf16"]}.get(arm, [])
        wall, _ = timed(cmd)
        result = json.loads(figures.read_text())
    else:
        subprocess.run([sys.executable, "-m", "adapterkit", "--home", home, "rm", arm,
                        "--all-versions"], capture_output=True)
        if not arm.endswith("-warm"):
            shutil.rmtree(Path(home) / "cache", ignore_errors=True)
        cmd = [sys.executable, "-c", PEAK, str(rss), "adapterkit", "--home", home, "train",
               args.trainer, "--base", args.base, "--data", str(train_file), "--name", arm,
               *common, "--save-steps", "100000", "--json",
               "--precision", "fp32" if arm == "ours-fp32" else "auto"]
        if arm.startswith(("ours-general", "ours-guard")):
            cmd += ["--general", "general"]
        elif arm != "ours-default":  # as the plain script: no forgetting figure (sft measures
            # one by default)
            cmd += ["--general", "off"]
        if arm.startswith("ours-guard"):
            cmd += ["--forgetting-budget", "1", "--guard-weight", "0.3"]
        elif arm != "ours-default" and not dpo:  # dpo has no default guard to turn off
            cmd += ["--forgetting-budget", "off"]
        if arm == "ours-qlora":
            cmd += ["--method", "qlora"]
        if dpo:
            cmd += ["--set", "precompute_ref_log_probs=false"]
        wall, out = timed(cmd, {"ADAPTERKIT_MALLOC": "system" if arm == "ours-system" else ""})
        result = json.loads(out[out.index("{"):])["metrics"]
        info = json.loads(subprocess.run(
            [sys.executable, "-m", "adapterkit", "--home", home, "show", arm, "--json"],
            capture_output=True, text=True, check=True).stdout)
        adapter = Path(info["path"])
    figures = {"wall_seconds": wall, "loop_seconds": result["loop_seconds"],
               # ours only: train() from its call to the trainer's start (checks, base load,
               # data, job), and from there to the end of the loop; the rest of the wall time
               # is imports, the command line and the measuring and saving after the loop
               **({k: result[k] for k in ("prepare_seconds", "train_seconds") if k in result}
                  if not arm.startswith("plain") else {}),
               "tokens_per_second": result["tokens_per_second"],
               "train_loss_final": result["train_loss_final"],
               **json.loads(rss.read_text())}
    if result.get("guard", {}).get("kl_batches"):  # how the guard's KL terms were computed
        figures["kl_terms"] = result["guard"]["kl_batches"]
        figures["kl_in_task_forward"] = result["guard"].get("kl_in_task_forward", 0)
    if args.eval:
        out = subprocess.run([sys.executable, "-c", SCORE, folder, str(adapter),
                              str(test_file), args.trainer],
                             capture_output=True, text=True, check=True).stdout
        figures.update(json.loads(out.strip().splitlines()[-1]))
    return figures


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--trainer", choices=("sft", "dpo"), default="sft")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--no-eval", dest="eval", action="store_false")
    p.add_argument("--ref", help="the arm the speed-ups are taken against (default plain-fp32)")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        sys.exit(f"unknown arm(s) {', '.join(unknown)}; known: {', '.join(ARMS)}")
    if args.ref and args.ref not in arms:
        sys.exit(f"--ref {args.ref} is not among the arms run")
    if args.trainer == "dpo" and "plain-qlora" in arms:
        sys.exit("plain-qlora is an sft arm: plain_trl_dpo.py has no 4-bit mode")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        # a library of its own (it removes its arms' entries), sharing converted bases
        home = str(tmp / "home")
        shared = Path(os.environ.get("ADAPTERKIT_HOME", "")) / "bases"
        if os.environ.get("ADAPTERKIT_HOME") and shared.is_dir():
            (tmp / "home").mkdir()
            (tmp / "home" / "bases").symlink_to(shared)
        folder = json.loads(subprocess.run(
            [sys.executable, "-m", "adapterkit", "--home", home, "base", "show", args.base,
             "--json"], capture_output=True, text=True, check=True).stdout)["folder"]
        results = {}
        for arm in arms:
            results[arm] = run_arm(arm, args, folder, home, tmp)
            print(arm, json.dumps(results[arm]), flush=True)
    keys = ("wall_seconds", "prepare_seconds", "train_seconds", "loop_seconds", "tokens_per_second",
            "peak_rss_mb", "peak_gpu_mb",
            "peak_gpu_reserved_mb", "train_loss_final", "accuracy", "forgetting_pct",
            "kl_terms", "kl_in_task_forward")
    print(f"\n{'':18}" + "".join(f"{a:>14}" for a in arms))
    for key in keys:
        if any(results[a].get(key) is not None for a in arms):
            print(f"{key:18}" + "".join(
                f"{results[a][key]:>14.3f}" if results[a].get(key) is not None else f"{'-':>14}"
                for a in arms))
    ref = args.ref or ("plain-fp32" if "plain-fp32" in arms else None)
    for guarded, plain in (("ours-guard", "ours-general"), ("ours-guard-warm", "ours-general-warm")):
        if guarded in results and plain in results:
            g, u = results[guarded], results[plain]
            print(f"\n{guarded} vs {plain}: {g['wall_seconds'] / u['wall_seconds']:.3f}x wall "
                  f"time, {g['loop_seconds'] / u['loop_seconds']:.3f}x loop; forgetting "
                  f"{g.get('forgetting_pct', float('nan')):+.2f}% vs "
                  f"{u.get('forgetting_pct', float('nan')):+.2f}%")
    if ref:
        print(f"\nspeed-up of the whole command vs {ref} (wall time ratio, >1 is faster):")
        for a in arms:
            r, a_ = results[ref], results[a]
            gpu = (f", {a_['peak_gpu_mb'] / r['peak_gpu_mb']:.2f}x GPU memory"
                   if "peak_gpu_mb" in a_ and "peak_gpu_mb" in r else "")
            print(f"  {a:14} {r['wall_seconds'] / a_['wall_seconds']:.2f}x time, "
                  f"{r['loop_seconds'] / a_['loop_seconds']:.2f}x loop, "
                  f"{a_['peak_rss_mb'] / r['peak_rss_mb']:.2f}x memory{gpu}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
