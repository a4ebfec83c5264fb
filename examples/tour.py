"""A short tour of adapterkit on the embedded base (SmolLM2-135M-Instruct).

Runs the real commands, one after the other, and prints each before its output:
  1. the installed plugins and the embedded base (converted from GGUF once, then cached);
  2. a LoRA adapter made with *plain PEFT* (a few training steps) joins the library;
  3. list / show / tag / export;
  4. the exported folder loads back in plain PEFT with logits identical to the original;
  5. clean-up.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NAME = "tour-demo"


def step(*args: str, capture: bool = False) -> str:
    print(f"\n$ adapterkit {shlex.join(args)}", flush=True)
    out = subprocess.run([sys.executable, "-m", "adapterkit", *args], check=True,
                         capture_output=capture, text=True)
    if capture:
        print(out.stdout, end="")
        return out.stdout
    return ""


def make_plain_peft_adapter(base_folder: str, out: Path) -> None:
    """What a PEFT user does by hand: wrap the base, train a few steps, save."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_folder)
    model = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    batch = tok(["Specialist: cardiology | Urgency: high"], return_tensors="pt")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for i in range(8):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        print(f"  plain PEFT step {i + 1}/8  loss {loss.item():.3f}", flush=True)
    model.save_pretrained(out)


def logits(base_folder: str, adapter: Path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_folder)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_folder), adapter)
    with torch.no_grad():
        return model(**tok(["A patient with chest pain"], return_tensors="pt")).logits


def main() -> None:
    start = time.time()
    subprocess.run([sys.executable, "-m", "adapterkit", "rm", NAME, "--all-versions"],
                   capture_output=True)  # a previous tour's leftovers, if any
    step("plugins")
    info = json.loads(step("base", "show", "smollm2-135m", "--json", capture=True))
    step("base", "show", "smollm2-135m")
    with tempfile.TemporaryDirectory() as tmp:
        adapter = Path(tmp) / "plain-peft-adapter"
        print("\n# A LoRA made with plain PEFT on the same base:")
        make_plain_peft_adapter(info["folder"], adapter)
        step("import", str(adapter), "--name", NAME, "--base", "smollm2-135m")
        step("list")
        step("tag", NAME, "tour")
        step("show", NAME)
        exported = Path(tmp) / "exported"
        step("export", NAME, str(exported))
        same = bool((logits(info["folder"], exported) == logits(info["folder"], adapter)).all())
        print(f"\n# Exported folder loads in plain PEFT; logits identical to the original: {same}")
        if not same:
            sys.exit("tour failed: exported adapter does not reproduce the original logits")
    step("rm", NAME, "--all-versions")
    print(f"\nTour finished in {time.time() - start:.0f} s.")


if __name__ == "__main__":
    main()
