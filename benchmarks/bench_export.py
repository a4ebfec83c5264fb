"""`export --merged` on the embedded base: peak memory and merged-vs-unmerged logits.

Each case runs in its own process. Peak RSS of the export is divided by the peak RSS of a
process that only loads the same base in full precision (goal ≤ 1.3), for a pocket book on the
full-precision base and one on the 4-bit base (QLoRA: dequantized, then folded).

    python benchmarks/bench_export.py [--base smollm2-135m]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SETUP = """
import json, sys
from pathlib import Path
import adapterkit
from adapterkit import Library
from adapterkit.plugin_api.testing import make_peft_adapter
home, folder = sys.argv[1], sys.argv[2]
lib = Library(home)
path = make_peft_adapter(folder, Path(home) / "src", seed=0, r=8, target_modules="all-linear")
lib.import_peft(path, "full", base=folder)
lib.import_peft(path, "q", base=folder)
meta = lib.get("q").path / "adapterkit.json"
data = json.loads(meta.read_text()); data["method"] = "qlora"; meta.write_text(json.dumps(data))
lib.rebuild_catalog()
"""

LOAD_ONLY = """
import json, resource, sys, torch, adapterkit
from adapterkit.runtime.export import PROMPTS
base = adapterkit.load_base(sys.argv[2], home=sys.argv[1])
with torch.no_grad():  # touch every weight once, as any use of the base does
    base.model(**base.tokenizer(PROMPTS, return_tensors="pt", padding=True))
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

EXPORT = """
import json, resource, sys
from adapterkit import Library
from adapterkit.runtime.export import export_merged
report = export_merged(Library(sys.argv[1]), sys.argv[3], sys.argv[4])
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "max_logit_diff": report.max_logit_diff,
                  "dequantized_from": report.dequantized_from}))
"""


def child(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else {}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--base", default="smollm2-135m")
    args = p.parse_args()
    info = json.loads(subprocess.run(
        [sys.executable, "-m", "adapterkit", "base", "show", args.base, "--json"],
        capture_output=True, text=True, check=True).stdout)
    with tempfile.TemporaryDirectory() as tmp:
        home = str(Path(tmp) / "home")
        child(SETUP, home, info["folder"])
        base = child(LOAD_ONLY, home, info["folder"])["peak_rss_mb"]
        print(f"one base copy (a process that loads it in full precision and runs it once): "
              f"{base:.0f} MB peak RSS")
        for ref, label in (("full", "full-precision base"), ("q", "4-bit base (NF4)")):
            r = child(EXPORT, home, info["folder"], ref, str(Path(tmp) / f"out-{ref}"))
            print(f"{label:22} peak RSS {r['peak_rss_mb']:.0f} MB = "
                  f"{r['peak_rss_mb'] / base:.2f}x one base; max |logits merged - unmerged| "
                  f"{r['max_logit_diff']:.2e}"
                  + (f" (dequantized from {r['dequantized_from']})" if r["dequantized_from"] else ""))


if __name__ == "__main__":
    main()
