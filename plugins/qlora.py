"""The ``qlora`` adapter method: LoRA on a 4-bit NF4 base (double quantization).

The base is loaded through bitsandbytes with NF4 weights, double quantization and the compute
dtype of the run, then prepared for k-bit training (PEFT's ``prepare_model_for_kbit_training``:
norms in float32, input gradients enabled so that gradient checkpointing works).
"""

from __future__ import annotations

from typing import Any

from adapterkit_plugins.lora import LoRA

from adapterkit import hookimpl


class QLoRA(LoRA):
    name = "qlora"
    description = "LoRA on a 4-bit NF4 base with double quantization (bitsandbytes)"
    quantization = "4bit"

    def prepare_base(self, model: Any, *, gradient_checkpointing: bool = False) -> Any:
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing
        )


@hookimpl
def register_methods(register):
    register(QLoRA())
