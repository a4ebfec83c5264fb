"""Measuring a pocket book: task loss, exact match on generated answers, and forgetting.

The forgetting check is the product's central promise: it measures the loss on general English
text with the pocket book active and with it switched off, on the same resident base (PEFT's
``disable_adapter``), and reports the relative change.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from adapterkit.runtime.generation import generate, render_prompt, uses_chat
from adapterkit.training.data import as_chat

__all__ = ["ScoreFn", "accuracy", "completion_logprob", "completion_logprobs", "exact_match",
           "forgetting", "generate", "preference_accuracy", "render_prompt", "task_loss",
           "text_loss", "uses_chat"]

#: How a generated answer is scored against the reference (a plugin ``Scorer``'s ``score``).
ScoreFn = Callable[[str, str], float]


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the stripped answers are identical."""
    return float(prediction.strip() == reference.strip())


def _answer_logits(model: Any, tokenizer: Any, encoded: list[tuple[list[int], int]],
                   batch_size: int) -> Iterator[tuple[int, Any, Any]]:
    """``(index, answer, logits)`` for each row of ``encoded`` (token ids, answer start): the
    row's index in ``encoded``, its answer tokens ``ids[start:]`` and the float32 logits that
    predict them, one forward per ``batch_size`` rows with right padding and its attention mask.
    On a CPU one forward over eight short texts costs about as much as two over one.

    Only the logits the answers need are computed where the model takes ``logits_to_keep``
    (transformers' causal LMs): those of the positions from a chunk's earliest answer start to
    its latest end, the rows being taken in order of answer start so that the span stays short.
    The LM head over a 49,152-token vocabulary at every prompt position was most of the
    quickstart's held-out ranking."""
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    spans = _keeps_logits(model)
    order = sorted(range(len(encoded)), key=lambda i: encoded[i][1])
    for at in range(0, len(order), batch_size):
        chunk = order[at:at + batch_size]
        width = max(len(encoded[i][0]) for i in chunk)
        ids, mask = _right_padded([encoded[i][0] for i in chunk], pad, width)
        first, kwargs = 0, {}
        if spans:  # position t predicts token t + 1: the answers' tokens from start - 1 on
            first = min(encoded[i][1] for i in chunk) - 1
            kwargs["logits_to_keep"] = torch.arange(first, max(width - 1, first), device=device)
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           **kwargs).logits
        for row, i in enumerate(chunk):
            seq, start = encoded[i]
            # row by row: the float32 copy of one answer's logits, not of the padded batch
            # (three batch-sized copies were the largest transient of a forgetting check)
            predicted = logits[row, start - 1 - first:len(seq) - 1 - first].float()
            yield i, torch.tensor(seq[start:], device=predicted.device), predicted


def _keeps_logits(model: Any) -> bool:
    """Whether ``model``'s forward (a PEFT model's: its base's) takes ``logits_to_keep``."""
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(_base_of(model).forward).parameters
    except (TypeError, ValueError):
        return False


def _token_losses(model: Any, tokenizer: Any, pairs: Iterable[tuple[str, str]],
                  max_length: int, batch_size: int = 8) -> tuple[float, int]:
    """Summed next-token loss over the completion part of (prefix, completion) pairs, batched
    (:func:`_answer_logits`: only the completions' positions are scored)."""
    import torch

    encoded = []
    for prefix, completion in pairs:
        prefix_len = len(tokenizer(prefix, add_special_tokens=False)["input_ids"]) if prefix else 0
        full = tokenizer(prefix + completion, add_special_tokens=False)["input_ids"][:max_length]
        start = max(prefix_len, 1)
        if len(full) > start:
            encoded.append((full, start))
    total, count = 0.0, 0
    for _, answer, predicted in _answer_logits(model, tokenizer, encoded, batch_size):
        total += float(torch.nn.functional.cross_entropy(predicted, answer, reduction="sum"))
        count += len(answer)
    return total, count


def _pairs(tokenizer: Any, rows: list[dict[str, Any]], chat: bool) -> list[tuple[str, str]]:
    pairs = []
    for row in rows:
        if "text" in row:
            pairs.append(("", row["text"]))
            continue
        row = as_chat(row) if chat or "messages" in row else row
        if chat:
            prompt = render_prompt(tokenizer, row["prompt"], chat=True)
            full = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
            pairs.append((prompt, full[len(prompt):] if full.startswith(prompt) else full))
        else:
            pairs.append((row["prompt"], row["completion"]))
    return pairs


def task_loss(model: Any, tokenizer: Any, rows: list[dict[str, Any]], *, chat: bool,
              max_length: int = 1024) -> dict[str, float]:
    """Mean loss (and perplexity) on completions — or on all tokens for ``text`` rows."""
    total, count = _token_losses(model, tokenizer, _pairs(tokenizer, rows, chat), max_length)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


def completion_logprob(model: Any, tokenizer: Any, prompt: str, completion: str) -> float:
    """Summed log-probability of ``completion`` as the assistant's answer to ``prompt``
    (chat-rendered): the quantity DPO's implicit reward is made of."""
    return completion_logprobs(model, tokenizer, [(prompt, completion)])[0]


def completion_logprobs(model: Any, tokenizer: Any, pairs: list[tuple[str, str]],
                        batch_size: int = 8) -> list[float]:
    """:func:`completion_logprob` of each (prompt, completion), batched
    (:func:`_answer_logits`); the vocabulary's log-softmax is taken only at the answers'
    positions."""
    import torch

    encoded = []
    for prompt, completion in pairs:
        text = render_prompt(tokenizer, prompt, chat=True)
        full = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
            tokenize=False)
        start = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        encoded.append((tokenizer(full, add_special_tokens=False)["input_ids"], start))
    sums: list[float] = [0.0] * len(encoded)
    for i, answer, predicted in _answer_logits(model, tokenizer, encoded, batch_size):
        logps = torch.log_softmax(predicted, -1)
        sums[i] = logps.gather(-1, answer[:, None]).sum().item()
    return sums


def preference_accuracy(model: Any, tokenizer: Any, rows: list[dict[str, Any]]
                        ) -> dict[str, float]:
    """How a preference-trained pocket book ranks held-out pairs (DPO's own yardstick).

    ``implicit``: share of pairs whose implicit reward margin
    [(log π − log π_ref)(chosen) − (log π − log π_ref)(rejected)] is above 0, the reference being
    ``model`` with its pocket book off (0% for a fresh pocket book: its margin is exactly 0).
    ``likelihood_before``/``likelihood_after``: share of pairs where the reference / the
    policy gives the chosen answer the higher log-probability.
    """
    pairs = [(row["prompt"], row[k]) for row in rows for k in ("chosen", "rejected")]
    on = completion_logprobs(model, tokenizer, pairs)
    with _adapter_off(model):
        off = completion_logprobs(model, tokenizer, pairs)
    wins = before = after = 0
    for i in range(0, len(pairs), 2):
        wins += (on[i] - off[i]) - (on[i + 1] - off[i + 1]) > 0
        before += off[i] > off[i + 1]
        after += on[i] > on[i + 1]
    n = max(len(rows), 1)
    return {"implicit": wins / n, "likelihood_before": before / n, "likelihood_after": after / n,
            "pairs": len(rows)}


def text_loss(model: Any, tokenizer: Any, texts: list[str], max_length: int = 1024) -> float:
    """Token-weighted mean loss of plain text (the general-English measure)."""
    total, count = _token_losses(model, tokenizer, (("", t) for t in texts), max_length)
    return total / max(count, 1)


def plain_text_loss(model: Any, tokenizer: Any, texts: list[str]) -> float:
    """:func:`text_loss` with the pocket book switched off: the "before" of forgetting."""
    with _adapter_off(model):
        return text_loss(model, tokenizer, texts)


def forgetting(model: Any, tokenizer: Any, texts: list[str], *,
               base_loss: float | None = None, loss: float | None = None) -> dict[str, float]:
    """General-text loss with the pocket book off and on, and the relative change in percent.

    :param base_loss: the plain base's loss on ``texts`` when already known (it is the same
        for every pocket book on that base).
    :param loss: the pocket book's loss on ``texts`` when just measured on these weights.
    """
    base = plain_text_loss(model, tokenizer, texts) if base_loss is None else base_loss
    adapted = text_loss(model, tokenizer, texts) if loss is None else loss
    return {"general_loss_base": base, "general_loss": adapted,
            "general_loss_change_pct": 100.0 * (adapted - base) / base}


def base_loss_note(figures: dict[str, Any]) -> str:
    """What to print beside a forgetting figure whose "before" was read from the cache of an
    earlier run on the same reference (``TrainJob.base_text_loss``), not measured in this one."""
    if figures.get("base_loss_from") == "cache":
        return " [plain base's loss from the cache: measured by an earlier run on this base]"
    return ""


def _adapter_off(model: Any) -> Any:
    return model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()


@contextmanager
def _answering(model: Any) -> Iterator[None]:
    """``model`` in eval mode (no dropout: the weights as they answer), given back in the mode
    it was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _base_of(model: Any) -> Any:
    """The transformers model under a PEFT model (``model`` itself when it is one)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _right_padded(rows: list[list[int]], pad: int, width: int, device: Any = None) -> Any:
    """``(input_ids, attention_mask)`` of ``rows`` right-padded to ``width`` with ``pad``: a
    causal row's positions then see only its own tokens."""
    import torch

    ids = torch.full((len(rows), width), pad, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, device=device)
        mask[i, :len(row)] = 1
    return ids, mask


def accuracy(model: Any, tokenizer: Any, rows: list[dict[str, Any]], *, chat: bool,
             scorer: ScoreFn = exact_match, max_new_tokens: int = 32) -> tuple[float, list[str]]:
    """Mean score of generated answers against the rows' completions, and the answers."""
    prompts = [r["prompt"] for r in rows]
    answers = generate(model, tokenizer, prompts, chat=chat, max_new_tokens=max_new_tokens)
    refs = [r["completion"] if isinstance(r["completion"], str) else r["completion"][-1]["content"]
            for r in rows]
    scores: list[float] = []
    for i, value in enumerate(scorer(a, ref) for a, ref in zip(answers, refs)):
        try:  # a scorer's contract: a number in [0, 1] per answer (a numpy scalar is one)
            number = float(value) if not isinstance(value, (str, bytes)) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        scores.append(number)
        if not (math.isfinite(number) and 0 <= number <= 1):
            from adapterkit.errors import PluginError

            who = getattr(getattr(scorer, "__self__", None), "name", None) or \
                getattr(scorer, "__name__", "the scorer")
            raise PluginError(f"scorer {who!r} returned {value!r:.60} for row {i + 1}, not a "
                              "number in [0, 1]; nothing was reported. Fix the scorer, or "
                              "pick another --scorer")
    return sum(scores) / max(len(rows), 1), answers
