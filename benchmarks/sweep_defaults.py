"""The defaults sweep: learning rate × rank × epochs × forgetting guard on three tasks of
different shapes (sweep_tasks.py), each pocket book scored on its task's held-out rows and by
its general-text loss change (forgetting), on the embedded base.

One resident base serves every run (each pocket book is taken off it after scoring). Results
are appended to a JSONL file as each run ends, so an interrupted sweep resumes where it stopped
(runs already in the file are not run again); --table prints the table from that file alone.

    python benchmarks/sweep_defaults.py --results sweep.jsonl [--grid core,ranks,epochs]
    python benchmarks/sweep_defaults.py --results sweep.jsonl --table

Grids: ``core`` = lr {2e-4, 5e-4, 1e-3, 2e-3} × guard {off, 1%}, rank 16, one epoch;
``ranks`` = rank {4, 64} at lr 1e-3, guard off or on at weight 3; ``epochs`` = two
epochs at lr {5e-4, 1e-3} and three at 1e-3, guard on at weight 3, and two at 1e-3 without
it; ``weights`` = the guard's KL weight {1, 3} (default 0.3) at lr {5e-4, 1e-3}; ``check``
= the old defaults, the chosen ones and the quickstart's settings (for ``--tasks triage``, the
quickstart's own data).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from sweep_tasks import write as write_tasks

from adapterkit.quickstart import load_jsonl

GRIDS: dict[str, list[dict[str, Any]]] = {
    "core": [{"lr": lr, "r": 16, "epochs": 1, "guard": g}
             for lr in (2e-4, 5e-4, 1e-3, 2e-3) for g in (False, True)],
    # rank and epochs around the chosen lr, the guard at the chosen weight (3) or off
    "ranks": [{"lr": 1e-3, "r": r, "epochs": 1, "guard": g, **({"weight": 3.0} if g else {})}
              for r in (4, 64) for g in (False, True)],
    "epochs": [{"lr": 1e-3, "r": 16, "epochs": 2, "guard": False}]
              + [{"lr": lr, "r": 16, "epochs": e, "guard": True, "weight": 3.0}
                 for lr, e in ((5e-4, 2), (1e-3, 2), (1e-3, 3))],
    "weights": [{"lr": lr, "r": 16, "epochs": 1, "guard": True, "weight": w}
                for lr in (5e-4, 1e-3) for w in (1.0, 3.0)],
    # for --tasks triage (30 steps an epoch, so the chosen defaults train one epoch there):
    # the old defaults, the chosen ones, and the quickstart's own settings
    "check": [{"lr": 2e-4, "r": 16, "epochs": 1, "guard": False},
              {"lr": 1e-3, "r": 16, "epochs": 1, "guard": True, "weight": 3.0},
              {"lr": 1e-3, "r": 16, "epochs": 1, "guard": True}],
}
TODAY = {"lr": 2e-4, "r": 16, "epochs": 1, "guard": False}  # the defaults before this sweep
#: The defaults this sweep chose for sft (plugins/sft.py: Trainer.defaults); their epochs
#: follow the data's size (at least 30 steps: :func:`chosen`).
CHOSEN = {"lr": 1e-3, "r": 16, "guard": True, "weight": 3.0}


def task_rows() -> dict[str, int]:
    """Each task's training rows (its files written to a folder removed afterwards)."""
    with tempfile.TemporaryDirectory() as folder:
        return {t: spec["rows"] for t, spec in write_tasks(Path(folder)).items()}


def chosen(rows: int) -> dict[str, Any]:
    """The chosen defaults on ``rows`` training rows, epochs as ``train sft`` resolves them."""
    from adapterkit.plugin_api.manager import get_plugin_manager
    from adapterkit.training.options import TrainOptions, with_data_defaults

    min_steps = get_plugin_manager(env=False).trainer("sft").defaults["min_steps"]
    epochs = with_data_defaults(TrainOptions(batch_size=8, min_steps=min_steps), rows).epochs
    return {**CHOSEN, "epochs": int(epochs or 1)}
BUDGET = 1.0  # percent: the forgetting budget a default must stay within


def key(task: str, cfg: dict[str, Any]) -> str:
    weight = f" weight={cfg['weight']:g}" if cfg.get("weight") is not None else ""
    return (f"{task} lr={cfg['lr']:g} r={cfg['r']} epochs={cfg['epochs']} guard={cfg['guard']}"
            + weight)


def score(task: str, spec: dict[str, Any], model: Any, tok: Any) -> float:
    """The held-out score of ``model`` on ``task``: exact match in percent, or for the text
    task the held-out loss reduction in percent (the negated loss change)."""
    from adapterkit.training.metrics import accuracy, forgetting

    if task == "gazetteer":
        texts = json.loads(Path(spec["test"]).read_text())
        return -forgetting(model, tok, texts)["general_loss_change_pct"]
    rows = [json.loads(line) for line in open(spec["test"]) if line.strip()]
    acc, _ = accuracy(model, tok, rows, chat=spec["chat"], max_new_tokens=24)
    return 100.0 * acc


def run(args: argparse.Namespace) -> None:
    import adapterkit
    from adapterkit.training.build import DEFAULT_GUARD_WEIGHT

    done = {}
    results = Path(args.results)
    if results.exists():
        done = {r["key"]: r for r in load_jsonl(results)}
    unknown = sorted(set(args.grid.split(",")) - set(GRIDS))
    if unknown:
        raise SystemExit(f"unknown grid(s) {', '.join(unknown)}; known: {', '.join(GRIDS)}")
    todo = [(t, cfg) for g in args.grid.split(",") for t in args.tasks.split(",")
            for cfg in GRIDS[g] if key(t, cfg) not in done]
    print(f"{len(done)} runs in {results}, {len(todo)} to go", flush=True)
    if not todo:
        return
    home = Path(tempfile.mkdtemp(prefix="sweep-home-"))
    if args.bases:  # share converted bases (the embedded GGUF is converted once)
        (home / "bases").symlink_to(Path(args.bases).resolve())
    tasks = write_tasks(home / "data")
    loaded = adapterkit.load_base(args.base, home=home)
    tok = loaded.tokenizer
    library = adapterkit.Library(home)
    for task, cfg in todo:
        spec = tasks[task]
        # every setting explicit, so sft's own defaults (which this sweep chose) never fill in
        options = adapterkit.TrainOptions(
            learning_rate=cfg["lr"], r=cfg["r"], alpha=2 * cfg["r"], epochs=cfg["epochs"],
            chat=spec["chat"], general="general", seed=0,
            forgetting_budget=BUDGET if cfg["guard"] else 0,
            guard_weight=(cfg.get("weight") or DEFAULT_GUARD_WEIGHT) if cfg["guard"] else None)
        start = time.perf_counter()
        result = adapterkit.train("sft", base=loaded, data=spec["train"], name=f"sweep-{task}",
                                  options=options, home=home)
        held_out = score(task, spec, result.model, tok)
        m = result.metrics
        row = {"key": key(task, cfg), "task": task, **cfg, "score": held_out,
               "forgetting_pct": m["forgetting"]["general_loss_change_pct"],
               "steps": m["steps"], "train_seconds": m["train_seconds"],
               "wall_seconds": time.perf_counter() - start,
               "kept_step": (m.get("guard") or {}).get("kept_step"),
               "within_budget": (m.get("guard") or {}).get("within_budget")}
        with results.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        result.model.unload()  # the shared base gets its plain layers back
        library.remove(result.pocket_book.name, all_versions=True)


def table(results: Path) -> None:
    rows = load_jsonl(results)
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task]
        unit = "loss reduction %" if task == "gazetteer" else "exact match %"
        print(f"\n### {task} (held-out {unit}; forgetting = general-text loss change)\n")
        print("| lr | rank | epochs | guard (weight) | steps | kept | held-out | forgetting "
              "| train s |")
        print("|---:|---:|---:|:---:|---:|---:|---:|---:|---:|")
        for r in sorted(mine, key=lambda r: (r["epochs"], r["r"], r["lr"], r["guard"],
                                             r.get("weight") or 0)):
            guard = f"1% ({r.get('weight') or 0.3:g})" if r["guard"] else "off"
            print(f"| {r['lr']:g} | {r['r']} | {r['epochs']} | {guard} "
                  f"| {r['steps']} | {r.get('kept_step') or r['steps']} "
                  f"| {r['score']:.1f} | {r['forgetting_pct']:+.2f}% "
                  f"| {r['train_seconds']:.0f} |")
        within = [r for r in mine if r["forgetting_pct"] <= BUDGET]
        if within:
            best = max(within, key=lambda r: r["score"])
            print(f"\nbest within {BUDGET:g}%: {key(task, best)}: {best['score']:.1f}, "
                  f"{best['forgetting_pct']:+.2f}%")


def summary(results: Path) -> None:
    """Per task: the old defaults, the chosen ones, the grid's best, and its best within the
    budget; and whether the chosen ones reach 90% of the grid's best within the budget."""
    rows = load_jsonl(results)
    by_key = {r["key"]: r for r in rows}
    sizes = task_rows()

    def cell(r: dict[str, Any] | None) -> str:
        return "not run" if r is None else f"{r['score']:.1f} / {r['forgetting_pct']:+.2f}%"

    print(f"\n| task | old defaults | chosen defaults | best of the grid | best within "
          f"{BUDGET:g}% | chosen within {BUDGET:g}% at ≥ 90% of: best / best within |")
    print("|---|---|---|---|---|---|")
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task]
        best = max(mine, key=lambda r: r["score"])
        within = [r for r in mine if r["forgetting_pct"] <= BUDGET]
        best_within = max(within, key=lambda r: r["score"]) if within else None
        mine_chosen = by_key.get(key(task, chosen(sizes[task])))

        print(f"| {task} | {cell(by_key.get(key(task, TODAY)))} | {cell(mine_chosen)} | "
              f"{cell(best)} ({key(task, best).split(' ', 1)[1]}) | {cell(best_within)} | "
              f"{_met(mine_chosen, best)} / {_met(mine_chosen, best_within)} |")


def _met(chosen: dict[str, Any] | None, goal: dict[str, Any] | None) -> str:
    """Whether ``chosen`` stays within the budget at ≥ 90% of ``goal``'s score."""
    if chosen is None or goal is None:
        return "-"
    ok = chosen["forgetting_pct"] <= BUDGET and chosen["score"] >= 0.9 * goal["score"]
    return "yes" if ok else "no"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", required=True, help="JSONL file of runs (appended; resumes)")
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--bases", help="a library's bases/ folder to reuse converted bases from")
    p.add_argument("--tasks", default="routing,listing,gazetteer")
    p.add_argument("--grid", default="core", help=f"comma list of {', '.join(GRIDS)}")
    p.add_argument("--table", action="store_true", help="only print the table of --results")
    args = p.parse_args()
    if not args.table:
        run(args)
    table(Path(args.results))
    summary(Path(args.results))


if __name__ == "__main__":
    main()
