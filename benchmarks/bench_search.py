"""``train --search lr,r --trials 8 --budget 1%`` against the defaults sweep's grid, on the
sweep's tasks (sweep_tasks.py) and the embedded base: the held-out score the search's kept
pocket book reaches, and its wall time, beside the grid's best within the budget and the
grid's total time (from the sweep's results file).

The search ranks its trials on a split carved from the training rows (its own held-out
loss), so each trial trains on 80% of the rows the grid's runs train on; the score here is
the task's separate held-out set, as in the sweep, taken with the kept pocket book loaded by
plain PEFT (``PeftModel.from_pretrained``), not by our code. Its wall time is the whole
search as a user runs it: each trial loads the base itself (the sweep loads it once). Results
are appended to a JSONL file as each task ends (a finished task is not run again; a search
that keeps nothing is recorded as such).

    python benchmarks/bench_search.py --grid sweep.jsonl --results search.jsonl \
        [--tasks gazetteer,routing,listing] [--trials 8] [--bases ~/.adapterkit/bases]
    python benchmarks/bench_search.py --grid sweep.jsonl --results search.jsonl --table
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from sweep_defaults import BUDGET, key, score
from sweep_tasks import write as write_tasks

from adapterkit.quickstart import load_jsonl


def run(args: argparse.Namespace) -> None:
    import adapterkit
    from adapterkit.training.search import SearchFailed, search

    results = Path(args.results)
    done = {r["task"] for r in load_jsonl(results)} if results.exists() else set()
    for task in args.tasks.split(","):
        if task in done:
            print(f"{task}: in {results} already", flush=True)
            continue
        home = Path(tempfile.mkdtemp(prefix="search-home-"))
        if args.bases:  # share converted bases (the embedded GGUF is converted once)
            (home / "bases").symlink_to(Path(args.bases).resolve())
        spec = write_tasks(home / "data")[task]
        # what a user types: the trainer's defaults (sft: the guard at 1%, weight 3) fill the rest
        options = adapterkit.TrainOptions(chat=spec["chat"], general="general", seed=0)
        start = time.perf_counter()
        try:
            result = search("sft", base=args.base, data=spec["train"], name=f"search-{task}",
                            space=["lr", "r"], trials=args.trials, budget=BUDGET,
                            options=options, home=home,
                            progress=lambda line: print(line, flush=True))
        except SearchFailed as exc:  # no trial within the budget: recorded, nothing to score
            row = {"task": task, "trials": args.trials, "budget_pct": BUDGET, "score": None,
                   "kept": None, "wall_seconds": time.perf_counter() - start,
                   "message": str(exc)}
        else:
            wall = time.perf_counter() - start
            book = result.kept.pocket_book
            held_out = _score_with_peft(task, spec, args.base, home, book.path)
            kept = next(r for r in result.trials
                        if r["trial"] == book.meta.metrics["search"]["kept"])
            row = {"task": task, "trials": args.trials, "budget_pct": BUDGET, "score": held_out,
                   "forgetting_pct": kept["forgetting_pct"], "lr": kept["lr"], "r": kept["r"],
                   "steps": kept["steps"], "wall_seconds": wall,
                   "table": [{k: v for k, v in t.items()
                              if k in ("trial", "lr", "r", "eval_loss", "forgetting_pct")}
                             for t in result.trials]}
        finally:
            shutil.rmtree(home, ignore_errors=True)
        with results.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def _score_with_peft(task: str, spec: dict[str, Any], base: str, home: Path,
                     path: Path) -> float:
    """The task's held-out score of the pocket book in ``path``, loaded by plain PEFT."""
    from peft import PeftModel

    import adapterkit

    loaded = adapterkit.load_base(base, home=home)
    model = PeftModel.from_pretrained(loaded.model, str(path))
    model.eval()
    return score(task, spec, model, loaded.tokenizer)


def table(grid: Path, results: Path) -> None:
    """Per task: the search's kept pocket book against the grid's best within the budget and
    the chosen defaults, with the wall time of each."""
    from sweep_defaults import chosen as chosen_on
    from sweep_defaults import task_rows

    runs = load_jsonl(grid)
    sizes = task_rows()
    print(f"\n| task | search: score / forgetting, lr, r | wall s | grid best "
          f"within {BUDGET:g}% | grid runs, wall s | chosen defaults, wall s |")
    print("|---|---|---:|---|---|---|")
    for row in load_jsonl(results):
        task = row["task"]
        if row["score"] is None:
            print(f"| {task} | kept none within {row['budget_pct']:g}% ({row['trials']} trials) "
                  f"| {row['wall_seconds']:.0f} | | | |")
            continue
        mine = [r for r in runs if r["task"] == task]
        within = [r for r in mine if r["forgetting_pct"] <= BUDGET]
        best = max(within, key=lambda r: r["score"]) if within else None
        chosen = next((r for r in mine if r["key"] == key(task, chosen_on(sizes[task]))), None)
        grid_wall = sum(r["wall_seconds"] for r in mine)
        print(f"| {task} | {row['score']:.1f} / {row['forgetting_pct']:+.2f}%, lr "
              f"{row['lr']:.2e}, r {row['r']} ({row['trials']} trials) | "
              f"{row['wall_seconds']:.0f} | "
              + (f"{best['score']:.1f} / {best['forgetting_pct']:+.2f}% "
                 f"({best['key'].split(' ', 1)[1]})" if best else "none")
              + f" | {len(mine)} runs, {grid_wall:.0f} | "
              + (f"{chosen['score']:.1f} / {chosen['forgetting_pct']:+.2f}%, "
                 f"{chosen['wall_seconds']:.0f}" if chosen else "not run") + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", required=True, help="the sweep's JSONL (sweep_defaults.py)")
    p.add_argument("--results", required=True, help="JSONL of searches (appended; resumes)")
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--bases", help="a library's bases/ folder to reuse converted bases from")
    p.add_argument("--tasks", default="gazetteer,routing,listing")
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--table", action="store_true", help="only print the table of --results")
    args = p.parse_args()
    if not args.table:
        run(args)
    table(Path(args.grid), Path(args.results))


if __name__ == "__main__":
    main()
