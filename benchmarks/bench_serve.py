"""Serving many pocket books at once: the engine's mixed batches against its peers, one run.

On --base (a base folder, Hub id or alias; ``--base tiny`` builds a tiny random one), with
--books LoRA pocket books (all linear layers, rank --rank) made on the fly, --requests prompts
of --new-tokens new tokens each, the requests spread over the pocket books in turn. Every path
runs in its own process (so each one's peak memory is its own), on the same prompts, greedy:

* ``mixed``     — the engine (``adapterkit.serving.engine``), all requests submitted at once,
  decoded by its background thread in batches of up to --max-batch mixed pocket books;
* ``one_book``  — the same engine and load, every request on the first pocket book;
* ``swap``      — what a session alone can do: one request at a time, a swap before each
  (``Session.swap`` then ``generate``);
* ``peft``      — PEFT's own mixed-adapter inference: every pocket book loaded into one
  ``PeftModel``, ``generate(..., adapter_names=[...])`` on batches of --max-batch prompts;
* ``mixed_many``— the engine's mixed load again with --attached pocket books attached first
  (``preload``), for its peak memory with many attached.

Each path's load runs --rounds times; the median wall and CPU seconds are reported. Printed:
tokens/s of each, the ratios the issue sets goals for (mixed / one book ≥ 0.8, mixed /
swap ≥ 3, mixed / PEFT ≥ 2), p50/p99 time to first token and per-token latency of the engine's
runs, peak memory of each process, and how many greedy answers are identical across paths
(answers are cut at the end-of-sequence token; tokens/s counts the tokens actually answered).

The engine is driven in-process here (its own API: submit, then read each request's events);
the same load over HTTP (the ``openai`` client on loopback), and ``transformers serve`` on the
plain base, need the HTTP server and are not measured by this script.

    python benchmarks/bench_serve.py [--base smollm2-135m|tiny|PATH] [--books 8]
        [--requests 32] [--new-tokens 64] [--max-batch 32] [--rank 8] [--attached 50]
        [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PATHS = ("mixed", "one_book", "swap", "peft", "mixed_many")

TEXTS = [
    "The patient reports chest pain and shortness of breath since this morning.",
    "A mild rash on the forearm, itchy, appeared two days ago after gardening.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "Rivers carve valleys over thousands of years; mountains rise and wear away.",
    "def add(a, b): return a + b  # numbers, code and punctuation",
    "Which specialist should see a child with a high fever and a stiff neck?",
    "Summarise: the meeting moved to Thursday and the budget is due on Friday.",
    "Name three colours of the rainbow and one animal that lives in rivers.",
]


# -- the parent: books, prompts, children, figures ------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--base", default="smollm2-135m", help="a base, or tiny (a tiny random one)")
    p.add_argument("--books", type=int, default=8)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--attached", type=int, default=50,
                   help="pocket books attached for the mixed_many run (0: skip it)")
    p.add_argument("--rounds", type=int, default=5,
                   help="timed repetitions of each path's load (the median is reported)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="every request decodes --new-tokens tokens, past end-of-sequence (the "
                        "same work on every path, as vLLM's benchmarks do)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="the base's dtype (auto: float32 on a CPU, bfloat16 on a GPU); greedy "
                        "answers of different paths agree exactly only where their arithmetic "
                        "does, which bfloat16 on a GPU does not promise")
    p.add_argument("--paths", default=",".join(PATHS),
                   help="the paths to run, comma-separated (mixed always runs: the ratios are "
                        "of it)")
    p.add_argument("--profile", metavar="FILE",
                   help="before each engine path's timed load, profile --profile-steps of its "
                        "decode steps (torch.profiler, CPU and, on a GPU, CUDA) on the same "
                        "requests, on an engine of its own (closed before the timed one is "
                        "built), and append the operator table to FILE: where a step's time "
                        "goes")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    p.add_argument("--plan", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        plan = json.loads(Path(args.plan).read_text())
        print("RESULT " + json.dumps(CHILDREN[args.child](plan)))
        return
    asked = {"mixed", *args.paths.split(",")}
    unknown = sorted(asked - set(PATHS))
    if unknown:  # before the pocket books are made
        sys.exit(f"unknown path(s) {', '.join(unknown)}; known: {', '.join(PATHS)}")
    with tempfile.TemporaryDirectory() as tmp:
        plan = _prepare(args, Path(tmp))
        plan_file = Path(tmp) / "plan.json"
        plan_file.write_text(json.dumps(plan))
        results = {}
        for path in PATHS:
            if path not in asked or path == "mixed_many" and args.attached <= args.books:
                continue
            print(f"running {path}...", flush=True)
            results[path] = _child(path, plan_file)
    _report(args, plan, results)


def _prepare(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Make the base (if tiny), the pocket books and the prompts, once for every path."""
    from adapterkit.base.resolve import resolve_base
    from adapterkit.library.store import Library
    from adapterkit.plugin_api.testing import make_tiny_base

    home = tmp / "home"
    spec = str(make_tiny_base(tmp / "tiny")) if args.base == "tiny" else args.base
    folder = resolve_base(spec, home).folder
    library = Library(home)
    count = max(args.books, args.attached)
    print(f"making {count} LoRA pocket books (all-linear, r={args.rank}) on {args.base}...",
          flush=True)
    names = _make_books(folder, tmp, library, count, args.rank)
    from transformers import AutoTokenizer

    from adapterkit.runtime.generation import render_prompt, uses_chat

    tokenizer = AutoTokenizer.from_pretrained(folder)
    chat = uses_chat(tokenizer, None)
    prompts = []
    for i in range(args.requests):
        text = render_prompt(tokenizer, f"Request {i}. {TEXTS[i % len(TEXTS)]}", chat=chat)
        prompts.append(tokenizer(text, add_special_tokens=not chat)["input_ids"])
    return {"home": str(home), "base": str(folder), "books": names[:args.books],
            "all_books": names, "prompts": prompts, "new_tokens": args.new_tokens,
            "max_batch": args.max_batch, "attached": args.attached, "rounds": args.rounds,
            "assign": [names[i % args.books] for i in range(args.requests)],
            "ignore_eos": args.ignore_eos, "dtype": args.dtype,
            "profile": str(Path(args.profile).resolve()) if args.profile else None,
            "profile_steps": args.profile_steps}


def _make_books(folder: Path, tmp: Path, library: Any, count: int, rank: int) -> list[str]:
    """``count`` different random LoRAs (non-zero B) saved by PEFT and imported: one base load
    for all of them."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(folder),
                           LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                      task_type="CAUSAL_LM"))
    names = []
    for i in range(count):
        torch.manual_seed(100 + i)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_A" in name:
                    param.normal_(std=0.3)
                elif "lora_B" in name:
                    param.normal_(std=0.05)
        out = tmp / f"book{i}"
        model.save_pretrained(str(out))
        library.import_peft(out, f"book{i}", base=str(folder))
        names.append(f"book{i}")
    return names


def _child(path: str, plan_file: Path) -> dict[str, Any]:
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run([sys.executable, __file__, "--child", path, "--plan", str(plan_file)],
                          capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        sys.exit(f"{path} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _report(args: argparse.Namespace, plan: dict[str, Any], results: dict[str, Any]) -> None:
    print(f"\nbase {args.base}; {len(plan['prompts'])} requests over {len(plan['books'])} "
          f"pocket books, {args.new_tokens} new tokens max, batch {args.max_batch}, "
          f"torch threads {results['mixed']['threads']}, device {results['mixed']['device']}")
    memory = "peak GPU MB" if results["mixed"]["device"].startswith("cuda") else "peak RSS MB"
    print(f"{'path':<11} {'tokens':>7} {'seconds':>8} {'tokens/s':>9} {'CPU s':>7} "
          f"{'tokens/CPU-s':>12} {memory:>12}")
    for path, r in results.items():
        rate = r["tokens"] / r["seconds"]
        print(f"{path:<11} {r['tokens']:>7} {r['seconds']:>8.2f} {rate:>9.1f} "
              f"{r['cpu']:>7.2f} {r['tokens'] / r['cpu']:>12.1f} {r['peak_mb']:>12.0f}")
    print("\nratios, goals from issue #12 (tokens/s; tokens per CPU-second beside it, which a "
          "machine shared with other work disturbs less):")
    for other, goal in (("one_book", 0.8), ("swap", 3.0), ("peft", 2.0)):
        if other not in results:
            continue
        mine, theirs = results["mixed"], results[other]
        ratio = (mine["tokens"] / mine["seconds"]) / (theirs["tokens"] / theirs["seconds"])
        per_cpu = (mine["tokens"] / mine["cpu"]) / (theirs["tokens"] / theirs["cpu"])
        print(f"  mixed / {other:<8} {ratio:6.2f}x  per CPU-s {per_cpu:6.2f}x  (goal ≥ {goal}x: "
              f"{'met' if ratio >= goal else 'NOT met'})")
    for path in ("mixed", "one_book", "mixed_many"):
        if path in results:
            r = results[path]
            print(f"{path}: time to first token p50 {r['ttft_p50'] * 1000:.0f} ms, p99 "
                  f"{r['ttft_p99'] * 1000:.0f} ms; per token p50 {r['tpot_p50'] * 1000:.1f} ms, "
                  f"p99 {r['tpot_p99'] * 1000:.1f} ms")
    mixed = results["mixed"]["answers"]
    for other in ("swap", "peft", "mixed_many"):
        if other in results:
            pairs = list(zip(mixed, results[other]["answers"]))
            same = sum(a == b for a, b in pairs)
            # how far the answers agree before they part (one flipped argmax changes the rest)
            agree = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                     for a, b in pairs]
            print(f"greedy answers of mixed identical to {other}: {same}/{len(mixed)}; tokens "
                  f"agreeing before the first difference: median {statistics.median(agree)}, "
                  f"min {min(agree)} (dtype {results['mixed']['dtype']})")
            margins = results[other].get("margins")
            parted = [(row, at) for row, (at, (a, b)) in enumerate(zip(agree, pairs)) if a != b]
            if margins and parted:
                every = sorted(m for row in margins for m in row)
                at_parting = sorted(margins[row][at] for row, at in parted if at < len(margins[row]))
                print(f"  {other}'s margin of its pick over the runner-up where the answers part: "
                      f"max {max(at_parting):.2e}, median {statistics.median(at_parting):.2e}; "
                      f"over all its steps: median {statistics.median(every):.2e}, 1st "
                      f"percentile {every[len(every) // 100]:.2e}")
    if "mixed_many" in results:
        print(f"peak memory with {len(plan['books'])} pocket books attached "
              f"{results['mixed']['peak_mb']:.0f} MB, with {args.attached} attached "
              f"{results['mixed_many']['peak_mb']:.0f} MB (base alone "
              f"{results['mixed']['base_mb']:.0f} MB)")


# -- the children: one path each ------------------------------------------------------------------

def _load(plan: dict[str, Any]) -> Any:
    import torch

    from adapterkit.base.load import load_base

    torch.set_grad_enabled(False)
    dtype = plan.get("dtype", "auto")
    return load_base(plan["base"], home=plan["home"],
                     dtype=None if dtype == "auto" else getattr(torch, dtype))


def _engine_run(plan: dict[str, Any], assign: list[str], preload: list[str] = ()) -> dict:
    from adapterkit.library.store import Library
    from adapterkit.serving.engine import Engine

    base = _load(plan)
    base_mb = _peak_mb()

    def warm_engine() -> Any:
        engine = Engine(base, Library(plan["home"]), max_batch=plan["max_batch"],
                        max_attached=max(len(preload), len(plan["books"]), 1),
                        max_queue=len(plan["prompts"]))
        engine.preload(list(preload))
        warm = engine.submit(plan["prompts"][0], engine.resolve(assign[0]), max_tokens=2)
        while engine.step():  # warm-up: first-call costs out of the timing
            pass
        assert warm.finish is not None
        return engine

    if plan.get("profile"):  # on an engine of its own, closed before the timed one is built:
        # the timed load still attaches its pocket books on first use, as without --profile
        engine = warm_engine()
        try:
            _profile(engine, plan, [engine.resolve(name) for name in assign],
                     "one_book" if len(set(assign)) == 1 else "mixed")
        finally:
            engine.close()
        import torch

        if torch.cuda.is_available():  # the timed engine's GPU peak is its own (a CPU's
            torch.cuda.reset_peak_memory_stats()  # peak RSS cannot be reset: it includes it)
    engine = warm_engine()
    targets = [engine.resolve(name) for name in assign]
    engine.start()

    def load() -> tuple[list[Any], list[list[int]]]:
        requests = [engine.submit(ids, target, max_tokens=plan["new_tokens"],
                                  ignore_eos=bool(plan.get("ignore_eos")))
                    for ids, target in zip(plan["prompts"], targets)]
        return requests, [_drain(r) for r in requests]

    (requests, answers), seconds, cpu = _timed(load, plan["rounds"], lambda out: out[1])
    engine.close()
    ttft = sorted(r.first_token_at - r.submitted for r in requests if r.first_token_at)
    tpot = sorted((r.finished_at - r.first_token_at) / (r.completion_tokens - 1)
                  for r in requests if r.completion_tokens > 1)
    return {"tokens": sum(len(a) for a in answers), "seconds": seconds, "cpu": cpu,
            "answers": answers, "ttft_p50": _pct(ttft, 50), "ttft_p99": _pct(ttft, 99),
            "tpot_p50": _pct(tpot, 50), "tpot_p99": _pct(tpot, 99), "base_mb": base_mb,
            **_where(base)}


def _profile(engine: Any, plan: dict[str, Any], targets: list[Any], label: str) -> None:
    """The engine's decode steps on the load's requests under torch.profiler, stepped by hand
    (its thread not started yet): the prefill and one decode step first, unprofiled; the
    operator table, sorted by the device's time where there is one, appended to the file."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    requests = [engine.submit(ids, target, max_tokens=plan["profile_steps"] + 4,
                              ignore_eos=True) for ids, target in zip(plan["prompts"], targets)]
    engine.step()
    engine.step()
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(plan["profile_steps"]):
            engine.step()
        if cuda:
            torch.cuda.synchronize()
    while any(r.finish is None for r in requests):
        engine.step()
    table = prof.key_averages().table(
        sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=30)
    with open(plan["profile"], "a", encoding="utf-8") as out:
        out.write(f"== {label}, {_where(engine.base)['dtype']}, {len(requests)} requests, "
                  f"{plan['profile_steps']} decode steps\n{table}\n")


def _mixed(plan: dict[str, Any]) -> dict:
    return _engine_run(plan, plan["assign"])


def _one_book(plan: dict[str, Any]) -> dict:
    return _engine_run(plan, [plan["books"][0]] * len(plan["prompts"]))


def _mixed_many(plan: dict[str, Any]) -> dict:
    return _engine_run(plan, plan["assign"], preload=plan["all_books"][:plan["attached"]])


def _swap(plan: dict[str, Any]) -> dict:
    """One request at a time, a session swap before each: greedy ``generate`` on the model."""
    import torch

    from adapterkit.library.store import Library
    from adapterkit.runtime.session import Session

    base = _load(plan)
    session = Session(base, Library(plan["home"]))
    eos = base.model.generation_config.eos_token_id
    _past_eos(base.model, plan)
    for name in plan["books"]:  # attached up front: the swaps are in place, no file reads
        session.attach(name)

    def answer(ids: list[int], name: str, new: int) -> list[int]:
        session.swap(name)
        out = session.model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(
            1, len(ids), dtype=torch.long), max_new_tokens=new, do_sample=False,
            pad_token_id=base.tokenizer.pad_token_id)
        return _cut(out[0, len(ids):].tolist(), eos, plan)

    answer(plan["prompts"][0], plan["books"][0], 2)  # warm-up
    answers, seconds, cpu = _timed(lambda: [answer(ids, name, plan["new_tokens"]) for ids, name
                                            in zip(plan["prompts"], plan["assign"])],
                                   plan["rounds"])
    return {"tokens": sum(len(a) for a in answers), "seconds": seconds, "cpu": cpu,
            "answers": answers, **_where(base)}


def _peft(plan: dict[str, Any]) -> dict:
    """PEFT's mixed-adapter batches: ``generate(..., adapter_names=[...])``, left-padded."""
    import torch
    from peft import PeftModel

    from adapterkit.library.store import Library

    base = _load(plan)
    library = Library(plan["home"])
    folders = {name: library.get(name).path for name in plan["books"]}
    first = plan["books"][0]
    model = PeftModel.from_pretrained(base.model, str(folders[first]), adapter_name=first)
    for name in plan["books"][1:]:
        model.load_adapter(str(folders[name]), adapter_name=name)
    model.eval()
    tokenizer, eos = base.tokenizer, base.model.generation_config.eos_token_id
    _past_eos(base.model, plan)

    def batch(prompts: list[list[int]], names: list[str], new: int,
              margins: list[list[float]] | None = None) -> list[list[int]]:
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                             do_sample=False, adapter_names=names,
                             pad_token_id=tokenizer.pad_token_id,
                             output_scores=margins is not None,
                             return_dict_in_generate=margins is not None)
        if margins is None:
            return [_cut(row[width:].tolist(), eos, plan) for row in out]
        # each step's margin of the greedy pick over the runner-up: where another path picks
        # differently, a margin near 0 says round-off, not a wrong answer
        top2 = torch.stack(out.scores, 1).float().topk(2, dim=-1).values
        margins.extend((top2[..., 0] - top2[..., 1]).tolist())
        return [_cut(row[width:].tolist(), eos, plan) for row in out.sequences]

    batch(plan["prompts"][:2], plan["assign"][:2], 2)  # warm-up
    size = plan["max_batch"]

    def load(margins: list[list[float]] | None = None) -> list[list[int]]:
        answers = []
        for i in range(0, len(plan["prompts"]), size):
            answers += batch(plan["prompts"][i:i + size], plan["assign"][i:i + size],
                             plan["new_tokens"], margins)
        return answers

    answers, seconds, cpu = _timed(load, plan["rounds"])
    margins: list[list[float]] = []  # once more, untimed, keeping every step's scores
    assert load(margins) == answers, "the scored run answered differently"
    return {"tokens": sum(len(a) for a in answers), "seconds": seconds, "cpu": cpu,
            "answers": answers, "margins": margins, **_where(base)}


CHILDREN = {"mixed": _mixed, "one_book": _one_book, "swap": _swap, "peft": _peft,
            "mixed_many": _mixed_many}


# -- small helpers ------------------------------------------------------------------------------

def _timed(load: Any, rounds: int, answers_of: Any = None) -> tuple[Any, float, float]:
    """``load()``'s first output, and the median wall and CPU (all threads) seconds over
    ``rounds`` runs; every round must give the same greedy answers."""
    outputs, walls, cpus = [], [], []
    for _ in range(rounds):
        start, cpu = time.perf_counter(), time.process_time()
        outputs.append(load())
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    pick = answers_of or (lambda out: out)
    assert all(pick(out) == pick(outputs[0]) for out in outputs), "rounds answered differently"
    return outputs[0], statistics.median(walls), statistics.median(cpus)


def _drain(request: Any) -> list[int]:
    tokens = []
    while True:
        event = request.events.get(timeout=600)
        if event.finish is not None:
            if event.finish == "error":
                raise RuntimeError(event.error)
            return tokens
        tokens.append(event.token)


def _past_eos(model: Any, plan: dict[str, Any]) -> None:
    """With the plan's ``ignore_eos``, ``generate`` runs to ``max_new_tokens`` as the engine's
    ``ignore_eos`` does: no end-of-sequence token in the model's own generation config (one
    set to None in a config passed to ``generate`` is filled back from it)."""
    if plan.get("ignore_eos"):
        model.generation_config.eos_token_id = None


def _cut(tokens: list[int], eos: Any, plan: dict[str, Any] | None = None) -> list[int]:
    """The answer up to (not including) the first end-of-sequence token, as the engine sends
    (all of it with the plan's ``ignore_eos``)."""
    if plan and plan.get("ignore_eos"):
        return tokens
    stops = set(eos if isinstance(eos, list) else [eos])
    for i, token in enumerate(tokens):
        if token in stops:
            return tokens[:i]
    return tokens


def _pct(values: list[float], q: int) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def _peak_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _where(base: Any) -> dict[str, Any]:
    import torch

    return {"peak_mb": _peak_mb(), "threads": torch.get_num_threads(),
            "device": str(next(base.model.parameters()).device),
            "dtype": str(next(base.model.parameters()).dtype).removeprefix("torch.")}


if __name__ == "__main__":
    main()
