"""Swapping, stacking and merging on one resident base, against PEFT in the same process.

On the embedded base (or --base; ``--base tiny`` builds a tiny random one, for a quick run),
with pocket books of mixed LoRA ranks (--ranks, default 4, 8, 16 and 64 in turn) on all linear
layers, every figure measured in this run:

* swap between 2 attached pocket books vs PEFT ``set_adapter`` (goal ≤ 0.03x, < 0.5 ms on CPU);
* swap to a pocket book from the library vs PEFT ``load_adapter`` + ``set_adapter`` (≤ 0.1x);
* swap latency with 2 and with --attached attached; memory attached and released by ``detach``;
* the cost of padding to one rank per session: a forward pass with the smallest-rank pocket
  book in the mixed session (padded to the largest rank) vs a session holding only that rank,
  and the memory attached against the size of the adapter files;
* logits after our swap (padded) vs PEFT's with the same adapter active;
* under ``torch.compile``: graphs compiled over swaps between pocket books of different ranks
  (counted with torch._dynamo's counters; goal 0), first-call latency after a swap;
* exact low-rank combine of 3 adapters vs PEFT ``add_weighted_adapter(..., "svd")`` at the same
  rank: time ratio (goal ≥ 10x faster) and max |ΔW difference| (ΔW as PEFT computes it).

    python benchmarks/bench_swap.py [--base smollm2-135m|tiny] [--attached 50]
                                    [--ranks 4,8,16,64] [--no-compile]
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import adapterkit  # noqa: E402
from adapterkit import Library  # noqa: E402
from adapterkit.lora.combine import merge  # noqa: E402
from adapterkit.plugin_api.manager import get_plugin_manager  # noqa: E402
from adapterkit.plugin_api.testing import make_peft_adapter, make_tiny_base  # noqa: E402


def timeit(fn, repeat: int = 20) -> float:
    """Median seconds of ``fn()`` over ``repeat`` runs, after one untimed warm-up run."""
    fn()
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled so far in this process (torch._dynamo's counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def token_ids(vocab_size: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab_size, (1, length),
                         generator=torch.Generator().manual_seed(seed))


def main() -> None:
    grad = torch.is_grad_enabled()
    try:
        _main()
    finally:  # inference only, and leave the caller's autograd mode as it was
        torch.set_grad_enabled(grad)


def _main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--base", default="smollm2-135m", help="a base, or tiny (a tiny random one)")
    p.add_argument("--attached", type=int, default=50)
    p.add_argument("--ranks", default="4,8,16,64",
                   help="LoRA ranks given to the pocket books in turn (book i: rank i mod n)")
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    if args.attached < 7 + len(ranks):
        p.error(f"--attached must be at least {7 + len(ranks)}: 7 are swapped in one by one "
                "first, and the rest must hold every rank")
    torch.set_grad_enabled(False)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        spec = str(make_tiny_base(Path(tmp) / "tiny")) if args.base == "tiny" else args.base
        info = adapterkit.describe_base(spec, os.environ.get("ADAPTERKIT_HOME"))
        folder = info["folder"]
        library = Library(home)
        rank_of = [ranks[i % len(ranks)] for i in range(args.attached)]
        print(f"making {args.attached} LoRA all-linear pocket books of ranks "
              f"{'/'.join(map(str, ranks))} on {args.base}...")
        paths = []
        for i in range(args.attached):
            path = make_peft_adapter(folder, Path(tmp) / f"a{i}", seed=i, r=rank_of[i],
                                     target_modules="all-linear")
            library.import_peft(path, f"book{i}", base=folder)
            paths.append(path)
        file_mb = [(path / "adapter_model.safetensors").stat().st_size / 2**20 for path in paths]
        print("one pocket book: " + ", ".join(f"{file_mb[i]:.2f} MB at r={rank_of[i]}"
                                              for i in range(len(ranks))))
        ids = token_ids(info["vocab_size"], 8)
        long_ids = token_ids(info["vocab_size"], 128, seed=1)

        # -- PEFT ----------------------------------------------------------------------------
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), paths[0],
                                         adapter_name="a0").eval()
        peft.load_adapter(paths[1], adapter_name="a1")
        flip = iter(range(10**6))
        t_set = timeit(lambda: peft.set_adapter(f"a{next(flip) % 2}"))
        n_load = iter(range(2, 2 + 10))
        load_times = []
        for _ in range(5):
            k = next(n_load)
            start = time.perf_counter()
            peft.load_adapter(paths[k], adapter_name=f"a{k}")
            peft.set_adapter(f"a{k}")
            load_times.append(time.perf_counter() - start)
        t_load = statistics.median(load_times)
        peft.set_adapter("a1")
        peft_logits = peft(input_ids=ids).logits
        peft = None  # free it
        gc.collect()

        # -- adapterkit ----------------------------------------------------------------------
        session = adapterkit.open(folder, home=home)
        session.attach("book0")
        session.attach("book1")
        flip = iter(range(10**6))
        t_swap2 = timeit(lambda: session.swap(f"book{next(flip) % 2}"), repeat=200)
        first = []
        for k in range(2, 7):
            start = time.perf_counter()
            session.swap(f"book{k}")
            first.append(time.perf_counter() - start)
        t_first = statistics.median(first)
        session.swap("book1")
        ours = session.model(input_ids=ids).logits
        max_diff = (ours - peft_logits).abs().max().item()
        rank_at_check = session.rank
        before = rss_mb()
        for k in range(7, args.attached):
            session.attach(f"book{k}")
        attached_mb = rss_mb() - before
        flip = iter(range(10**6))
        t_swap_all = timeit(lambda: session.swap(f"book{next(flip) % args.attached}"),
                            repeat=200)

        # -- padding: every pocket book is held at the session's largest rank ----------------
        smallest = rank_of.index(min(ranks))
        session.swap(f"book{smallest}")
        t_padded = {n: timeit(lambda x=x: session.model(input_ids=x), repeat=10)
                    for n, x in (("8", ids), ("128", long_ids))}
        padded_logits = session.model(input_ids=long_ids).logits
        alone = adapterkit.open(folder, home=home)  # a second base, holding only that rank
        alone.swap(f"book{smallest}")
        t_alone = {n: timeit(lambda x=x: alone.model(input_ids=x), repeat=10)
                   for n, x in (("8", ids), ("128", long_ids))}
        pad_diff = (alone.model(input_ids=long_ids).logits - padded_logits).abs().max().item()
        pad_scale = padded_logits.abs().max().item()
        session_rank, alone_rank = session.rank, alone.rank
        alone.close()
        alone = None  # free its base
        gc.collect()

        before = rss_mb()
        session.off()
        for k in range(7, args.attached):
            session.detach(f"book{k}")
        gc.collect()
        freed = before - rss_mb()

        print(f"\n{'':46}{'ours':>12}{'PEFT':>12}{'ratio':>8}")
        print(f"{'swap between 2 attached (ms)':46}{t_swap2 * 1e3:>12.4f}{t_set * 1e3:>12.3f}"
              f"{t_swap2 / t_set:>8.4f}")
        print(f"{'swap to a pocket book from the library (ms)':46}{t_first * 1e3:>12.2f}"
              f"{t_load * 1e3:>12.2f}{t_first / t_load:>8.3f}")
        print(f"swap latency: 2 attached {t_swap2 * 1e3:.4f} ms, {args.attached} attached "
              f"{t_swap_all * 1e3:.4f} ms")
        print(f"memory: {args.attached - 7} more attached +{attached_mb:.0f} MB "
              f"({sum(file_mb[7:]):.0f} MB of adapter files at their own ranks), detached "
              f"-{freed:.0f} MB")
        print(f"padding: a forward with the r={min(ranks)} pocket book padded to r={session_rank} "
              f"vs in a session of r={alone_rank}: "
              + ", ".join(f"{n} tokens {t_padded[n] * 1e3:.2f} vs {t_alone[n] * 1e3:.2f} ms "
                          f"({t_padded[n] / t_alone[n]:.2f}x)" for n in t_padded)
              + f"; max |logits difference| {pad_diff:.2e} (of max |logits| {pad_scale:.2e})")
        print(f"max |logits ours - PEFT| with the same adapter active (r={rank_of[1]}, padded "
              f"to r={rank_at_check}): {max_diff:.2e}")

        # -- exact combine vs PEFT svd --------------------------------------------------------
        pm = get_plugin_manager(env=False)
        merge_rank = max(rank_of[:3])
        start = time.perf_counter()
        exact = merge(library, ["book0", "book1", "book2"], [1.0, 0.5, 0.25],
                      method="exact_svd", name="exact", rank=merge_rank, plugins=pm)
        t_exact = time.perf_counter() - start
        base_model = AutoModelForCausalLM.from_pretrained(folder)
        peft = PeftModel.from_pretrained(base_model, str(library.get("book0").path),
                                         adapter_name="m0")
        for k in (1, 2):
            peft.load_adapter(str(library.get(f"book{k}").path), adapter_name=f"m{k}")
        start = time.perf_counter()
        peft.add_weighted_adapter(["m0", "m1", "m2"], [1.0, 0.5, 0.25], "svd",
                                  combination_type="svd", svd_rank=merge_rank)
        t_svd = time.perf_counter() - start
        peft = None  # free it
        svd = merge(library, ["book0", "book1", "book2"], [1.0, 0.5, 0.25],
                    method="svd", name="peftsvd", rank=merge_rank, plugins=pm,
                    load_base=lambda: AutoModelForCausalLM.from_pretrained(folder))
        worst = 0.0

        def deltas(book):
            """ΔW of every LoRA layer as PEFT itself computes it (its own scales)."""
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder),
                                              str(book.path))
            return {name: module.get_delta_weight("default").double()
                    for name, module in model.named_modules()
                    if hasattr(module, "get_delta_weight") and "default" in
                    getattr(module, "lora_A", {})}

        de, ds = deltas(exact), deltas(svd)
        for key in de:
            worst = max(worst, (de[key] - ds[key]).abs().max().item())
        scale = max(v.abs().max().item() for v in ds.values())
        print(f"\nexact_svd of 3 adapters (r={'/'.join(map(str, rank_of[:3]))}) at rank "
              f"{merge_rank}: {t_exact:.3f} s (reading the files "
              f"included); PEFT add_weighted_adapter svd alone: {t_svd:.2f} s → "
              f"{t_svd / t_exact:.1f}x faster; max |ΔW difference| {worst:.2e} "
              f"(max |ΔW| {scale:.2e})")

        # -- torch.compile --------------------------------------------------------------------
        if not args.no_compile:
            from torch import _dynamo

            _dynamo.reset()
            compiled = torch.compile(session.model, dynamic=False)
            session.swap("book0")
            graphs = compiled_graphs()
            start = time.perf_counter()
            compiled(input_ids=ids)
            t_compile = time.perf_counter() - start
            first_graphs = compiled_graphs() - graphs
            order = [1, 2, 0, 3, *range(4, min(len(ranks), 7))]  # each rank, in turn
            latencies = []
            graphs = compiled_graphs()
            for k in order:
                session.swap(f"book{k}")
                start = time.perf_counter()
                out = compiled(input_ids=ids).logits
                latencies.append(time.perf_counter() - start)
                # inductor fuses differently from eager: float32 round-off only
                torch.testing.assert_close(out, session.model(input_ids=ids).logits,
                                           rtol=1e-3, atol=2e-3)
            recompiled = compiled_graphs() - graphs
            eager = timeit(lambda: session.model(input_ids=ids), repeat=5)
            print(f"\ntorch.compile: first compile {t_compile:.1f} s ({first_graphs} graphs); "
                  f"graphs compiled over {len(order)} swaps between ranks "
                  f"{'/'.join(str(rank_of[k]) for k in order)}: {recompiled} (torch._dynamo "
                  f"counters); first call after a swap {statistics.median(latencies) * 1e3:.1f} "
                  f"ms (eager {eager * 1e3:.1f} ms)")
        print(f"\npeak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
