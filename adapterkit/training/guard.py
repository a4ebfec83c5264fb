"""The forgetting guard: learn the task without losing general English.

Two parts, both working on the one resident base:

* **A KL anchor.** Every step, a chunk of anchor prose (different from the text the forgetting
  check measures) is run twice: with the pocket book switched off (no grad) and on. The KL
  divergence from the base's next-token distribution to the adapted one is added to the loss,
  weighted by ``guard_weight``. The base keeps defining what "general English" means, at the
  cost of one extra forward/backward pass on a short chunk — no second copy of the model.
* **A budget.** Every ``guard_every`` steps, general-text loss is measured with the pocket book
  on and off. The newest adapter weights within ``forgetting_budget`` percent are kept in memory
  (they are small); if the final weights exceed the budget, those are restored at the end.

Trainer plugins opt in by declaring ``uses_guard = True``, adding
:meth:`ForgettingGuard.penalty` to their loss and passing ``job.callbacks`` (which hold
:meth:`ForgettingGuard.callback`) to their loop; the built-in ``sft`` trainer does. The core
refuses the guard's options for any other trainer, and records the KL weight only when
:attr:`ForgettingGuard.penalty_calls` shows the term was added.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from adapterkit.training.metrics import _adapter_off, plain_text_loss, text_loss


@dataclass
class GuardReport:
    """What the guard saw and did, recorded in the pocket book's metrics."""

    checks: list[dict[str, float]] = field(default_factory=list)
    kept_step: int | None = None
    restored: bool = False
    within_budget: bool | None = None


class ForgettingGuard:
    """KL anchor toward the base plus a forgetting budget (see module docstring).

    :param tokenizer: the base's tokenizer.
    :param anchor_texts: prose for the KL term.
    :param general_texts: prose the budget is measured on.
    :param budget_pct: allowed relative rise of general-text loss, in percent (None: no budget).
    :param weight: KL weight (0 disables the KL term).
    :param every: steps between budget checks.
    :param max_length: tokens per anchor chunk.
    """

    def __init__(self, tokenizer: Any, *, anchor_texts: list[str], general_texts: list[str],
                 budget_pct: float | None, weight: float, every: int = 10,
                 max_length: int = 128) -> None:
        self.tokenizer = tokenizer
        self.anchor = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_length]
                       for t in anchor_texts if t.strip()]
        self.general_texts = general_texts
        self.budget_pct = budget_pct
        self.weight = weight
        self.every = every
        self.report = GuardReport()
        self._step = 0
        self._base_loss: float | None = None
        #: How the plain base's loss is obtained: ``cached(compute)``; the run sets one that
        #: reads and fills the library's cache (:meth:`TrainJob.base_text_loss`).
        self.cached: Any = lambda compute: compute()
        self._kept: dict[str, Any] | None = None

    def penalty(self, model: Any, step: int | None = None) -> Any:
        """The KL term for this batch (a scalar tensor; 0 when disabled).

        :param step: the optimizer step: every micro-batch of one step then uses the same
            anchor text, so gradient accumulation changes only how a step's batch is split,
            not what the guard measures (default: a new anchor text on every call).
        """
        import torch
        import torch.nn.functional as F

        if self.weight <= 0 or not self.anchor:
            return torch.zeros((), device=next(model.parameters()).device)
        ids = self.anchor[(self._step if step is None else step) % len(self.anchor)]
        self._step += 1
        input_ids = torch.tensor([ids], device=next(model.parameters()).device)
        with torch.no_grad(), _adapter_off(model):
            base = F.log_softmax(model(input_ids=input_ids).logits.float(), dim=-1)
        adapted = F.log_softmax(model(input_ids=input_ids).logits.float(), dim=-1)
        kl = F.kl_div(adapted, base, log_target=True, reduction="none").sum(-1).mean()
        return self.weight * kl

    # -- budget -------------------------------------------------------------------------------

    def check(self, model: Any, step: int) -> dict[str, float]:
        """Measure general-text loss now; remember these weights if within budget."""
        from peft import get_peft_model_state_dict

        was_training = model.training
        model.eval()
        if self._base_loss is None:
            self._base_loss = self.cached(
                lambda: plain_text_loss(model, self.tokenizer, self.general_texts))
        loss = text_loss(model, self.tokenizer, self.general_texts)
        if was_training:
            model.train()
        from adapterkit.training.launch import ranks, share

        if ranks().distributed:  # one decision for all ranks: the main one's figures (float
            # round-off on other hardware could tip a borderline check the other way, and the
            # ranks would keep different weights)
            self._base_loss, loss = share((self._base_loss, loss))
        change = 100.0 * (loss - self._base_loss) / self._base_loss
        entry = {"step": step, "general_loss": loss, "general_loss_change_pct": change}
        self.report.checks.append(entry)
        if self.budget_pct is not None and change <= self.budget_pct:
            self._kept = {k: v.detach().clone()
                          for k, v in get_peft_model_state_dict(model).items()}
            self.report.kept_step = step
        return entry

    def finish(self, model: Any, step: int) -> GuardReport:
        """Final check; restore the newest in-budget weights if the final ones exceed it."""
        from peft import set_peft_model_state_dict

        if self.report.checks and self.report.checks[-1]["step"] == step:
            last = self.report.checks[-1]
        else:
            last = self.check(model, step)
        if self.budget_pct is None:
            return self.report
        within = last["general_loss_change_pct"] <= self.budget_pct
        if not within and self._kept is not None:
            set_peft_model_state_dict(model, self._kept)
            self.report.restored = True
            within = True
        self.report.within_budget = within
        return self.report

    @property
    def penalty_calls(self) -> int:
        """How many training batches :meth:`penalty` gave a KL term (0: it never acted)."""
        return self._step

    @property
    def base_loss(self) -> float | None:
        """The plain base's loss on the general text, once measured."""
        return self._base_loss

    def callback(self) -> Any:
        """A transformers ``TrainerCallback`` that runs :meth:`check` every ``every`` steps."""
        from transformers import TrainerCallback

        guard = self

        class _GuardCallback(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kwargs):
                if guard.budget_pct is not None and model is not None and \
                        state.global_step % guard.every == 0:
                    guard.check(model, state.global_step)

        return _GuardCallback()
