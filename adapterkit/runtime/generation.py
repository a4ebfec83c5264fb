"""Generation on a resident model: prompts rendered as the base expects, answers batched.

Shared by sessions, ``adapterkit generate`` and the measurements in
:mod:`adapterkit.training.metrics` (which re-exports these), so every path renders a prompt
the same way.
"""

from __future__ import annotations

from typing import Any


def render_prompt(tokenizer: Any, prompt: Any, *, chat: bool) -> str:
    """The text a prompt becomes before generation (chat template for chat bases)."""
    if chat:
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)


def uses_chat(tokenizer: Any, chat: bool | None) -> bool:
    """Chat rendering is on when asked, or by default when the base has a chat template; asked
    for on a base without one, refused (there is no template to render with)."""
    if chat and not tokenizer.chat_template:
        from adapterkit.errors import ConfigError

        raise ConfigError("--chat renders prompts with the base's chat template, and this base's "
                          "tokenizer has none: leave --chat out (prompts go in as plain text)")
    return bool(tokenizer.chat_template) if chat is None else chat


def generate(model: Any, tokenizer: Any, prompts: list[Any], *, chat: bool,
             max_new_tokens: int = 64, batch_size: int = 16, temperature: float = 0.0) -> list[str]:
    """Greedy (or sampled) answers for ``prompts``, batched with left padding."""
    import torch

    texts = [render_prompt(tokenizer, p, chat=chat) for p in prompts]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    answers: list[str] = []
    device = next(model.parameters()).device
    try:
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=not chat).to(device)
            sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {
                "do_sample": False}
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=max_new_tokens,
                                     pad_token_id=tokenizer.pad_token_id, **sampling)
            answers += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:],
                                              skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [a.strip() for a in answers]
