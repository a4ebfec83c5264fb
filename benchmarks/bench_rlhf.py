"""RLHF figures: reward of held-out generations before/after, and peak memory against SFT.

Runs, each in a fresh process (so peak resident memory is its own):

1. ``sft`` on the same base, data length, batch and steps (prompt → chosen answer) — the
   memory yardstick;
2. ``rlhf`` with one preference file: the reward pocket book first, then GRPO against it, all
   on one resident base (on the tiny base, on top of an SFT pocket book that says both kinds
   of answer: a random model never says anything the reward model likes).

Then reports the mean reward (from the reward pocket book) of sampled answers to held-out
prompts with the policy off and on, and peak RSS of (2) divided by (1).

    python benchmarks/bench_rlhf.py --base tiny              # tiny random base, seconds
    python benchmarks/bench_rlhf.py --base smollm2-135m      # the embedded base, minutes
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _data(base: str, work: Path) -> tuple[str, Path, Path, list[str]]:
    """(base spec, preference file, sft file, held-out prompts)."""
    if base == "tiny":
        from adapterkit.plugin_api.testing import make_tiny_base
        from adapterkit.pytest_plugin import TINY_ROWS

        folder = make_tiny_base(work / "tiny")
        prefs = work / "prefs.jsonl"
        prefs.write_text("".join(json.dumps(r) + "\n" for r in TINY_ROWS["preference"]))
        held = [f"Greet person {i}." for i in range(100, 116)]
        spec = str(folder)
    else:
        prefs = ROOT / "examples/data/preferences_train.jsonl"
        test = [json.loads(x) for x in
                (ROOT / "examples/data/preferences_test.jsonl").read_text().splitlines()]
        held = [r["prompt"] for r in test][:16]
        spec = base
    sft = work / "sft.jsonl"
    rows = [json.loads(x) for x in prefs.read_text().splitlines()]
    sft.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["chosen"]}) + "\n"
                           for r in rows))
    return spec, prefs, sft, held


def child(args: argparse.Namespace) -> None:
    """One training run in this process; prints a JSON line with its figures."""
    from adapterkit import Library, TrainOptions, load_base, train
    from adapterkit.cli import _quiet_libraries

    _quiet_libraries()
    work = Path(args.work)
    spec, prefs, sft, held = _data(args.base, work)
    base = load_base(spec, home=args.home)
    common = dict(max_steps=args.steps, batch_size=8, learning_rate=args.lr, r=16, alpha=32,
                  dropout=0.0, max_length=256, logging_steps=1, seed=1)
    start = time.perf_counter()
    if args.child == "sft":
        result = train("sft", base=base, data=str(sft), name="yardstick", home=args.home,
                       options=TrainOptions(**common, forgetting_budget=0))  # no guard
        figures: dict = {}
    else:
        from adapterkit.training.reward import RewardScorer, reward_of_generations

        on = None
        if args.base == "tiny":
            # a random tiny model never says anything the reward model likes; SFT it on both
            # kinds of answer first, so RL has something to choose between (as on a real base)
            mix = work / "mix.jsonl"
            mix.write_text("".join(
                json.dumps({"prompt": r["prompt"], "completion": r[k]}) + "\n"
                for r in map(json.loads, prefs.read_text().splitlines())
                for k in ("chosen", "rejected")))
            train("sft", base=base, data=str(mix), name="mix", home=args.home,
                  options=TrainOptions(**{**common, "learning_rate": 3e-2},
                                       forgetting_budget=0)).model.unload()
            on = "mix"
        result = train("rlhf", base=base, data=str(prefs), name="kind", home=args.home, on=on,
                       options=TrainOptions(**common, trainer_options={
                           "reward_steps": args.reward_steps, "max_new_tokens": args.new_tokens,
                           "beta": args.beta}))
        library = Library(args.home)
        scorer = RewardScorer(base, library.get("kind-reward"), library=library,
                              policy=result.model)
        figures = reward_of_generations(result.model, scorer, held,
                                        max_new_tokens=args.new_tokens, samples=4)
        figures["reward_log_first"] = result.metrics["reward_first_log"]
        figures["reward_log_last"] = result.metrics["reward_last_log"]
    figures["seconds"] = time.perf_counter() - start
    figures["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("FIGURES " + json.dumps(figures), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--base", default="tiny")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--reward-steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--beta", type=float, default=0.05)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--child", choices=["sft", "rlhf"])
    p.add_argument("--work")
    p.add_argument("--home")
    args = p.parse_args()
    tiny = args.base == "tiny"
    args.steps = args.steps or (24 if tiny else 20)
    args.reward_steps = args.reward_steps or (20 if tiny else 25)
    args.lr = args.lr or (1e-2 if tiny else 5e-4)
    args.new_tokens = args.new_tokens or 24
    if args.child:
        child(args)
        return

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("sft", "rlhf"):
            work, home = Path(tmp) / kind, Path(tmp) / f"{kind}-home"
            work.mkdir()
            cmd = [sys.executable, __file__, "--child", kind, "--work", str(work), "--home",
                   str(home), "--base", args.base, "--steps", str(args.steps),
                   "--reward-steps", str(args.reward_steps), "--lr", str(args.lr),
                   "--beta", str(args.beta), "--new-tokens", str(args.new_tokens)]
            run = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in run.stdout.splitlines() if x.startswith("FIGURES ")), None)
            if run.returncode or line is None:
                sys.exit(f"{kind} run failed:\n{run.stderr[-3000:]}")
            out[kind] = json.loads(line.removeprefix("FIGURES "))
    r, s = out["rlhf"], out["sft"]
    print(f"base {args.base}: rlhf = reward stage {args.reward_steps} steps + GRPO {args.steps} "
          f"steps (batch 8, {args.new_tokens} new tokens, beta {args.beta})")
    print(f"mean reward of sampled held-out answers: {r['before']:.3f} without the policy → "
          f"{r['after']:.3f} with it (GRPO log: {r['reward_log_first']:.3f} → "
          f"{r['reward_log_last']:.3f})")
    print(f"peak RSS: rlhf {r['peak_rss_mb']:.0f} MB vs sft {s['peak_rss_mb']:.0f} MB → ratio "
          f"{r['peak_rss_mb'] / s['peak_rss_mb']:.2f} (goal ≤ 1.3)")
    print(f"wall: rlhf {r['seconds']:.0f} s, sft {s['seconds']:.0f} s")


if __name__ == "__main__":
    main()
