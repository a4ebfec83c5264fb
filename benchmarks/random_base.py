"""A base folder with SmolLM2's architecture and tokenizer but random weights, for speed and
memory figures on a machine the real weights cannot reach (the device machines have no hub and
take 64 MiB per call; the embedded GGUF is 98 MB).

A run's time and memory depend on the shapes, not on the weights' values, so the figures carry
over; its scores do not (benchmarks run with --no-eval on such a base).

    python benchmarks/random_base.py TOKENIZER_FOLDER OUT_FOLDER [--shape 135m|1.7b|tiny]

TOKENIZER_FOLDER holds config.json and the tokenizer files of the embedded base (`adapterkit
base show smollm2-135m --json` gives its folder). `1.7b` is SmolLM2-1.7B's published shape
(hidden 2048, 24 layers, 32 heads, MLP 8192) with the same tokenizer: big enough that 4-bit
weights matter against activations and optimizer state.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

SHAPES: dict[str, dict[str, int]] = {
    "135m": {},  # the config as shipped
    "1.7b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
             "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 64},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16},
}
FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
         "generation_config.json")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("source")
    p.add_argument("out")
    p.add_argument("--shape", choices=sorted(SHAPES), default="135m")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = p.parse_args()

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(args.source)
    for key, value in SHAPES[args.shape].items():
        setattr(config, key, value)
    torch.manual_seed(0)
    # initialised on the GPU when there is one: a 1.7B model's random init takes a while on CPU
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
    out = Path(args.out)
    model.save_pretrained(out)
    for name in FILES:
        if (Path(args.source) / name).exists():
            shutil.copy(Path(args.source) / name, out / name)
    params = sum(p.numel() for p in model.parameters())
    print(f"{out}: {args.shape} shape, {params / 1e6:.1f}M parameters, {args.dtype}, random")


if __name__ == "__main__":
    main()
