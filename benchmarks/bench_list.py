"""`adapterkit list` over a library of N pocket books (generated metadata, tiny weights).

Goal (issue 2): under 0.5 s for 10,000 pocket books, measured as the whole CLI command
(process start included), and never importing torch. Also reports the cold start of
`adapterkit --help`, `plugins` and `show`.

    python benchmarks/bench_list.py [--n 10000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapterkit import Library, PocketBookMeta  # noqa: E402


def populate(home: Path, n: int) -> None:
    """Write N pocket-book folders directly, then index them (commit() fsyncs each: slow)."""
    lib = Library(home)
    for i in range(n):
        folder = lib.path_of(f"book{i:05d}", 1 + i % 3)
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
        (folder / "adapter_model.safetensors").write_bytes(b"\0" * 256)
        meta = PocketBookMeta(
            name=folder.parent.name, version=1 + i % 3,
            base={"name": f"base{i % 4}", "fingerprint": f"{i % 4:032x}",
                  "provenance": {"kind": "hub", "hub_id": f"org/base{i % 4}"}},
            method="lora" if i % 2 else "qlora", trainer="sft", tags=[f"t{i % 10}"],
            metrics={"loss": 1.0 + i / n}, hyperparameters={"r": 8, "lr": 2e-4},
        )
        (folder / "adapterkit.json").write_text(meta.to_json())
    assert lib.rebuild_catalog() == n


def timed(args: list[str], env: dict[str, str], repeat: int = 5) -> float:
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "adapterkit", *args], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        start = time.perf_counter()
        populate(home, args.n)
        print(f"populated {args.n} pocket books in {time.perf_counter() - start:.1f} s")
        env = dict(os.environ, ADAPTERKIT_HOME=str(home))
        lib = Library(home)
        start = time.perf_counter()
        rows = lib.list()
        print(f"Library.list() in-process: {len(rows)} rows in "
              f"{(time.perf_counter() - start) * 1000:.0f} ms")
        for cmd in (["--help"], ["plugins"], ["show", "book00042"], ["list"],
                    ["list", "--json"], ["list", "--tag", "t3"], ["list", "--base", "base1"]):
            print(f"adapterkit {' '.join(cmd):<24} {timed(cmd, env) * 1000:6.0f} ms (median of 5)")
        print(f"python -c pass (interpreter floor) {timed_python() * 1000:6.0f} ms")


def timed_python() -> float:
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


if __name__ == "__main__":
    main()
