"""First DPO figures on the embedded base (issue #4 is not finished; this is a probe).

Trains a `dpo` pocket book on examples/data/preferences_train.jsonl (courteous, safe answers
chosen over curt or unsafe ones) and reports held-out preference accuracy — the share of
examples/data/preferences_test.jsonl pairs whose implicit reward margin
β·[(log π(chosen) − log π_ref(chosen)) − (log π(rejected) − log π_ref(rejected))] is > 0, the
reference being the same base with the pocket book off — plus the forgetting figure and time.

    python benchmarks/bench_dpo.py [--steps 25] [--lr 5e-4]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--lr", type=float, default=5e-4)
    args = p.parse_args()

    from adapterkit import TrainOptions, load_base, train
    from adapterkit.cli import _quiet_libraries
    from adapterkit.evaluation import completion_logprob

    _quiet_libraries()
    start = time.perf_counter()
    base = load_base(args.base)
    tok = base.tokenizer
    test = [json.loads(line) for line in
            (ROOT / "examples/data/preferences_test.jsonl").read_text().splitlines()]
    with tempfile.TemporaryDirectory() as home:
        result = train("dpo", base=base, data=str(ROOT / "examples/data/preferences_train.jsonl"),
                       name="bedside", home=home,
                       options=TrainOptions(max_steps=args.steps, batch_size=8,
                                            learning_rate=args.lr, general="general",
                                            trainer_options={"beta": 0.1}))
    model = result.model
    wins = 0
    for row in test:
        on = (completion_logprob(model, tok, row["prompt"], row["chosen"])
              - completion_logprob(model, tok, row["prompt"], row["rejected"]))
        with model.disable_adapter():
            off = (completion_logprob(model, tok, row["prompt"], row["chosen"])
                   - completion_logprob(model, tok, row["prompt"], row["rejected"]))
        wins += (on - off) > 0
    m = result.metrics
    print(f"dpo: {m['steps']} steps in {m['train_seconds']:.0f} s, loss "
          f"{m['train_loss_first']:.3f} → {m['train_loss_final']:.4f}")
    print(f"held-out preference accuracy (implicit reward margin > 0): {wins / len(test):.1%} "
          f"of {len(test)} pairs (0% before: a fresh pocket book has margin 0)")
    print(f"forgetting: general-text loss {m['forgetting']['general_loss_change_pct']:+.2f}%")
    print(f"total wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
