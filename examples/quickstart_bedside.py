"""Quickstart, part two: a "bedside manner" pocket book trained with DPO on top of triage.

The triage pocket book from part one (``examples/quickstart.py``) answers with the right
specialist and urgency — but nothing taught it how to talk to a patient. Here a second pocket
book is trained with DPO *on top of it* (``--on triage``: triage stays frozen and active
underneath, and is DPO's reference) from bundled preference pairs: for the same complaints, a
courteous, safe answer is chosen over a curt or unsafe one (e.g. one recommending a dangerous
dose) or over an equally courteous one with another urgency's advice, with the forgetting guard
on. Then it reports, on 48 held-out pairs:

* preference accuracy — the share of pairs whose implicit reward margin is above 0 after DPO
  (no "before": a fresh pocket book's margin is exactly 0 by construction, not a measurement),
  and how often the model ranks the chosen answer above the rejected one by likelihood, with
  triage alone and with bedside on top — both measured;
* how often the advice fits the urgency, on the 48 held-out complaints;
* the forgetting figure of part one (general-English loss, relative to base + triage);
* a held-out complaint answered by triage alone and by the stack.

    python examples/quickstart_bedside.py [--steps 64] [--batch-size 2] [--lr 1e-3] [--beta 0.1]
                                          [--budget 1]

The work itself is :func:`adapterkit.quickstart.part_two` (what ``adapterkit quickstart --part
2`` runs from any folder). The same through the CLI:

    adapterkit train dpo --base smollm2-135m --data examples/data/preferences_train.jsonl \\
        --name bedside --on triage --lr 1e-3 --max-steps 64 --batch-size 2 --general general \\
        --forgetting-budget 1% --set loss_type=[sigmoid,sft]
    adapterkit generate --adapter bedside "I have chest pain and I feel dizzy."
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# the figures' wording lives with the quickstart itself (tests/test_honesty.py reads it here)
from adapterkit.quickstart import (
    PART_TWO_BATCH,
    PART_TWO_STEPS,
    preference_figures,
    preference_lines,
)

__all__ = ["main", "preference_figures", "preference_lines"]


def main() -> None:
    parser = argparse.ArgumentParser(description="adapterkit quickstart, part two (DPO on top)")
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--on", default=None,
                        help="pocket book to train on top of (default: part one's triage)")
    parser.add_argument("--steps", type=int, default=PART_TWO_STEPS)
    parser.add_argument("--batch-size", type=int, default=PART_TWO_BATCH)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--budget", type=float, default=1.0,
                        help="forgetting budget in percent (0 disables the guard)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()

    from adapterkit.cli import _quiet_libraries
    from adapterkit.errors import AdapterkitError
    from adapterkit.quickstart import part_two

    _quiet_libraries()
    try:
        figures = part_two(base=args.base, on=args.on, steps=args.steps,
                           batch_size=args.batch_size, lr=args.lr, beta=args.beta,
                           budget=args.budget)
    except AdapterkitError as exc:
        sys.exit(str(exc))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
