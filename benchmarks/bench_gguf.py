"""GGUF export on the embedded base: what it costs, and whether llama.cpp answers like adapterkit.

On the embedded SmolLM2-135M-Instruct (its own Q4_1 GGUF is the base llama.cpp loads), with the
quickstart's triage pocket book (trained here with adapterkit/quickstart.py's settings, or
``--book REF`` from ``--home``):

* **Export**: wall time and file size of ``export --format gguf`` (the LoRA adapter) and of
  ``export --merged --format gguf`` at f16 and at q4_0 (llama.cpp's converter, then its
  quantizer).
* **Agreement** on the held-out triage complaints (examples/data/triage_test.jsonl), the same
  prompt tokens for both: llama.cpp (base GGUF + LoRA GGUF) against adapterkit's
  ``generate`` path (the base plus plain PEFT, greedy), one complaint at a time — answers
  identical token for token, tokens agreed before the first divergence, and top-1 agreement
  when llama.cpp is fed adapterkit's answer (teacher forcing).
* **Held-out accuracy** (exact match of ``Specialist: … | Urgency: …``, as the quickstart
  scores it) run by llama.cpp (LoRA GGUF; merged f16; merged q4_0) and by adapterkit.
* **Tokens/s** of generation, one prompt at a time, --new-tokens tokens each (end-of-sequence
  ignored, so every path makes the same number): llama.cpp + LoRA GGUF, llama.cpp merged
  q4_0, and adapterkit ``generate`` (float32 through PEFT) — the ratio says which to run on a
  laptop. adapterkit batched (16 prompts at once, left-padded) is printed beside it.

    python benchmarks/bench_gguf.py [--steps N] [--book REF --home HOME] [--new-tokens 64]
        [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT / "examples" / "data"


def load_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_triage(home: Path, steps: int | None) -> str:
    """The quickstart's triage pocket book, with its settings (adapterkit/quickstart.py)."""
    import adapterkit

    options = adapterkit.TrainOptions(
        learning_rate=1e-3, r=16, alpha=32, batch_size=8, epochs=None if steps else 1,
        max_steps=steps or -1,
        general="general", logging_steps=5, forgetting_budget=1.0, guard_weight=0.3, seed=0)
    base = adapterkit.load_base("smollm2-135m", home=home)
    result = adapterkit.train("sft", base=base, data=str(DATA / "triage_train.jsonl"),
                              name="triage", options=options, home=home)
    print(f"trained {result.pocket_book.ref}: {result.metrics['steps']} steps, "
          f"{result.metrics['train_seconds']:.0f} s", flush=True)
    return result.pocket_book.ref


def prompt_ids(tok: Any, prompts: list[str]) -> list[list[int]]:
    from adapterkit.runtime.generation import render_prompt

    return [tok(render_prompt(tok, p, chat=True), add_special_tokens=False).input_ids
            for p in prompts]


def adapterkit_answers(model: Any, tok: Any, ids: list[list[int]], new: int) -> list[list[int]]:
    import torch

    out = []
    for prompt in ids:
        x = torch.tensor([prompt])
        with torch.no_grad():
            y = model.generate(x, max_new_tokens=new, do_sample=False,
                               pad_token_id=tok.pad_token_id)[0, len(prompt):]
        out.append([t for t in y.tolist()])
    return out


def cut(tokens: list[int], eos: int) -> list[int]:
    return tokens[:tokens.index(eos)] if eos in tokens else tokens


def llama_answers(llm: Any, ids: list[list[int]], new: int, *, stop: bool = True
                  ) -> list[list[int]]:
    """Greedy (argmax of llama.cpp's logits), one prompt at a time."""
    out = []
    for prompt in ids:
        llm.reset()
        llm.eval(prompt)
        tokens: list[int] = []
        for _ in range(new):
            token = int(llm.scores[llm.n_tokens - 1].argmax())
            tokens.append(token)
            if stop and token == llm.token_eos():
                break
            llm.eval([token])
        out.append(tokens)
    return out


def teacher_forced(llm: Any, ids: list[list[int]], answers: list[list[int]]) -> float:
    agree = total = 0
    for prompt, answer in zip(ids, answers):
        if not answer:
            continue
        llm.reset()
        llm.eval(prompt + answer)
        for i, token in enumerate(answer):
            agree += int(llm.scores[len(prompt) + i - 1].argmax() == token)
            total += 1
    return agree / max(total, 1)


def prefix_agreement(ours: list[list[int]], theirs: list[list[int]]) -> float:
    same = total = 0
    for a, b in zip(ours, theirs):
        total += len(a)
        for x, y in zip(a, b):
            if x != y:
                break
            same += 1
    return same / max(total, 1)


def accuracy(tok: Any, answers: list[list[int]], rows: list[dict]) -> float:
    from adapterkit.training.metrics import exact_match

    texts = [tok.decode(a, skip_special_tokens=True).strip() for a in answers]
    return sum(exact_match(t, r["completion"]) for t, r in zip(texts, rows)) / len(rows)


def tokens_per_second(run: Any, n_prompts: int, new: int) -> float:
    start = time.perf_counter()
    run()
    return n_prompts * new / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, help="max training steps (default: one epoch)")
    parser.add_argument("--book", help="use this triage pocket book instead of training one")
    parser.add_argument("--home", type=Path, help="adapterkit home (default: a temporary one)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--speed-prompts", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="threads for both llama.cpp and torch (default: all cores)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import llama_cpp
    import torch

    import adapterkit
    from adapterkit.base.resolve import alias_file
    from adapterkit.cli import _quiet_libraries
    from adapterkit.library.store import Library
    from adapterkit.runtime.gguf import export_gguf_lora, export_gguf_merged
    from adapterkit.runtime.peft_model import peft_model
    from adapterkit.training.metrics import accuracy as eval_accuracy

    _quiet_libraries()
    threads = args.threads
    home = args.home or Path(tempfile.mkdtemp(prefix="bench-gguf-"))
    ref = args.book or train_triage(home, args.steps)
    torch.set_num_threads(threads)  # the comparisons run on the same threads as llama.cpp
    library = Library(home)
    out = Path(tempfile.mkdtemp(prefix="bench-gguf-out-"))
    figures: dict[str, Any] = {"book": ref, "threads": threads, "steps": args.steps}

    lora = export_gguf_lora(library, ref, out / "lora")
    f16 = export_gguf_merged(library, ref, out / "f16")
    q4 = export_gguf_merged(library, ref, out / "q4_0", quantize="q4_0")
    for label, report in (("lora", lora), ("merged_f16", f16), ("merged_q4_0", q4)):
        figures[f"export_{label}_seconds"] = report.seconds
        figures[f"export_{label}_mb"] = report.size / 2**20
        print(f"export {label:<12} {report.seconds:6.1f} s  {report.size / 2**20:7.1f} MB  "
              f"{report.path.name}", flush=True)

    base = adapterkit.load_base("smollm2-135m", home=home)
    tok = base.tokenizer
    eos = tok.eos_token_id
    rows = load_jsonl(DATA / "triage_test.jsonl")
    ids = prompt_ids(tok, [r["prompt"] for r in rows])
    model = peft_model(base, library.get(ref), library=library)
    ours = [cut(a, eos) for a in adapterkit_answers(model, tok, ids, 24)]
    batched_acc, _ = eval_accuracy(model, tok, rows, chat=True, max_new_tokens=24)

    gguf_base = alias_file("smollm2-135m")[0]
    kw = {"n_ctx": 1024, "n_threads": threads, "logits_all": True, "verbose": False}
    runs = {"llama.cpp LoRA GGUF": llama_cpp.Llama(str(gguf_base), lora_path=str(lora.path),
                                                   **kw),
            "llama.cpp merged f16": llama_cpp.Llama(str(f16.path), **kw),
            "llama.cpp merged q4_0": llama_cpp.Llama(str(q4.path), **kw)}
    figures["accuracy_adapterkit"] = accuracy(tok, ours, rows)
    figures["accuracy_adapterkit_batched"] = batched_acc
    print(f"\nheld-out triage ({len(rows)} complaints), 24 new tokens, greedy:")
    print(f"  adapterkit (PEFT, float32, one at a time)  accuracy {accuracy(tok, ours, rows):.1%}"
          f"  (batched, as `adapterkit eval`: {batched_acc:.1%})")
    for label, llm in runs.items():
        theirs = [cut(a, eos) for a in llama_answers(llm, ids, 24)]
        same = sum(a == b for a, b in zip(ours, theirs))
        prefix = prefix_agreement(ours, theirs)
        forced = teacher_forced(llm, ids, ours)
        acc = accuracy(tok, theirs, rows)
        key = label.split(" ", 1)[1].replace(" ", "_").lower()
        figures.update({f"identical_{key}": same, f"prefix_agreement_{key}": prefix,
                        f"teacher_forced_{key}": forced, f"accuracy_{key}": acc})
        print(f"  {label:<42} accuracy {acc:.1%}; answers identical {same}/{len(rows)}, "
              f"tokens agreed before a divergence {prefix:.1%}, teacher-forced top-1 "
              f"{forced:.1%}")

    # speed: the same prompts, one at a time, exactly --new-tokens each
    speed_ids = ids[:args.speed_prompts]
    n, new = len(speed_ids), args.new_tokens

    def ours_one() -> None:
        for prompt in speed_ids:
            with torch.no_grad():
                model.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new,
                               do_sample=False, pad_token_id=tok.pad_token_id)

    def ours_batched() -> None:
        texts = [tok.decode(p) for p in ids[:16]]
        side, tok.padding_side = tok.padding_side, "left"
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        tok.padding_side = side
        with torch.no_grad():
            model.generate(**enc, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                           pad_token_id=tok.pad_token_id)

    speeds = {}
    for label, llm in runs.items():
        speeds[label] = tokens_per_second(
            lambda llm=llm: llama_answers(llm, speed_ids, new, stop=False), n, new)
    speeds["adapterkit generate (one at a time)"] = tokens_per_second(ours_one, n, new)
    batched = tokens_per_second(ours_batched, 16, new)
    print(f"\ntokens/s, {n} prompts one at a time, {new} new tokens each, {threads} threads:")
    ref_speed = speeds["adapterkit generate (one at a time)"]
    for label, value in speeds.items():
        print(f"  {label:<40} {value:7.1f} tokens/s  ({value / ref_speed:.2f}x adapterkit)")
        figures[f"tokens_per_second_{label}"] = value
    figures["tokens_per_second_adapterkit_batched_16"] = batched
    print(f"  {'adapterkit generate, 16 prompts batched':<40} {batched:7.1f} tokens/s  "
          f"({batched / ref_speed:.2f}x)")
    for llm in runs.values():
        llm.close()
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
