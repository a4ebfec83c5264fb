"""Resident memory of the base in 4-bit NF4 (QLoRA) against full precision, on CPU or GPU.

Each precision loads in its own process. Reports the weights' footprint (transformers'
get_memory_footprint), the resident memory the loaded base adds to the process after one
forward pass (the figure that matters while serving or training), the process's peak RSS
(loading a 4-bit base reads the full-precision file once), and — on CUDA — peak GPU memory,
with the ratio 4-bit / full.

    python benchmarks/bench_qlora_memory.py [--base smollm2-135m] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, os, resource, sys, torch, adapterkit
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
quant = sys.argv[2] or None
dtype = getattr(torch, sys.argv[3]) if sys.argv[3] else None
start = rss()
base = adapterkit.load_base(sys.argv[1], quantization=quant, dtype=dtype)
with torch.no_grad():  # touch every weight: memory-mapped pages count once they are used
    base.model(**base.tokenizer(["The weather today is"], return_tensors="pt").to(base.model.device))
out = {"footprint_mb": base.model.get_memory_footprint() / 2**20,
       "resident_base_mb": rss() - start,
       "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
if torch.cuda.is_available():
    out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
print(json.dumps(out))
"""


def measure(base: str, quant: str, dtype: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, base, quant, dtype], capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--dtype", default="", help="full-precision dtype (default: adapterkit's)")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    full = measure(args.base, "", args.dtype)
    q4 = measure(args.base, "4bit", args.dtype)
    print(f"{'':16}{'full':>10}{'4-bit':>10}{'ratio':>8}")
    for key in full:
        print(f"{key:16}{full[key]:>10.1f}{q4[key]:>10.1f}{q4[key] / full[key]:>8.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"full": full, "4bit": q4}, indent=2))


if __name__ == "__main__":
    main()
