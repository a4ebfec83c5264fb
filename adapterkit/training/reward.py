"""Reward pocket books: a LoRA plus a scalar head, on the same resident base as the policy.

A reward pocket book is a standard PEFT ``SEQ_CLS`` adapter (``modules_to_save = ["score"]``),
so ``AutoModelForSequenceClassification`` + PEFT load it unchanged. Inside adapterkit the
sequence-classification model is never loaded as a second copy: :func:`reward_model` builds
its shell on the meta device and gives it the causal model's own backbone, and
:class:`RewardScorer` folds the reward LoRA — with the pocket books it was trained on top of
(``--on``) underneath — into that backbone switched off, switching them on (with the policy and
its own pocket books underneath switched off) only while it scores.

It reads the text as the reward pocket book was trained on it (:func:`scored_ids`): through the
chat template or as plain text, as its training recorded, whole.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

from adapterkit.errors import ConfigError, InvalidAdapter
from adapterkit.library.store import Library, PocketBook


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


def trained_chat(tokenizer: Any, book: PocketBook) -> bool:
    """Whether the reward pocket book ``book`` was trained on chat-rendered pairs: its recorded
    ``--chat``/``--no-chat``, else (not given) whether the base has a chat template, as its
    training decided."""
    chat = book.meta.hyperparameters.get("chat")
    if chat and not tokenizer.chat_template:
        raise InvalidAdapter(f"{book.ref} was trained with the chat template, and this base's "
                             "tokenizer has none: score with it on the base it was trained on")
    return bool(tokenizer.chat_template) if chat is None else bool(chat)


def scored_ids(tokenizer: Any, prompt: Any, completion: Any, *, chat: bool) -> list[int]:
    """Token ids of prompt + completion as the reward pocket book read its pairs in training
    (TRL's ``RewardTrainer``): with the chat template (``chat``), chat turns through it, a
    plain string as one user or assistant turn; without it, plain prompt + completion with the
    end-of-sequence token appended and the tokenizer's own special tokens (:func:`render`), so
    the score is read at the token it learned on. (TRL's ``GRPOTrainer`` reads plain text
    without them; on a base whose padding is its end-of-sequence token and that adds no
    beginning token, such as SmolLM2, the two agree.) Without ``chat``, a prompt in chat form
    must be one user turn (it then reads as that turn's text, as the pairs read in training);
    a conversation has no plain-text form the reward pocket book saw, and is refused."""
    from adapterkit.training.data import as_chat

    if not chat:
        return render(tokenizer, _plain(prompt, "user"), _plain(completion, "assistant"))
    row = as_chat({"prompt": prompt, "completion": completion})
    text = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _plain(part: Any, role: str) -> str:
    if isinstance(part, str):
        return part
    if len(part) == 1 and part[0].get("role") == role and isinstance(part[0].get("content"), str):
        return str(part[0]["content"])
    raise ConfigError(
        f"the reward pocket book was trained on plain text (--no-chat), and this "
        f"{'prompt' if role == 'user' else 'completion'} is a chat conversation "
        f"({', '.join(m.get('role', '?') for m in part)} turns) with no plain-text form it "
        "was trained on: train the reward pocket book with the chat template (without "
        "--no-chat), or give prompts as plain strings")


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

    The model that scores is exactly the one the reward pocket book was trained as: the base,
    the pocket books it was trained on top of (``--on``, recorded as ``stacked_on``), and it;
    it reads the text as it was trained on it (:func:`scored_ids`), whole — never cut.

    :param base: the loaded base (the policy being trained may already wrap it).
    :param library: where the pocket books ``book`` was trained on top of are found (needed
        only when there are some).
    :param policy: the PEFT policy model wrapping ``base.model``; switched off while scoring.
    """

    def __init__(self, base: Any, book: PocketBook, *, library: Library | None = None,
                 policy: Any = None, batch_size: int = 16) -> None:
        import torch

        from adapterkit.library.integrity import base_structure
        from adapterkit.lora import underlay

        self.check(base, book)
        if book.meta.stacked_on and library is None:
            raise ConfigError(f"{book.ref} was trained on top of "
                              f"{', '.join(book.meta.stacked_on)}: pass library= so that they "
                              "score underneath it, as it was trained")
        below = underlay.below(library, book) if library is not None else []
        self.book, self.base, self.policy = book, base, policy
        self.tokenizer = base.tokenizer
        self.chat = trained_chat(self.tokenizer, book)
        self.batch_size = batch_size
        extra: dict[str, Any] = {}
        self.gate = underlay.Gate(on=False)
        try:  # what it was trained on top of, then it: on together, only while it scores
            underlay.apply(base.model, below, gate=self.gate, structure=base_structure(base),
                           path_name="scoring with a reward pocket book on top of it")
            underlay.apply(base.model, [book], gate=self.gate, extra=extra)
        except BaseException:
            underlay.remove(base.model, gate=self.gate)
            raise
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
    def reads_chat(tokenizer: Any, book: PocketBook) -> bool:
        """Whether ``book`` reads text through the chat template (:func:`trained_chat`)."""
        return trained_chat(tokenizer, book)

    @staticmethod
    def check_room(tokenizer: Any, prompts: list[Any], *, chat: bool, max_new_tokens: int,
                   max_length: int) -> None:
        """Refuse, before any work, prompts whose completions of up to ``max_new_tokens``
        tokens would make the text a reward pocket book reads (:func:`scored_ids`, with
        ``chat`` as it was trained) longer than ``max_length``: it scores the whole text, so
        ``max_length`` bounds prompt + completion, as it bounds the pairs it is trained on."""
        lengths = [len(scored_ids(tokenizer, p, "", chat=chat)) + max_new_tokens
                   for p in prompts]
        over = [i for i, n in enumerate(lengths) if n > max_length]
        if over:
            worst = max(over, key=lambda i: lengths[i])
            raise ConfigError(
                f"{len(over)} of {len(prompts)} prompts with completions of max_new_tokens "
                f"{max_new_tokens} can be longer than --max-length {max_length} tokens as the "
                f"reward pocket book reads them (prompt {worst + 1}: {lengths[worst]}), and it "
                "scores the whole text: raise --max-length to at least "
                f"{lengths[worst]}, or lower max_new_tokens (--set max_new_tokens=N)")

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
        """The reward of each token sequence, read whole."""
        import torch

        from adapterkit.lora import underlay
        from adapterkit.training.metrics import _adapter_off

        off = _adapter_off(self.policy)  # a no-op without a policy
        # No train()/eval() switching here: the backbone is shared with the policy, whose mode
        # belongs to its trainer. Nothing on the scoring path depends on the mode anyway (the
        # policy's LoRA, dropout included, is off; the reward LoRA is a plain hook).
        with torch.no_grad(), off, underlay.suspended(self.base.model, keep=self.gate), \
                self.gate.set(True):
            return rewards(self.model, self.tokenizer, sequences, batch_size=self.batch_size)

    def ids(self, prompt: Any, completion: Any) -> list[int]:
        """The token ids the reward pocket book reads for one pair (:func:`scored_ids`)."""
        return scored_ids(self.tokenizer, prompt, completion, chat=self.chat)

    def score(self, prompts: list[Any], completions: list[Any]) -> list[float]:
        """Reward of each completion of each prompt (strings or chat messages), rendered as
        the reward pocket book was trained: through the chat template, or as plain text
        (``--no-chat``), whichever form the policy generated them in."""
        return self.score_ids([self.ids(p, c) for p, c in zip(prompts, completions)])

    def close(self) -> None:
        """Take the reward pocket book back out of the base."""
        from adapterkit.lora import underlay

        underlay.remove(self.base.model, gate=self.gate)


def reward_of_generations(policy: Any, scorer: RewardScorer, prompts: list[Any], *,
                          chat: bool | None = None, max_new_tokens: int = 32, samples: int = 0,
                          temperature: float = 1.0, seed: int = 0) -> dict[str, float]:
    """Mean reward of answers to ``prompts`` with the policy pocket book off and on.

    ``chat`` (default: when the base has a chat template, as training does) renders prompts
    for generation; the scorer reads them as its reward pocket book was trained.
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
        scores = scorer.score(prompts, answers)
        out[label] = sum(scores) / len(scores)
    return out
