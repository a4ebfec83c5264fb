"""Reward pocket books: a LoRA plus a scalar head, on the same resident base as the policy.

A reward pocket book is a standard PEFT ``SEQ_CLS`` adapter (``modules_to_save = ["score"]``),
so ``AutoModelForSequenceClassification`` + PEFT load it unchanged. Inside adapterkit the
sequence-classification model is never loaded as a second copy: :func:`reward_model` builds
its shell on the meta device and gives it the causal model's own backbone, and
:class:`RewardScorer` folds the reward LoRA into that backbone switched off, switching it on
(with the policy and any pocket books underneath switched off) only while it scores.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

from adapterkit.errors import ConfigError, InvalidAdapter
from adapterkit.library.store import PocketBook


def reward_model(causal: Any, *, pad_token_id: int | None) -> Any:
    """A sequence-classification model (one label) sharing ``causal``'s backbone weights."""
    import copy

    import torch
    from transformers import AutoModelForSequenceClassification

    prefix = causal.base_model_prefix
    backbone = getattr(causal, prefix, None)
    config = copy.deepcopy(causal.config)
    config.num_labels = 1
    config.pad_token_id = pad_token_id
    try:
        with torch.device("meta"):
            seq = AutoModelForSequenceClassification.from_config(config)
    except ValueError:
        raise ConfigError(f"{type(causal).__name__} has no sequence-classification variant in "
                          "transformers, so it cannot carry a reward head") from None
    head = getattr(seq, "score", None)
    if backbone is None or getattr(seq, prefix, None) is None or head is None:
        raise ConfigError(f"{type(seq).__name__} does not have the backbone + `score` head "
                          "layout adapterkit's reward pocket books need")
    setattr(seq, prefix, backbone)
    weight = next(p for p in backbone.parameters() if p.is_floating_point())
    seq.score = torch.nn.Linear(head.in_features, head.out_features, bias=head.bias is not None,
                                device=weight.device, dtype=weight.dtype)
    torch.nn.init.normal_(seq.score.weight, std=getattr(config, "initializer_range", 0.02))
    if seq.score.bias is not None:
        torch.nn.init.zeros_(seq.score.bias)
    if any(t.is_meta for t in (*seq.parameters(), *seq.buffers())):
        raise ConfigError(f"{type(seq).__name__} has parts beyond backbone + score head; "
                          "reward pocket books are not supported for it")
    return seq


def render(tokenizer: Any, prompt: Any, completion: Any) -> list[int]:
    """Token ids of prompt + completion exactly as TRL's reward trainer tokenizes a pair."""
    if isinstance(prompt, list) or isinstance(completion, list):
        messages = list(prompt) + list(completion)
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)
        return list(ids["input_ids"])
    text = prompt + completion
    if tokenizer.eos_token and not text.endswith(tokenizer.eos_token):
        text += tokenizer.eos_token
    return list(tokenizer(text)["input_ids"])


def rewards(model: Any, tokenizer: Any, sequences: list[list[int]], *,
            batch_size: int = 16) -> list[float]:
    """The scalar reward of each token sequence under ``model`` (a one-label
    sequence-classification model, which reads the last token that is not padding), in
    right-padded batches."""
    import torch

    pad = getattr(model.config, "pad_token_id", None)  # the token the head reads past
    pad = tokenizer.pad_token_id if pad is None else pad
    pad = tokenizer.eos_token_id if pad is None else pad
    device = next(model.parameters()).device
    out: list[float] = []
    for i in range(0, len(sequences), batch_size):
        chunk = sequences[i: i + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        out.extend(logits[:, 0].float().tolist())
    return out


def preference_eval(model: Any, tokenizer: Any, rows: list[dict[str, Any]], *,
                    max_length: int = 1024) -> dict[str, Any]:
    """A reward model on held-out preference pairs (``rows`` rendered as it was trained on
    them): TRL's reward loss, the mean of −log σ(r_chosen − r_rejected), and how often the
    chosen answer scores higher. (Rows carry only prompt, chosen and rejected — the data
    loader keeps a shape's own fields — so TRL trained without a ``margin`` too.) Pairs longer
    than ``max_length`` are left out, as TRL's reward trainer leaves them out of training;
    with none left, the loss is ``None``."""
    import torch

    from adapterkit.training.metrics import _answering

    pairs = [(render(tokenizer, r["prompt"], r["chosen"]),
              render(tokenizer, r["prompt"], r["rejected"])) for r in rows]
    pairs = [p for p in pairs if len(p[0]) <= max_length and len(p[1]) <= max_length]
    if not pairs:
        return {"loss": None, "pair_accuracy": None, "pairs": 0}
    with _answering(model), torch.no_grad():  # LoRA dropout off: the saved weights' figure
        chosen = rewards(model, tokenizer, [p[0] for p in pairs])
        rejected = rewards(model, tokenizer, [p[1] for p in pairs])
    gap = torch.tensor(chosen, dtype=torch.float64) - torch.tensor(rejected, dtype=torch.float64)
    return {"loss": float(torch.nn.functional.softplus(-gap).mean()),
            "pair_accuracy": float((gap > 0).double().mean()), "pairs": len(pairs)}


class RewardScorer:
    """Scores (prompt, completion) pairs with a reward pocket book on the resident base.

    :param base: the loaded base (the policy being trained may already wrap it).
    :param policy: the PEFT policy model wrapping ``base.model``; switched off while scoring.
    """

    def __init__(self, base: Any, book: PocketBook, *, policy: Any = None,
                 max_length: int = 1024, batch_size: int = 16) -> None:
        import torch

        from adapterkit.lora import underlay

        self.check(base, book)
        self.book, self.base, self.policy = book, base, policy
        self.tokenizer = base.tokenizer
        self.max_length, self.batch_size = max_length, batch_size
        extra: dict[str, Any] = {}
        self.gate = underlay.apply(base.model, [book], gate=underlay.Gate(on=False), extra=extra)
        head = {k.split("score.")[-1].replace("modules_to_save.default.", ""): v
                for k, v in extra.items() if "score." in k}
        others = sorted(k for k in extra if "score." not in k)
        if "weight" not in head or others:
            underlay.remove(base.model, gate=self.gate)
            raise InvalidAdapter(
                f"{book.ref} has no reward head (score.weight) in its weights" if "weight"
                not in head else f"{book.ref} saves full tensors besides its reward head "
                f"({', '.join(others[:3])}), which the scorer cannot apply; score with it "
                "through PEFT (AutoModelForSequenceClassification + PeftModel)")
        self.model = reward_model(base.model, pad_token_id=self.tokenizer.pad_token_id)
        with torch.no_grad():
            self.model.score.weight.copy_(head["weight"].to(self.model.score.weight.dtype))
            if self.model.score.bias is not None and "bias" in head:
                self.model.score.bias.copy_(head["bias"])

    @staticmethod
    def check_kind(book: PocketBook) -> None:
        """Refuse a policy pocket book where a reward one is needed (no base needed)."""
        from adapterkit.lora.underlay import is_reward_book

        if not is_reward_book(book):
            raise InvalidAdapter(f"--reward {book.ref} is a policy pocket book, not a reward "
                                 "one; train one with `adapterkit train reward` (or run rlhf "
                                 "without --reward)")

    @staticmethod
    def check(base: Any, book: PocketBook) -> None:
        """Refuse a policy pocket book, or a reward pocket book made on another base."""
        from adapterkit.base.compat import check_base
        from adapterkit.errors import BaseMismatch

        RewardScorer.check_kind(book)
        try:
            check_base(base, book)
        except BaseMismatch as exc:
            raise BaseMismatch(f"reward {exc}") from None

    def score_ids(self, sequences: list[list[int]]) -> list[float]:
        import torch

        from adapterkit.lora import underlay
        from adapterkit.training.metrics import _adapter_off

        off = _adapter_off(self.policy)  # a no-op without a policy
        # No train()/eval() switching here: the backbone is shared with the policy, whose mode
        # belongs to its trainer. Nothing on the scoring path depends on the mode anyway (the
        # policy's LoRA, dropout included, is off; the reward LoRA is a plain hook).
        with torch.no_grad(), off, underlay.suspended(self.base.model, keep=self.gate), \
                self.gate.set(True):
            return rewards(self.model, self.tokenizer,
                           [s[: self.max_length] for s in sequences], batch_size=self.batch_size)

    def score(self, prompts: list[Any], completions: list[Any], *,
              chat: bool | None = None) -> list[float]:
        """Reward of each completion of each prompt (strings or chat messages).

        Strings are rendered as chat turns when ``chat`` (default: when the base has a chat
        template — as the reward pocket book's training data was).
        """
        from adapterkit.training.data import as_chat
        from adapterkit.training.metrics import uses_chat

        rows = [{"prompt": p, "completion": c} for p, c in zip(prompts, completions)]
        if uses_chat(self.tokenizer, chat):
            rows = [as_chat(r) for r in rows]
        return self.score_ids([render(self.tokenizer, r["prompt"], r["completion"])
                               for r in rows])

    def close(self) -> None:
        """Take the reward pocket book back out of the base."""
        from adapterkit.lora import underlay

        underlay.remove(self.base.model, gate=self.gate)


def reward_of_generations(policy: Any, scorer: RewardScorer, prompts: list[Any], *,
                          chat: bool | None = None, max_new_tokens: int = 32, samples: int = 0,
                          temperature: float = 1.0, seed: int = 0) -> dict[str, float]:
    """Mean reward of answers to ``prompts`` with the policy pocket book off and on.

    ``chat`` (default: when the base has a chat template, as training does) renders prompts.
    Greedy answers by default; ``samples`` > 0 draws that many sampled answers per prompt
    (what RL optimises: the mean of the policy's distribution, not its single mode).
    """
    import torch

    from adapterkit.training.metrics import generate, uses_chat

    chat = uses_chat(scorer.tokenizer, chat)  # as training rendered them
    out = {}
    prompts = [p for p in prompts for _ in range(max(samples, 1))]
    for label, context in (("before", policy.disable_adapter()), ("after", nullcontext())):
        torch.manual_seed(seed)
        with context:
            answers = generate(policy, scorer.tokenizer, prompts, chat=chat,
                               max_new_tokens=max_new_tokens,
                               temperature=temperature if samples else 0.0)
        scores = scorer.score(prompts, answers, chat=chat)
        out[label] = sum(scores) / len(scores)
    return out
