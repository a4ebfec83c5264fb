"""The ``alpaca`` data format: ``instruction`` / ``input`` / ``output`` rows → prompt/completion."""

from __future__ import annotations

from typing import Any

from adapterkit import DataFormat, hookimpl


class Alpaca(DataFormat):
    name = "alpaca"
    description = "Stanford Alpaca rows: instruction, optional input, output"
    columns = ("instruction", "output")
    shape = "prompt_completion"

    def convert(self, row: dict[str, Any]) -> dict[str, Any]:
        prompt = str(row.get("instruction") or "").strip()
        extra = str(row.get("input") or "").strip()
        if extra:
            prompt = f"{prompt}\n\n{extra}"
        return {"prompt": prompt, "completion": str(row.get("output") or "").strip()}


@hookimpl
def register_data_formats(register):
    register(Alpaca())
