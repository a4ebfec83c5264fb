"""`adapterkit train sft` against a plain TRL SFTTrainer + PEFT script, one after the other.

Identical model, data, chat rendering, sequence length, batch, steps and precision (fp32 on
CPU). Reports tokens/s and peak resident memory of each process, and the ratios (goal: ours /
plain ≥ 1.0 for tokens/s). With --eval, also held-out accuracy and forgetting of both.

    python benchmarks/bench_sft.py [--base smollm2-135m] [--steps 20] [--eval]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"

# Runs a module in this interpreter and records its peak RSS when it exits.
WRAPPER = """
import atexit, json, resource, runpy, sys
out = sys.argv.pop(1)
atexit.register(lambda: open(out, "w").write(json.dumps(
    {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})))
sys.argv = sys.argv[1:]
runpy.run_module("adapterkit", run_name="__main__")
"""


def run_ours(base: str, steps: int, batch: int, lr: float, home: str, tmp: Path,
             evaluate: bool) -> dict:
    rss = tmp / "ours-rss.json"
    cmd = [sys.executable, "-c", WRAPPER, str(rss), "adapterkit", "--home", home, "train", "sft",
           "--base", base, "--data", str(DATA / "triage_train.jsonl"), "--name", "bench",
           "--restart", "--max-steps", str(steps), "--batch-size", str(batch), "--lr", str(lr),
           "--save-steps", "100000", "--json",
           "--forgetting-budget", "off"]  # the plain script has no guard: neither does this run
    if evaluate:
        cmd += ["--general", "general"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    result = json.loads(out[out.index("{"):])
    m = result["metrics"]
    figures = {"tokens": m["tokens"], "train_seconds": m["train_seconds"],
               "loop_seconds": m["loop_seconds"], "tokens_per_second": m["tokens_per_second"],
               **json.loads(rss.read_text())}
    if evaluate:
        figures["forgetting_pct"] = m["forgetting"]["general_loss_change_pct"]
        ev = subprocess.run([sys.executable, "-m", "adapterkit", "--home", home, "eval", "bench",
                             "--data", str(DATA / "triage_test.jsonl"), "--json"],
                            capture_output=True, text=True, check=True).stdout
        figures["accuracy_after"] = json.loads(ev[ev.index("{"):])["exact_match"]["pocket_book"]
    subprocess.run([sys.executable, "-m", "adapterkit", "--home", home, "rm", "bench",
                    "--all-versions"], capture_output=True)
    return figures


def run_plain(folder: str, steps: int, batch: int, lr: float, tmp: Path, evaluate: bool) -> dict:
    out = tmp / "plain.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "plain_trl_sft.py"), folder,
           str(DATA / "triage_train.jsonl"), "--max-steps", str(steps), "--batch-size",
           str(batch), "--lr", str(lr), "--out", str(out)]
    if evaluate:
        cmd += ["--eval", str(DATA / "triage_test.jsonl")]
    subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval", action="store_true", help="also accuracy and forgetting")
    args = p.parse_args()
    env_home = os.environ.get("ADAPTERKIT_HOME")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        home = env_home or str(tmp / "home")
        info = json.loads(subprocess.run(
            [sys.executable, "-m", "adapterkit", "--home", home, "base", "show", args.base,
             "--json"], capture_output=True, text=True, check=True).stdout)
        plain = run_plain(info["folder"], args.steps, args.batch_size, args.lr, tmp, args.eval)
        ours = run_ours(args.base, args.steps, args.batch_size, args.lr, home, tmp, args.eval)
    print(f"{'':22}{'plain TRL+PEFT':>16}{'adapterkit':>14}{'ratio':>8}")
    for key in ("tokens", "train_seconds", "loop_seconds", "tokens_per_second", "peak_rss_mb",
                "accuracy_after", "forgetting_pct"):
        if key in plain and key in ours:
            ratio = ours[key] / plain[key] if plain[key] else float("nan")
            print(f"{key:22}{plain[key]:>16.2f}{ours[key]:>14.2f}{ratio:>8.3f}")


if __name__ == "__main__":
    main()
