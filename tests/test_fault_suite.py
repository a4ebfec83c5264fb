"""The fault benchmark of issue #17 (benchmarks/bench_faults.py) kept runnable: a smoke run of
its quick mode on the two operations that need no model (`tag`, `rm`) must kill commands in
flight and still find nothing corrupt, invisible or orphaned, and nothing left after
`adapterkit doctor`."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_fault_benchmark_finds_nothing_lost(tiny_base, peft_adapter, tmp_path):
    summary = tmp_path / "faults.json"
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_faults.py"), "--quick",
         "--ops", "tag,rm", "--base", str(tiny_base), "--adapter", str(peft_adapter),
         "--workdir", str(tmp_path / "work"), "--json", str(summary)],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    figures = json.loads(summary.read_text())
    assert set(figures["ops"]) == {"tag", "rm"}
    for op, tally in figures["ops"].items():
        assert tally["trials"] == 3, op
        assert tally["landed"] >= 1, f"{op}: no kill landed while the command ran"
        for problem in ("corrupt", "invisible", "orphan_rows", "left"):
            assert tally[problem] == [], (op, problem, out.stdout)
    assert figures["doctor"]["exit"] == 0 and figures["list_exit"] == 0, out.stdout
