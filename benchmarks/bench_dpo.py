"""DPO figures on the embedded base: preference accuracy, forgetting, speed against SFT, cache.

1. ``sft`` on the same pairs (prompt → chosen), same steps, batch, length and rank: its
   tokens/s is the yardstick (no forgetting guard, so both do the same kind of work per token).
2. ``dpo`` with ``precompute_ref_log_probs=true``: the reference pass runs once before the loop
   and is cached; the loop's tokens/s (chosen + rejected tokens) divided by SFT's is the ratio
   the issue asks for (goal ≥ 0.9). Then held-out preference accuracy (implicit reward margin
   > 0 on examples/data/preferences_test.jsonl) and the general-text loss change.
3. ``dpo`` again with another ``beta`` and otherwise the same options (the forgetting check
   included, so the two wall times compare like with like): the reference log-probs come from
   the disk cache.

    python benchmarks/bench_dpo.py [--steps 10] [--lr 5e-4]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def dpo_options(common: dict[str, Any], beta: float) -> Any:
    """Options of both dpo runs: they differ in ``beta`` only (same steps, same forgetting
    check), so their wall times compare like with like."""
    from adapterkit import TrainOptions

    return TrainOptions(**common, general="general", trainer_options={
        "beta": beta, "precompute_ref_log_probs": True})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=5e-4)
    args = p.parse_args()

    from adapterkit import TrainOptions, load_base, train
    from adapterkit.cli import _quiet_libraries
    from adapterkit.training.metrics import preference_accuracy

    _quiet_libraries()
    base = load_base(args.base)
    tok = base.tokenizer
    prefs = ROOT / "examples/data/preferences_train.jsonl"
    test = [json.loads(x) for x in
            (ROOT / "examples/data/preferences_test.jsonl").read_text().splitlines()]
    common = dict(max_steps=args.steps, batch_size=8, learning_rate=args.lr, r=16, alpha=32,
                  max_length=512, seed=0)
    with tempfile.TemporaryDirectory() as home:
        sft_file = Path(home) / "sft.jsonl"
        sft_file.write_text("".join(
            json.dumps({"prompt": r["prompt"], "completion": r["chosen"]}) + "\n"
            for r in map(json.loads, prefs.read_text().splitlines())))
        sft = train("sft", base=base, data=str(sft_file), name="yardstick", home=home,
                    options=TrainOptions(**common, forgetting_budget=0))  # no guard, as dpo
        sft.model.unload()  # give the resident base its plain layers back

        start = time.perf_counter()
        dpo = train("dpo", base=base, data=str(prefs), name="bedside", home=home,
                    options=dpo_options(common, 0.1))
        first_wall = time.perf_counter() - start
        acc = preference_accuracy(dpo.model, tok, test)
        dpo.model.unload()

        start = time.perf_counter()
        again = train("dpo", base=base, data=str(prefs), name="bedside-b02", home=home,
                      options=dpo_options(common, 0.2))
        second_wall = time.perf_counter() - start

    s, d = sft.metrics, dpo.metrics
    print(f"sft: {s['steps']} steps, {s['tokens_per_second']:.1f} tokens/s (loop)")
    print(f"dpo: {d['steps']} steps, {d['tokens_per_second']:.1f} tokens/s (loop; reference "
          f"{d['reference_cache']['train']}) → dpo/sft = "
          f"{d['tokens_per_second'] / s['tokens_per_second']:.2f} (goal ≥ 0.9)")
    print(f"held-out preference accuracy (implicit reward margin > 0): {acc['implicit']:.1%} of "
          f"{acc['pairs']} pairs; chosen ranked above rejected by likelihood "
          f"{acc['likelihood_before']:.1%} → {acc['likelihood_after']:.1%}")
    print(f"forgetting: general-text loss {d['forgetting']['general_loss_change_pct']:+.2f}%")
    print(f"dpo wall: {first_wall:.0f} s with the reference pass ({d['train_seconds']:.0f} s in "
          f"train()); beta=0.2 rerun {second_wall:.0f} s, reference "
          f"{again.metrics['reference_cache']['train']} (both with the forgetting check: "
          f"{d['forgetting']['general_loss_change_pct']:+.2f}% vs "
          f"{again.metrics['forgetting']['general_loss_change_pct']:+.2f}%)")


if __name__ == "__main__":
    main()
