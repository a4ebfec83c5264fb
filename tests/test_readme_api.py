"""The README's Python API example runs as printed (names swapped for a tiny base and files):
a user copied it and found its session refused, once the base it loaded in 4 bits no longer
answered pocket books trained on the full-precision one."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def api_example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_the_readme_python_api_example_runs_as_printed(tiny_base, tmp_path, monkeypatch):
    from adapterkit.plugin_api.testing import make_peft_adapter
    from adapterkit.pytest_plugin import TINY_ROWS

    monkeypatch.setenv("ADAPTERKIT_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    make_peft_adapter(tiny_base, tmp_path / "my-peft-adapter")
    (tmp_path / "prefs.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in TINY_ROWS["preference"]))
    code = api_example()
    assert code.count('"smollm2-135m"') >= 3  # what is swapped for the tiny base
    code = code.replace('"smollm2-135m"', repr(str(tiny_base)))
    scope: dict = {}
    exec(compile(code, "README.md (Python API)", "exec"), scope)
    assert scope["result"].pocket_book.meta.stacked_on == ["triage@1"]
    assert (tmp_path / "out" / "triage" / "adapter_model.safetensors").is_file()
    assert all(r.refused or r.max_logit_diff < 1e-3
               for r in scope["verify"](scope["library"], "bedside").results)
