"""Quickstart: turn the general practitioner into a triage specialist, without forgetting.

On the embedded SmolLM2-135M-Instruct (CPU, a few minutes), train a "triage" pocket book on
bundled data — a patient's complaint in, ``Specialist: … | Urgency: …`` out — with the forgetting
guard on, then show:

* the plain model's and the pocket book's answers side by side on held-out complaints (symptom
  combinations never seen together in training),
* held-out accuracy before and after,
* the forgetting figure: general-English loss with the pocket book off and on.

    python examples/quickstart.py [--budget 1] [--steps 30]

The same through the CLI:

    adapterkit train sft --base smollm2-135m --data examples/data/triage_train.jsonl \\
        --name triage --lr 1e-3 --general general --forgetting-budget 1%
    adapterkit eval triage --data examples/data/triage_test.jsonl --general general
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"


def check_paths(library: Any, ref: str) -> None:
    """Is the pocket book exact on every path we offer? Each against plain PEFT, recorded on
    its card (what `adapterkit verify NAME` does)."""
    from adapterkit.runtime.verify import summary, verify

    result = verify(library, ref)
    print("Verify: " + summary(result))
    if not result.ok:
        raise SystemExit(f"{ref} drifts from plain PEFT on some path")


def load_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description="adapterkit quickstart (triage pocket book)")
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--budget", type=float, default=1.0,
                        help="forgetting budget in percent (0 disables the guard)")
    parser.add_argument("--guard-weight", type=float, default=None)
    parser.add_argument("--steps", type=int, default=None, help="max training steps")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()

    import adapterkit
    from adapterkit.cli import _quiet_libraries
    from adapterkit.training.metrics import accuracy
    from adapterkit.training.progress import progress_callback

    _quiet_libraries()
    start = time.perf_counter()
    train_file, test_file = DATA / "triage_train.jsonl", DATA / "triage_test.jsonl"
    if not train_file.exists():
        sys.exit("examples/data is missing: run python examples/make_triage_data.py")
    test = load_jsonl(test_file)

    print(f"Loading {args.base}...", flush=True)
    base = adapterkit.load_base(args.base, progress=print)
    tok = base.tokenizer
    print("Measuring the plain model on held-out complaints...", flush=True)
    acc_before, plain_answers = accuracy(base.model, tok, test, chat=True, max_new_tokens=24)

    library = adapterkit.Library()
    versions = [s.version for s in library.list(all_versions=True) if s.name == "triage"]
    name = f"triage@{max(versions) + 1}" if versions else "triage"
    options = adapterkit.TrainOptions(
        learning_rate=args.lr, r=16, alpha=32, batch_size=8, epochs=1,
        max_steps=args.steps or -1, general="general", logging_steps=5,
        forgetting_budget=args.budget or None, guard_weight=args.guard_weight, seed=0,
    )
    result = adapterkit.train("sft", base=base, data=str(train_file), name=name,
                              options=options, callbacks=[progress_callback("triage")],
                              progress=print)
    model = result.model
    acc_after, book_answers = accuracy(model, tok, test, chat=True, max_new_tokens=24)
    forgot = result.metrics["forgetting"]
    elapsed = time.perf_counter() - start

    print("\nHeld-out complaints (symptom combinations never seen together in training):\n")
    for row, plain, ours in list(zip(test, plain_answers, book_answers))[:4]:
        print(f"  complaint:    {row['prompt']}")
        print(f"  plain model:  {plain[:90]!r}")
        print(f"  pocket book:  {ours!r}   {'✓' if ours == row['completion'] else '✗'}\n")
    print(f"Held-out accuracy: {acc_before:.1%} plain → {acc_after:.1%} with the pocket book "
          f"({len(test)} complaints)")
    print(f"Forgetting: general-text loss {forgot['general_loss_base']:.4f} → "
          f"{forgot['general_loss']:.4f} ({forgot['general_loss_change_pct']:+.2f}%)"
          + (f", budget {args.budget:g}%" if args.budget else ", no guard"))
    m = result.metrics
    print(f"Training: {m['steps']} steps, {m['train_seconds']:.0f} s, "
          f"{m['tokens_per_second']:.0f} tokens/s; total wall time {elapsed:.0f} s")
    print(f"Saved {result.pocket_book.ref} → try: adapterkit generate --adapter "
          f"{result.pocket_book.ref} \"I have ear pain and a sore throat since yesterday.\"")
    library.tag(result.pocket_book.ref, "quickstart")
    check_paths(library, result.pocket_book.ref)
    figures = {"accuracy_before": acc_before, "accuracy_after": acc_after,
               "forgetting_pct": forgot["general_loss_change_pct"], "wall_seconds": elapsed,
               "train_seconds": m["train_seconds"], "tokens_per_second": m["tokens_per_second"],
               "steps": m["steps"], "pocket_book": result.pocket_book.ref}
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
