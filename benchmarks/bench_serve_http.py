"""`adapterkit serve` over HTTP against its peers, one run, on the embedded base.

The figures issue #12 asks for, measured on loopback with the official ``openai`` client
(``AsyncOpenAI``, streaming chat completions, greedy: ``temperature=0``): --streams concurrent
streams of --new-tokens new tokens each, short chat prompts (the triage complaints of
``examples/data/triage_test.jsonl``), over --books random LoRA pocket books (rank --rank on
q/k/v/o/gate/up/down, B non-zero) imported into a temporary adapterkit home. No training.

Every compared path runs in this one run:

* server A — ``adapterkit serve`` (a subprocess: the real CLI, uvicorn, the engine), no
  preload; the three loads below run interleaved, --rounds times each, summed:
  ``mixed`` (request i on pocket book i mod --books), ``one_book`` (every request on the first
  pocket book), ``base`` (every request on the plain base);
* server B — ``adapterkit serve --max-attached --attached --preload`` all --attached pocket
  books: ``mixed_wide``, request i on pocket book i (as many different books in one batch as
  there are streams), for the peak memory with --attached attached;
* ``swap`` — one request at a time with a ``Session.swap`` before each (what a session alone
  can do), in-process, no HTTP (``bench_serve.py``'s child);
* ``peft`` — PEFT's own mixed-adapter batches, ``generate(..., adapter_names=[...])`` on the
  same prompts and books, batches of --max-batch (``bench_serve.py``'s child);
* ``tf_serve`` — ``transformers serve`` (transformers' own OpenAI server, no LoRA) on the plain
  base (the folder adapterkit converted the GGUF into), with ``--continuous-batching`` (its
  batching engine; ``--tf-modes`` adds ``sequential``, its default one-generate-at-a-time
  mode), the same load as ``base``.

They run in this order: server A, transformers serve (right after A, so its load meets the
machine as A's did), server B, swap, peft.

tokens/s counts the completion tokens the servers report (``usage``); the server processes'
CPU seconds (from /proc) give tokens per CPU-second beside it, which other work on a shared
machine disturbs less. Time to first token is from sending the request to the first content
chunk; per-token latency is (last chunk - first chunk) / (tokens - 1) per stream. Peak memory is
each process's peak RSS (VmHWM). Greedy answers are compared as text (the servers stream text;
the in-process paths' tokens are decoded with ``skip_special_tokens=True`` as the server does).

    python benchmarks/bench_serve_http.py [--base smollm2-135m] [--streams 32] [--books 8]
        [--new-tokens 64] [--attached 50] [--rank 16] [--rounds 3]
        [--tf-modes cb[,sequential]] [--out benchmarks/results/serve_embedded.md]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import bench_serve  # noqa: E402  (its swap and peft children, same plan format)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ENV = dict(os.environ, TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false",
           HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--streams", type=int, default=32, help="concurrent requests per load")
    p.add_argument("--books", type=int, default=8, help="pocket books the mixed load spreads over")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--attached", type=int, default=50, help="pocket books attached on server B")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3, help="rounds of server A's three loads")
    p.add_argument("--max-batch", type=int, default=0, help="server batch (default: --streams)")
    p.add_argument("--swap-requests", type=int, default=0,
                   help="requests the swap path answers (the first N, one at a time; its "
                        "tokens/s does not depend on N; default: all --streams)")
    p.add_argument("--tf-modes", default="cb", help="transformers serve modes: cb,sequential")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of every process (OMP_NUM_THREADS); on a 2-core machine "
                        "shared with other jobs, 2 spinning OpenMP threads run several times "
                        "slower than 1")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="pocket-book loads (mixed, one_book, mixed_wide, swap, peft) decode "
                        "--new-tokens tokens each, past end-of-sequence (vLLM's ignore_eos, "
                        "as its benchmarks do), so every path does the same work; the plain "
                        "base loads (base, transformers serve, which has no such option) stop "
                        "at end-of-sequence")
    p.add_argument("--skip", default="", help="paths to leave out (e.g. swap,peft), for trials")
    p.add_argument("--out", default=str(HERE / "results" / "serve_embedded.md"))
    args = p.parse_args()
    args.max_batch = args.max_batch or args.streams
    os.environ["OMP_NUM_THREADS"] = ENV["OMP_NUM_THREADS"] = str(args.threads)  # before torch
    skip = {s for s in args.skip.split(",") if s}
    started = time.perf_counter()
    load_before = os.getloadavg()
    results: dict[str, Any] = {}
    memory: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-serve-http-") as tmp_name:
        tmp = Path(tmp_name)
        plan = _prepare(args, tmp)
        prompts = plan["texts"]
        books = plan["books"]
        print(f"[{_t(started)}] server A (adapterkit serve, no preload)...", flush=True)
        with Server(_adapterkit_cmd(plan, args.max_batch, max(args.books, 1)), tmp, "A") as a:
            memory["base_idle"] = a.rss_mb()
            base_id = a.model_ids()[0]
            loads = {"mixed": [books[i % args.books] for i in range(args.streams)],
                     "one_book": [books[0]] * args.streams,
                     "base": [base_id] * args.streams}
            past_eos = {"mixed": args.ignore_eos, "one_book": args.ignore_eos, "base": False}
            _warm(a.url, prompts, books[:args.books] + [base_id])
            memory["books8_idle"] = a.rss_mb()
            runs: dict[str, list[dict]] = {k: [] for k in loads}
            for r in range(args.rounds):
                order = list(loads) if r % 2 == 0 else list(loads)[::-1]
                for name in order:
                    print(f"[{_t(started)}] A round {r + 1}: {name}", flush=True)
                    runs[name].append(_http_load(a, prompts, loads[name], args.new_tokens,
                                                 past_eos[name]))
            for name, rs in runs.items():
                results[name] = _pooled(rs)
            memory["books8_peak"] = a.peak_mb()
        for mode in [m for m in args.tf_modes.split(",") if m]:
            if "tf_serve" in skip:
                break
            print(f"[{_t(started)}] transformers serve ({mode})...", flush=True)
            with Server(_tf_cmd(plan, mode), tmp, f"tf-{mode}", health="/health") as tf:
                model = plan["base"]
                _warm(tf.url, prompts, [model])
                results[f"tf_serve_{mode}"] = _http_load(tf, prompts, [model] * args.streams,
                                                         args.new_tokens)
                memory[f"tf_{mode}_peak"] = tf.peak_mb()
        if "wide" not in skip and args.attached > 0:
            print(f"[{_t(started)}] server B (--preload {args.attached} pocket books)...",
                  flush=True)
            wide = plan["all_books"][:args.attached]
            with Server(_adapterkit_cmd(plan, args.max_batch, args.attached, wide), tmp,
                        "B") as b:
                memory["booksN_idle"] = b.rss_mb()
                assign = [wide[i % len(wide)] for i in range(args.streams)]
                _warm(b.url, prompts, [wide[0]])
                print(f"[{_t(started)}] B: mixed_wide", flush=True)
                results["mixed_wide"] = _http_load(b, prompts, assign, args.new_tokens,
                                                   args.ignore_eos)
                memory["booksN_peak"] = b.peak_mb()
        for child in ("swap", "peft"):
            if child in skip:
                continue
            n = args.swap_requests if child == "swap" and args.swap_requests else args.streams
            plan_file = tmp / f"plan-{child}.json"
            plan_file.write_text(json.dumps({**plan, "prompts": plan["prompts"][:n],
                                             "assign": plan["assign"][:n],
                                             "ignore_eos": args.ignore_eos}))
            print(f"[{_t(started)}] {child} ({n} requests; in-process child of bench_serve.py)"
                  "...", flush=True)
            r = bench_serve._child(child, plan_file)
            r["texts"] = [plan_decode(plan, a) for a in r["answers"]]
            r["server_cpu"] = r["cpu"]
            results[child] = r
    total = time.perf_counter() - started
    text = _report(args, plan, results, memory, total, load_before, os.getloadavg())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print("\n" + text)
    print(f"written to {out}")


# -- preparing: base, pocket books, prompts -------------------------------------------------------

def _prepare(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapterkit.base.resolve import resolve_base
    from adapterkit.library.store import Library
    from adapterkit.runtime.generation import render_prompt, uses_chat

    home = tmp / "home"
    t0 = time.perf_counter()
    folder = resolve_base(args.base, home).folder
    print(f"base {args.base} resolved to {folder} in {time.perf_counter() - t0:.0f} s",
          flush=True)
    count = max(args.books, args.attached)
    t0 = time.perf_counter()
    library = Library(home)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(folder),
                           LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                      target_modules=TARGETS, task_type="CAUSAL_LM"))
    names = []
    for i in range(count):
        torch.manual_seed(100 + i)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_A" in name:
                    param.normal_(std=0.2)
                elif "lora_B" in name:
                    param.normal_(std=0.02)
        out = tmp / "peft" / f"book{i}"
        model.save_pretrained(str(out))
        library.import_peft(out, f"book{i}", base=str(folder))
        names.append(f"book{i}")
    del model
    print(f"{count} pocket books (LoRA r={args.rank} on {'/'.join(TARGETS)}) imported in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    rows = [json.loads(line) for line in
            (HERE.parent / "examples" / "data" / "triage_test.jsonl").read_text().splitlines()
            if line.strip()]
    texts = [rows[i % len(rows)]["prompt"] for i in range(args.streams)]
    global _TOKENIZER
    tokenizer = _TOKENIZER = AutoTokenizer.from_pretrained(folder)
    chat = uses_chat(tokenizer, None)
    ids = [tokenizer(render_prompt(tokenizer, t, chat=chat), add_special_tokens=not chat)[
        "input_ids"] for t in texts]
    # the plan bench_serve.py's children read (swap, peft), plus what this script needs
    return {"home": str(home), "base": str(folder), "books": names[:args.books],
            "all_books": names, "prompts": ids, "texts": texts, "new_tokens": args.new_tokens,
            "max_batch": args.max_batch, "attached": args.attached, "rounds": 1,
            "assign": [names[i % args.books] for i in range(args.streams)]}


_TOKENIZER: Any = None


def plan_decode(plan: dict[str, Any], ids: list[int]) -> str:
    global _TOKENIZER
    if _TOKENIZER is None:
        from transformers import AutoTokenizer
        _TOKENIZER = AutoTokenizer.from_pretrained(plan["base"])
    return _TOKENIZER.decode(ids, skip_special_tokens=True)


# -- servers --------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _adapterkit_cmd(plan: dict[str, Any], max_batch: int, max_attached: int,
                    preload: list[str] | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "adapterkit", "--home", plan["home"], "serve", "--base",
           plan["base"], "--host", "127.0.0.1", "--port", "{port}", "--max-batch",
           str(max_batch), "--max-attached", str(max_attached), "--max-queue", "1024"]
    return cmd + (["--preload", ",".join(preload)] if preload else [])


def _tf_cmd(plan: dict[str, Any], mode: str) -> list[str]:
    exe = Path(sys.executable).parent / "transformers"
    cmd = [str(exe), "serve", plan["base"], "--device", "cpu", "--host", "127.0.0.1",
           "--port", "{port}", "--log-level", "warning"]
    if mode == "cb":
        cmd.append("--continuous-batching")
    elif mode != "sequential":
        sys.exit(f"--tf-modes: unknown mode {mode} (cb, sequential)")
    return cmd


class Server:
    """A server subprocess on a free loopback port; its RSS and CPU seconds from /proc."""

    def __init__(self, cmd: list[str], tmp: Path, tag: str, health: str = "/health") -> None:
        self.port = _free_port()
        self.cmd = [c.replace("{port}", str(self.port)) for c in cmd]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"server-{tag}.log"
        self.health = health
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Server:
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, stdout=self.log.open("wb"),
                                     stderr=subprocess.STDOUT, env=ENV)
        while True:
            if self.proc.poll() is not None:
                sys.exit(f"server failed to start: {shlex.join(self.cmd)}\n"
                         f"{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + self.health, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.perf_counter() - t0 > 300:
                self.proc.kill()
                sys.exit(f"server did not answer in 300 s: {self.log.read_text()[-3000:]}")
            time.sleep(0.5)
        print(f"  up in {time.perf_counter() - t0:.0f} s: {shlex.join(self.cmd)}", flush=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self.proc is not None
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def _status(self, key: str) -> float:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def rss_mb(self) -> float:
        return self._status("VmRSS")

    def peak_mb(self) -> float:
        return self._status("VmHWM")

    def cpu_s(self) -> float:
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def model_ids(self) -> list[str]:
        with urllib.request.urlopen(self.url + "/v1/models", timeout=10) as r:
            return [m["id"] for m in json.load(r)["data"]]


# -- the load generator ---------------------------------------------------------------------------

async def _stream(client: Any, text: str, model: str, new_tokens: int,
                  ignore_eos: bool) -> dict[str, Any]:
    sent = time.perf_counter()
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], max_tokens=new_tokens,
        temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True} if ignore_eos else None)
    first = last = None
    parts: list[str] = []
    usage = None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta and choice.delta.content:
                now = time.perf_counter()
                first = first or now
                last = now
                parts.append(choice.delta.content)
    return {"sent": sent, "first": first, "last": last, "text": "".join(parts),
            "tokens": usage.completion_tokens if usage else None}


async def _load_async(url: str, texts: list[str], models: list[str],
                      new_tokens: int, ignore_eos: bool = False) -> tuple[list[dict], float]:
    import httpx
    from openai import AsyncOpenAI

    limits = httpx.Limits(max_connections=len(texts) + 8, max_keepalive_connections=len(texts))
    async with AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=900,
                           http_client=httpx.AsyncClient(limits=limits, timeout=900)) as client:
        start = time.perf_counter()
        out = await asyncio.gather(*(_stream(client, t, m, new_tokens, ignore_eos)
                                     for t, m in zip(texts, models)))
        return list(out), time.perf_counter() - start


def _http_load(server: Server, texts: list[str], models: list[str], new_tokens: int,
               ignore_eos: bool = False) -> dict[str, Any]:
    cpu = server.cpu_s()
    streams, seconds = asyncio.run(_load_async(server.url, texts, models, new_tokens,
                                               ignore_eos))
    cpu = server.cpu_s() - cpu
    counted = [s["tokens"] for s in streams]
    if any(c is None for c in counted):  # no usage chunk: count the text's tokens
        counted = [len(_TOKENIZER_FOR_COUNT(s["text"])) for s in streams]
    ttft = sorted(s["first"] - s["sent"] for s in streams if s["first"])
    tpot = sorted((s["last"] - s["first"]) / (n - 1) for s, n in zip(streams, counted)
                  if s["first"] and n > 1)
    return {"tokens": sum(counted), "seconds": seconds, "server_cpu": cpu,
            "texts": [s["text"] for s in streams], "ttft": ttft, "tpot": tpot,
            "usage": all(s["tokens"] is not None for s in streams)}


def _TOKENIZER_FOR_COUNT(text: str) -> list[int]:
    return list(_TOKENIZER(text, add_special_tokens=False)["input_ids"])


def _warm(url: str, texts: list[str], models: list[str]) -> None:
    """One short request per model (attaches pocket books, first-call costs out of timing)."""
    asyncio.run(_load_async(url, texts[:len(models)], models, 2))


def _pooled(runs: list[dict]) -> dict[str, Any]:
    """The rounds of one load taken together: tokens, wall and CPU seconds summed (so tokens/s
    is total tokens over total seconds), latencies of every stream of every round; the greedy
    texts must be the same in every round."""
    for r in runs[1:]:
        if r["texts"] != runs[0]["texts"]:
            print("WARNING: rounds answered differently", flush=True)
    return {"tokens": sum(r["tokens"] for r in runs),
            "seconds": sum(r["seconds"] for r in runs),
            "server_cpu": sum(r["server_cpu"] for r in runs),
            "texts": runs[0]["texts"], "usage": all(r["usage"] for r in runs),
            "ttft": sorted(x for r in runs for x in r["ttft"]),
            "tpot": sorted(x for r in runs for x in r["tpot"]),
            "rates": [r["tokens"] / r["seconds"] for r in runs],
            "cpu_rates": [r["tokens"] / r["server_cpu"] for r in runs]}


# -- the report -----------------------------------------------------------------------------------

def _pct(values: list[float], q: int) -> float:
    return bench_serve._pct(sorted(values), q) if values else float("nan")


def _t(start: float) -> str:
    return f"{time.perf_counter() - start:5.0f}s"


def _report(args: argparse.Namespace, plan: dict[str, Any], results: dict[str, Any],
            memory: dict[str, float], total: float, load_before: tuple, load_after: tuple) -> str:
    import torch

    rate = {k: r["tokens"] / r["seconds"] for k, r in results.items()}
    per_cpu = {k: r["tokens"] / r["server_cpu"] for k, r in results.items()
               if r.get("server_cpu")}
    cmd = "python benchmarks/bench_serve_http.py " + shlex.join(sys.argv[1:])
    lines = [
        "# `adapterkit serve` on the embedded base: measured (issue #12)",
        "",
        f"Command: `{cmd.strip()}`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"CPU only (torch {torch.__version__}), float32, {args.threads} torch thread(s) in every "
        f"process (OMP_NUM_THREADS={args.threads}; the in-process children report "
        f"{sorted({r['threads'] for r in results.values() if 'threads' in r})}); "
        f"shared with other jobs (load average {load_before[0]:.1f} before, "
        f"{load_after[0]:.1f} after, on {os.cpu_count()} cores): absolute figures are "
        f"depressed and noisy, the ratios are taken in this one run. Whole run "
        f"{total:.0f} s.",
        "",
        f"Load: {args.streams} concurrent streaming chat completions (official `openai` client, "
        f"`AsyncOpenAI`, loopback), {args.new_tokens} new tokens max, `temperature=0`"
        + (f"; the pocket-book loads (mixed, one_book, mixed_wide, swap, peft) decode all "
           f"{args.new_tokens} tokens, past end-of-sequence (`ignore_eos`, vLLM's extension: the "
           f"same work on every path), the plain-base loads (base, transformers serve) stop at it"
           if args.ignore_eos else "; every load stops at end-of-sequence") + "; prompts: "
        f"triage complaints of examples/data/triage_test.jsonl; pocket books: random LoRA "
        f"r={args.rank} (alpha {2 * args.rank}) on {'/'.join(TARGETS)}, B non-zero, imported "
        f"into a temporary home. Server batch {args.max_batch}. Base {args.base} "
        f"(SmolLM2-135M-Instruct GGUF, converted to a safetensors folder by adapterkit).",
        "",
        "| path | what | tokens | seconds | tokens/s | server CPU s | tokens/CPU-s | "
        "TTFT p50 / p99 ms | per-token p50 / p99 ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    what = {
        "mixed": f"adapterkit serve, request i on book i mod {args.books}",
        "one_book": "adapterkit serve, every request on book0",
        "base": "adapterkit serve, plain base (no pocket book)",
        "mixed_wide": f"adapterkit serve, {args.attached} attached, request i on book i",
        "swap": f"one at a time, Session.swap + generate (in-process), first "
                f"{len(results['swap']['texts']) if 'swap' in results else 0} requests",
        "peft": f"PEFT generate(adapter_names=...), batches of {args.max_batch} (in-process)",
        "tf_serve_cb": "transformers serve --continuous-batching, plain base",
        "tf_serve_sequential": "transformers serve (default, sequential), plain base",
    }
    for k, r in results.items():
        lat = "—", "—"
        if "ttft" in r:
            lat = (f"{_pct(r['ttft'], 50) * 1e3:.0f} / {_pct(r['ttft'], 99) * 1e3:.0f}",
                   f"{_pct(r['tpot'], 50) * 1e3:.0f} / {_pct(r['tpot'], 99) * 1e3:.0f}")
        cpu = r.get("server_cpu")
        lines.append(f"| {k} | {what.get(k, k)} | {r['tokens']} | {r['seconds']:.1f} | "
                     f"{rate[k]:.1f} | {cpu:.1f} | {per_cpu.get(k, float('nan')):.1f} | "
                     f"{lat[0]} | {lat[1]} |")
    if args.rounds > 1:
        lines += ["", f"Server A's loads ran {args.rounds} rounds, interleaved (order reversed "
                  "every other round); their rows sum the rounds (tokens/s = all tokens / all "
                  "seconds; latency percentiles over every stream of every round). Per round, "
                  "tokens/s (tokens/CPU-s): " + "; ".join(
                      f"{k} " + ", ".join(f"{x:.1f} ({y:.1f})" for x, y in
                                         zip(results[k]["rates"], results[k]["cpu_rates"]))
                      for k in ("mixed", "one_book", "base") if k in results) + "."]
    if not all(r.get("usage", True) for r in results.values()):
        lines += ["", "Paths whose server sent no usage chunk: tokens counted by re-tokenizing "
                  "the streamed text: " + ", ".join(k for k, r in results.items()
                                                    if not r.get("usage", True)) + "."]
    lines += ["", "## Goals (issue #12)", "",
              "| ratio | tokens/s | tokens/CPU-s | goal | met |", "|---|---:|---:|---:|---|"]
    for mine, other, goal in (("mixed", "one_book", 0.8), ("mixed", "swap", 3.0),
                              ("mixed", "peft", 2.0), ("base", "tf_serve_cb", 1.0),
                              ("base", "tf_serve_sequential", 1.0),
                              ("mixed_wide", "mixed", None)):
        if mine in rate and other in rate:
            ratio = rate[mine] / rate[other]
            cpu_ratio = per_cpu[mine] / per_cpu[other] if other in per_cpu else float("nan")
            met = "—" if goal is None else ("yes" if ratio >= goal else "**no**")
            lines.append(f"| {mine} / {other} | {ratio:.3f}x | {cpu_ratio:.3f}x | "
                         f"{'—' if goal is None else f'≥ {goal}x'} | {met} |")
    lines += ["", "## Greedy answers identical (text)", ""]
    for mine, other in (("mixed", "swap"), ("mixed", "peft"), ("base", "tf_serve_cb"),
                        ("base", "tf_serve_sequential")):
        if mine in results and other in results:
            a, b = results[mine]["texts"], results[other]["texts"]
            a = a[:len(b)]
            same = sum(x == y for x, y in zip(a, b))
            first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
            note = "" if first is None else (
                f" (first difference, request {first}: {a[first][:60]!r} vs {b[first][:60]!r})")
            lines.append(f"- {mine} vs {other}: {same}/{len(a)}{note}")
    distinct = len(set(results["mixed"]["texts"])) if "mixed" in results else 0
    if distinct:
        lines.append(f"- distinct answers in the mixed load: {distinct} of "
                     f"{len(results['mixed']['texts'])}")
    empty = {k: sum(not t for t in r["texts"]) for k, r in results.items()}
    if any(empty.values()):
        lines.append("- empty answers (eos first): " + ", ".join(
            f"{k} {n}" for k, n in empty.items() if n))
    lines += ["", "## Peak memory (RSS of the serving process)", ""]
    label = {"base_idle": "server A, base loaded, idle, nothing attached",
             "books8_idle": f"server A, {args.books} pocket books attached, after the warm-up",
             "books8_peak": f"server A peak, {args.books} attached, after all its loads",
             "booksN_idle": f"server B, {args.attached} pocket books attached, idle",
             "booksN_peak": f"server B peak, {args.attached} attached, after its load",
             "tf_cb_peak": "transformers serve --continuous-batching peak",
             "tf_sequential_peak": "transformers serve (sequential) peak"}
    for k, v in memory.items():
        lines.append(f"- {label.get(k, k)}: {v:.0f} MB")
    for k in ("swap", "peft"):
        if k in results:
            lines.append(f"- {k} process peak: {results[k]['peak_mb']:.0f} MB")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
