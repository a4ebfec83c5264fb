"""Swapping, stacking and merging on one resident base, against PEFT in the same process.

On the embedded base (or --base), with LoRA r=8 on all linear layers (9.8 MB for SmolLM2-135M):

* swap between attached pocket books vs PEFT ``set_adapter`` (goal ≤ 0.03x, < 0.5 ms on CPU);
* swap to a pocket book from the library vs PEFT ``load_adapter`` + ``set_adapter`` (≤ 0.1x);
* swap latency with 1 and with 50 attached; memory released by ``detach``;
* logits after our swap vs PEFT's with the same adapter active;
* under ``torch.compile``: recompilations over swaps (goal 0), first-call latency after a swap;
* exact low-rank combine of 3 adapters vs PEFT ``add_weighted_adapter(..., "svd")`` at the same
  rank: time ratio (goal ≥ 10x faster) and max |ΔW difference|.

    python benchmarks/bench_swap.py [--base smollm2-135m] [--attached 50] [--no-compile]
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
from adapterkit import Library, merging  # noqa: E402
from adapterkit.plugin_api.manager import get_plugin_manager  # noqa: E402
from adapterkit.plugin_api.testing import make_peft_adapter  # noqa: E402


def timeit(fn, repeat: int = 20) -> float:
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--attached", type=int, default=50)
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        info = adapterkit.describe_base(args.base, os.environ.get("ADAPTERKIT_HOME"))
        folder = info["folder"]
        library = Library(home)
        print(f"making {args.attached} LoRA r=8 all-linear pocket books on {args.base}...")
        paths = []
        for i in range(args.attached):
            path = make_peft_adapter(folder, Path(tmp) / f"a{i}", seed=i, r=8,
                                     target_modules="all-linear")
            library.import_peft(path, f"book{i}", base=folder)
            paths.append(path)
        size = (paths[0] / "adapter_model.safetensors").stat().st_size / 2**20
        print(f"one pocket book: {size:.1f} MB")
        ids = torch.tensor([[1, 504, 3458, 314, 260, 1142, 282, 30]])

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
        del peft
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
        before = rss_mb()
        for k in range(7, args.attached):
            session.attach(f"book{k}")
        attached_mb = rss_mb() - before
        flip = iter(range(10**6))
        t_swap50 = timeit(lambda: session.swap(f"book{next(flip) % args.attached}"), repeat=200)
        before = rss_mb()
        session.off()
        for k in range(7, args.attached):
            session.detach(f"book{k}")
        gc.collect()
        freed = before - rss_mb()

        print(f"\n{'':46}{'ours':>12}{'PEFT':>12}{'ratio':>8}")
        print(f"{'swap between attached (ms)':46}{t_swap2 * 1e3:>12.4f}{t_set * 1e3:>12.3f}"
              f"{t_swap2 / t_set:>8.4f}")
        print(f"{'swap to a pocket book from the library (ms)':46}{t_first * 1e3:>12.2f}"
              f"{t_load * 1e3:>12.2f}{t_first / t_load:>8.3f}")
        print(f"swap latency: 2 attached {t_swap2 * 1e3:.4f} ms, {args.attached} attached "
              f"{t_swap50 * 1e3:.4f} ms")
        print(f"memory: {args.attached - 7} more attached +{attached_mb:.0f} MB, detached "
              f"-{freed:.0f} MB")
        print(f"max |logits ours - PEFT| with the same adapter active: {max_diff:.2e}")

        # -- exact combine vs PEFT svd --------------------------------------------------------
        pm = get_plugin_manager(env=False)
        start = time.perf_counter()
        exact = merging.merge(library, ["book0", "book1", "book2"], [1.0, 0.5, 0.25],
                              method="exact_svd", name="exact", rank=8, plugins=pm)
        t_exact = time.perf_counter() - start
        base_model = AutoModelForCausalLM.from_pretrained(folder)
        peft = PeftModel.from_pretrained(base_model, str(library.get("book0").path),
                                         adapter_name="m0")
        for k in (1, 2):
            peft.load_adapter(str(library.get(f"book{k}").path), adapter_name=f"m{k}")
        start = time.perf_counter()
        peft.add_weighted_adapter(["m0", "m1", "m2"], [1.0, 0.5, 0.25], "svd8",
                                  combination_type="svd", svd_rank=8)
        t_svd = time.perf_counter() - start
        del peft
        svd = merging.merge(library, ["book0", "book1", "book2"], [1.0, 0.5, 0.25],
                            method="svd", name="peftsvd", rank=8, plugins=pm,
                            load_base=lambda: AutoModelForCausalLM.from_pretrained(folder))
        worst = 0.0
        from safetensors.torch import load_file

        def deltas(book):
            pairs = merging.lora_pairs(load_file(book.path / "adapter_model.safetensors"))
            return {k: v["B"].double() @ v["A"].double() for k, v in pairs.items()}

        de, ds = deltas(exact), deltas(svd)
        for key in de:
            worst = max(worst, (de[key] - ds[key]).abs().max().item())
        scale = max(v.abs().max().item() for v in ds.values())
        print(f"\nexact_svd of 3 adapters at rank 8: {t_exact:.3f} s (reading the files "
              f"included); PEFT add_weighted_adapter svd alone: {t_svd:.2f} s → "
              f"{t_svd / t_exact:.1f}x faster; max |ΔW difference| {worst:.2e} "
              f"(max |ΔW| {scale:.2e})")

        # -- torch.compile --------------------------------------------------------------------
        if not args.no_compile:
            from torch import _dynamo

            _dynamo.reset()
            compiled = torch.compile(session.model, dynamic=False)
            session.swap("book0")
            start = time.perf_counter()
            compiled(input_ids=ids)
            t_compile = time.perf_counter() - start
            recompiles = 0
            latencies = []
            with _dynamo.config.patch(error_on_recompile=True):
                for k in (1, 2, 0, 3):
                    session.swap(f"book{k}")
                    start = time.perf_counter()
                    out = compiled(input_ids=ids).logits
                    latencies.append(time.perf_counter() - start)
                    # inductor fuses differently from eager: float32 round-off only
                    torch.testing.assert_close(out, session.model(input_ids=ids).logits,
                                               rtol=1e-3, atol=2e-3)
            eager = timeit(lambda: session.model(input_ids=ids), repeat=5)
            print(f"\ntorch.compile: first compile {t_compile:.1f} s; recompilations over 4 swaps: "
                  f"{recompiles}; first call after a swap {statistics.median(latencies) * 1e3:.1f} "
                  f"ms (eager {eager * 1e3:.1f} ms)")
        print(f"\npeak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
