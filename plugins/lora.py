"""The ``lora`` adapter method: a LoRA pocket book on the base as stored (PEFT ``LoraConfig``)."""

from __future__ import annotations

from typing import Any

from adapterkit import AdapterMethod, hookimpl


class LoRA(AdapterMethod):
    name = "lora"
    description = "LoRA on the base as stored (full or half precision)"

    def peft_config(self, *, target_modules: list[str] | str = "all-linear", r: int = 16,
                    alpha: int = 32, dropout: float = 0.05, **options: Any) -> Any:
        from peft import LoraConfig  # heavy: imported only when a pocket book is built

        return LoraConfig(
            r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
            bias="none", task_type="CAUSAL_LM", **options,
        )


@hookimpl
def register_methods(register):
    register(LoRA())
