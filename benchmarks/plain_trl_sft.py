"""The peer: a plain TRL SFTTrainer + PEFT LoRA script, as a user writes it without adapterkit.

Same model folder, data, chat rendering, sequence length, batch, steps and precision as
`adapterkit train sft`, so the two can be compared one after the other (see bench_sft.py).

    python benchmarks/plain_trl_sft.py MODEL_FOLDER DATA.jsonl --max-steps 30 [--eval TEST.jsonl]
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
from trl import SFTConfig, SFTTrainer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("data")
    p.add_argument("--max-steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="TRL's own default (SFTConfig turns it on); off unless given")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (TrainingArguments.bf16)")
    p.add_argument("--load-in-4bit", action="store_true",
                   help="QLoRA as its model cards write it: NF4, double quantization, bf16 "
                        "compute (BitsAndBytesConfig), prepare_model_for_kbit_training")
    p.add_argument("--eval", help="held-out prompt/completion file: accuracy + forgetting")
    p.add_argument("--out", help="write figures as JSON here")
    p.add_argument("--save-to", help="save the trained adapter (a PEFT folder) here")
    args = p.parse_args()

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model)
    if args.load_in_4bit:
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=quant,
                                                     dtype=torch.bfloat16)
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=args.gradient_checkpointing)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    rows = [json.loads(line) for line in open(args.data) if line.strip()]
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                             "completion": [{"role": "assistant", "content": r["completion"]}]}
                            for r in rows])
    config = SFTConfig(
        output_dir="/tmp/plain-trl-sft", per_device_train_batch_size=args.batch_size,
        max_steps=args.max_steps, learning_rate=args.lr, lr_scheduler_type="linear",
        logging_steps=5, save_strategy="no", report_to=[], max_length=args.max_length, seed=0,
        bf16=args.bf16, use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=args.gradient_checkpointing,
        include_num_input_tokens_seen="non_padding", disable_tqdm=True,
    )
    peft_config = LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.05,
                             target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=ds, processing_class=tok,
                         peft_config=peft_config)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    tokens = trainer.state.num_input_tokens_seen
    loop = next(h["train_runtime"] for h in reversed(trainer.state.log_history)
                if "train_runtime" in h)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    figures = {"tokens": tokens, "train_seconds": seconds, "loop_seconds": loop,
               "train_loss_final": losses[-1] if losses else None,
               "tokens_per_second": tokens / loop,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if args.save_to:
        trainer.model.save_pretrained(args.save_to)
    if args.eval:
        from adapterkit.training.data import read_rows
        from adapterkit.training.metrics import accuracy, forgetting

        model = trainer.model.eval()
        test = [json.loads(line) for line in open(args.eval) if line.strip()]
        figures["accuracy_after"], _ = accuracy(model, tok, test, chat=True)
        general = [r["text"] for r in read_rows("general")[0]]
        figures["forgetting_pct"] = forgetting(model, tok, general)["general_loss_change_pct"]
    print(json.dumps(figures))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(figures, fh)


if __name__ == "__main__":
    main()
