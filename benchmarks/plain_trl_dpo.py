"""The peer for `adapterkit train dpo`: a plain TRL DPOTrainer + PEFT LoRA script, as a user
writes it without adapterkit (the reference is the base with the adapter off, computed
alongside each step, as TRL does for a PEFT model without precomputed log-probs).

Same model folder, pairs rendered with the chat template, length, batch, steps, rank and lr as
the adapterkit run it is compared with (bench_train_wall.py --trainer dpo).

    python benchmarks/plain_trl_dpo.py MODEL_FOLDER PAIRS.jsonl --max-steps 10 [--bf16]
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("data")
    p.add_argument("--max-steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--out", help="write figures as JSON here")
    p.add_argument("--save-to", help="save the trained adapter here")
    args = p.parse_args()

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    rows = [json.loads(line) for line in open(args.data) if line.strip()]
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                             "chosen": [{"role": "assistant", "content": r["chosen"]}],
                             "rejected": [{"role": "assistant", "content": r["rejected"]}]}
                            for r in rows])
    config = DPOConfig(
        output_dir="/tmp/plain-trl-dpo", per_device_train_batch_size=args.batch_size,
        max_steps=args.max_steps, learning_rate=args.lr, lr_scheduler_type="linear",
        logging_steps=5, save_strategy="no", report_to=[], max_length=args.max_length, seed=0,
        bf16=args.bf16, use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=args.gradient_checkpointing,
        include_num_input_tokens_seen="non_padding", disable_tqdm=True,
        precompute_ref_log_probs=False,
    )
    peft_config = LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.05,
                             target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=config, train_dataset=ds, processing_class=tok,
                         peft_config=peft_config)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    loop = next(h["train_runtime"] for h in reversed(trainer.state.log_history)
                if "train_runtime" in h)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    figures = {"tokens": trainer.state.num_input_tokens_seen, "train_seconds": seconds,
               "loop_seconds": loop,
               "tokens_per_second": trainer.state.num_input_tokens_seen / loop,
               "train_loss_final": losses[-1] if losses else None,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if args.save_to:
        trainer.model.save_pretrained(args.save_to)
    print(json.dumps(figures))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(figures, fh)


if __name__ == "__main__":
    main()
