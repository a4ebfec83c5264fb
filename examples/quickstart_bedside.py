"""Quickstart, part two: a "bedside manner" pocket book trained with DPO on top of triage.

The triage pocket book from part one (``examples/quickstart.py``) answers with the right
specialist and urgency — but nothing taught it how to talk to a patient. Here a second pocket
book is trained with DPO *on top of it* (``--on triage``: triage stays frozen and active
underneath, and is DPO's reference) from bundled preference pairs: for the same complaints, a
courteous, safe answer is chosen over a curt or unsafe one (e.g. one recommending a dangerous
dose). Then it reports, on 48 held-out pairs:

* preference accuracy — the share of pairs whose implicit reward margin is above 0 after DPO
  (no "before": a fresh pocket book's margin is exactly 0 by construction, not a measurement),
  and how often the model ranks the chosen answer above the rejected one by likelihood, with
  triage alone and with bedside on top — both measured;
* the forgetting figure of part one (general-English loss, relative to base + triage);
* a held-out complaint answered by triage alone and by the stack.

    python examples/quickstart_bedside.py [--steps 12] [--lr 1e-3] [--beta 0.1]

The same through the CLI:

    adapterkit train dpo --base smollm2-135m --data examples/data/preferences_train.jsonl \\
        --name bedside --on triage --lr 1e-3 --max-steps 12 --general general \\
        --set loss_type=[sigmoid,sft]
    adapterkit generate --adapter bedside "I have chest pain and I feel dizzy."
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from quickstart import DATA, check_paths, load_jsonl  # part one, beside this file


def preference_lines(acc: dict, on: str) -> list[str]:
    """The preference figures of ``preference_accuracy(...)``, each one measured in this run.

    The implicit reward margin has no "before": before DPO it is exactly 0 for every pair, by
    construction. The measured "before" is the likelihood ranking with ``on`` alone.
    """
    return [f"Held-out preference accuracy (implicit reward margin > 0): {acc['implicit']:.1%} "
            f"after DPO ({acc['pairs']} pairs)",
            f"Chosen answer ranked above rejected by likelihood: {acc['likelihood_before']:.1%} "
            f"with {on} alone → {acc['likelihood_after']:.1%} with bedside on top"]


def preference_figures(acc: dict) -> dict[str, float]:
    """The same figures for ``--json``: only measured ones."""
    return {"preference_accuracy_after": acc["implicit"],
            "likelihood_before": acc["likelihood_before"],
            "likelihood_after": acc["likelihood_after"], "pairs": acc["pairs"]}


def main() -> None:
    parser = argparse.ArgumentParser(description="adapterkit quickstart, part two (DPO on top)")
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--on", default=None,
                        help="pocket book to train on top of (default: part one's triage)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()

    import adapterkit
    from adapterkit.cli import _quiet_libraries
    from adapterkit.training.metrics import generate, preference_accuracy
    from adapterkit.training.progress import progress_callback

    _quiet_libraries()
    start = time.perf_counter()
    train_file, test_file = DATA / "preferences_train.jsonl", DATA / "preferences_test.jsonl"
    if not train_file.exists():
        sys.exit("examples/data is missing: run python examples/make_triage_data.py")
    test = load_jsonl(test_file)
    library = adapterkit.Library()
    on = args.on or next((f"{s.name}@{s.version}" for s in library.list(tag="quickstart")
                          if s.name == "triage"), None)
    if on is None:
        sys.exit("No triage pocket book yet: run part one first (python examples/quickstart.py), "
                 "or pass --on NAME")
    on = library.get(on).ref

    print(f"Loading {args.base}...", flush=True)
    base = adapterkit.load_base(args.base, progress=print)
    tok = base.tokenizer
    versions = [s.version for s in library.list(all_versions=True) if s.name == "bedside"]
    name = f"bedside@{max(versions) + 1}" if versions else "bedside"
    options = adapterkit.TrainOptions(
        learning_rate=args.lr, r=16, alpha=32, batch_size=8, max_steps=args.steps,
        general="general", logging_steps=4, seed=0,
        # DPO's preference loss plus an SFT term on the chosen answer (RPO): DPO alone only
        # ranks chosen above rejected; the SFT term also makes the model actually say it.
        trainer_options={"beta": args.beta, "loss_type": ["sigmoid", "sft"]},
    )
    result = adapterkit.train("dpo", base=base, data=str(train_file), name=name, on=on,
                              options=options, callbacks=[progress_callback("bedside")],
                              progress=print)
    model = result.model  # base + triage (frozen) + bedside
    print("Ranking held-out preference pairs...", flush=True)
    acc = preference_accuracy(model, tok, test)
    complaint = test[0]["prompt"]
    with model.disable_adapter():  # triage alone
        plain = generate(model, tok, [complaint], chat=True, max_new_tokens=48)[0]
    kind = generate(model, tok, [complaint], chat=True, max_new_tokens=48)[0]
    forgot = result.metrics["forgetting"]
    elapsed = time.perf_counter() - start

    print(f"\nHeld-out complaint: {complaint}\n")
    print(f"  {on} alone:       {plain!r}")
    print(f"  {on} + bedside:   {kind!r}\n")
    print("\n".join(preference_lines(acc, on)))
    print(f"Forgetting: general-text loss {forgot['general_loss_base']:.4f} → "
          f"{forgot['general_loss']:.4f} ({forgot['general_loss_change_pct']:+.2f}%, relative "
          f"to base + {on})")
    m = result.metrics
    print(f"Training: {m['steps']} steps, {m['train_seconds']:.0f} s, "
          f"{m['tokens_per_second']:.0f} tokens/s, reference log-probs "
          f"{m.get('reference_cache', {}).get('train', 'computed alongside')}; "
          f"total wall time {elapsed:.0f} s")
    print(f"Saved {result.pocket_book.ref} (on top of {on}) → try: adapterkit generate "
          f"--adapter {result.pocket_book.ref} \"{complaint}\"")
    library.tag(result.pocket_book.ref, "quickstart")
    check_paths(library, result.pocket_book.ref)  # bedside with triage underneath, vs PEFT
    figures = {**preference_figures(acc),
               "forgetting_pct": forgot["general_loss_change_pct"], "wall_seconds": elapsed,
               "train_seconds": m["train_seconds"], "tokens_per_second": m["tokens_per_second"],
               "steps": m["steps"], "pocket_book": result.pocket_book.ref, "on": on}
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
