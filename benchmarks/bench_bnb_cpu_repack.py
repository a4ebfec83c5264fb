"""What bitsandbytes' CPU repacking of 4-bit weights buys, and why training turns it off.

On CPUs with AVX512-BF16, bitsandbytes repacks a ``Linear4bit`` weight in place on its first
eval-mode, no-grad forward (faster CPU inference) and unpacks it on ``state_dict()``; both
steps round. adapterkit keeps the repacking for inference and turns it off for training runs
(``adapterkit.base.load.keep_4bit_layout``). This prints the generation time both ways and the
logit change the repacking causes.

    python benchmarks/bench_bnb_cpu_repack.py [--base smollm2-135m]
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--base", default="smollm2-135m")
    args = p.parse_args()

    import torch

    from adapterkit import load_base
    from adapterkit.base.load import keep_4bit_layout
    from adapterkit.cli import _quiet_libraries
    from adapterkit.training.metrics import generate

    _quiet_libraries()
    prompts = ["I have ear pain and a sore throat since yesterday."] * 4
    ids = torch.tensor([[1, 504, 3458, 314, 260, 1345, 30]])

    def timed(base) -> float:
        generate(base.model, base.tokenizer, prompts[:1], chat=True, max_new_tokens=4)  # warm
        start = time.perf_counter()
        for _ in range(3):
            generate(base.model, base.tokenizer, prompts, chat=True, max_new_tokens=32)
        return (time.perf_counter() - start) / 3

    exact = load_base(args.base, quantization="4bit")
    keep_4bit_layout(exact.model)
    with torch.no_grad():
        exact_logits = exact.model(input_ids=ids).logits
    t_exact = timed(exact)
    packed = load_base(args.base, quantization="4bit")
    t_packed = timed(packed)
    with torch.no_grad():
        packed_logits = packed.model(input_ids=ids).logits
    print(f"generation, 4 prompts x 32 tokens: {t_exact:.2f} s exact layout (training), "
          f"{t_packed:.2f} s repacked (inference) → {t_exact / t_packed:.2f}x")
    print(f"max logit change caused by the repacking: "
          f"{(packed_logits - exact_logits).abs().max().item():.4f}")


if __name__ == "__main__":
    main()
