"""Kept so plugins written against adapterkit 0.1 still import: ``adapterkit.merging``.

New code imports :class:`MergeInput`/:class:`MergeOutput` from ``adapterkit`` and the LoRA math
from :mod:`adapterkit.lora.factors` (per-layer scales exactly as PEFT resolves them).
"""

from adapterkit.lora.combine import MergeInput, MergeOutput, lora_config, lora_pairs, scale_of

__all__ = ["MergeInput", "MergeOutput", "lora_config", "lora_pairs", "scale_of"]
