"""Test helpers: tiny random bases and tokenizers, built offline in milliseconds.

adapterkit's own tests use these, and plugin authors can too: a tiny Llama-shaped model (a few
hundred thousand parameters) with a real byte-level BPE tokenizer and a ChatML chat template,
saved as an ordinary transformers folder that every adapterkit API accepts as a base.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The patient reports chest pain and shortness of breath since this morning.",
    "Specialist: cardiology | Urgency: high",
    "A mild rash on the forearm, itchy, appeared two days ago after gardening.",
    "Specialist: dermatology | Urgency: low",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "Rivers carve valleys over thousands of years; mountains rise and wear away.",
    "def add(a, b): return a + b  # numbers, code and punctuation: 0123456789 !?.,;:",
]


__all__ = ["tiny_tokenizer", "tiny_config", "make_tiny_base", "make_peft_adapter"]


def tiny_tokenizer(vocab_size: int = 256) -> Any:
    """A byte-level BPE tokenizer trained on a few sentences, with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>",
        pad_token="<|endoftext|>", unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(vocab_size: int = 256, **overrides: Any) -> Any:
    """A Llama config of about 100k parameters (2 layers, hidden 64)."""
    from transformers import LlamaConfig

    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=2, pad_token_id=0,
        # Wide enough that the random output layer can express confident predictions, so a
        # LoRA on the inner layers can visibly lower the loss in a few steps.
        initializer_range=0.2,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def make_tiny_base(folder: str | Path, *, seed: int = 0, vocab_size: int = 256,
                   **config_overrides: Any) -> Path:
    """Write a tiny random causal LM + tokenizer to ``folder`` and return its path."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    tokenizer = tiny_tokenizer(vocab_size)
    config = tiny_config(len(tokenizer), **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_peft_adapter(base_folder: str | Path, out: str | Path, *, seed: int = 1,
                      target_modules: Any = ("q_proj", "v_proj"), r: int = 4,
                      **lora_kwargs: Any) -> Path:
    """Save a LoRA made with plain PEFT on ``base_folder`` (non-zero B, so it changes logits)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_folder)
    lora_kwargs.setdefault("lora_alpha", 2 * r)
    config = LoraConfig(r=r, target_modules=list(target_modules)
                        if not isinstance(target_modules, str) else target_modules,
                        task_type="CAUSAL_LM", **lora_kwargs)
    peft_model = get_peft_model(model, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                param.normal_(std=0.5)
    peft_model.save_pretrained(str(out))
    return Path(out)
