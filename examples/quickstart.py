"""Quickstart: turn the general practitioner into a triage specialist, without forgetting.

On the embedded SmolLM2-135M-Instruct (CPU, a few minutes), train a "triage" pocket book on
bundled data — a patient's complaint in, ``Specialist: … | Urgency: …`` out — with the forgetting
guard on, then show:

* the plain model's and the pocket book's answers side by side on held-out complaints (symptom
  combinations never seen together in training),
* held-out accuracy before and after,
* the forgetting figure: general-English loss with the pocket book off and on.

    python examples/quickstart.py [--budget 1] [--steps 30]

The work itself is :func:`adapterkit.quickstart.part_one` (what ``adapterkit quickstart --part
1`` runs from any folder, with the data shipped in the package). The same through the CLI:

    adapterkit train sft --base smollm2-135m --data examples/data/triage_train.jsonl \\
        --name triage --guard-weight 0.3   # lr 1e-3, the 1% guard, --general: sft's defaults
    adapterkit eval triage --data examples/data/triage_test.jsonl --general general
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


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

    from adapterkit.cli import _quiet_libraries
    from adapterkit.errors import AdapterkitError
    from adapterkit.quickstart import part_one

    _quiet_libraries()
    try:
        figures = part_one(base=args.base, budget=args.budget, guard_weight=args.guard_weight,
                           steps=args.steps, lr=args.lr)
    except AdapterkitError as exc:
        sys.exit(str(exc))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
