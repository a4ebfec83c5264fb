"""The forgetting guard: learn the task without losing general English.

Two parts, both working on the one resident base, and both paid for only where they act:

* **A KL anchor.** On every ``kl_every``-th step a chunk of anchor prose (different from the
  text the forgetting check measures) is run with the pocket book on, and the KL divergence
  from the base's next-token distribution to the adapted one is added to the loss, weighted
  ``guard_weight × kl_every``. The base's side does not change while training, so it is
  computed once per chunk with the pocket book switched off — no second copy of the model —
  kept as its top-k tokens plus a rest-of-vocabulary bucket (:class:`BaseTarget`), and cached
  in the library by the run, so a later run on the same reference pays only the student's pass.
* **A budget.** Every ``guard_every`` steps the adapter weights are kept in memory (they are
  small). After training, general-text loss is measured on the final weights — the same
  measurement as the forgetting figure, on the base as inference loads it — and only if they
  exceed ``forgetting_budget`` percent are the kept ones measured, newest first; the first
  within the budget is restored.

Trainer plugins opt in by declaring ``uses_guard = True``, building their transformers/TRL
trainer from :func:`guarded` (``job.guarded(TrainerClass)``: it adds :meth:`ForgettingGuard.penalty`
to the loss) and passing ``job.callbacks`` (which hold :meth:`ForgettingGuard.callback`) to their
loop; the built-in ``sft`` and ``dpo`` trainers do. The core
refuses the guard's options for any other trainer, and records the KL weight only when
:attr:`ForgettingGuard.penalty_calls` shows the term was added.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterkit.training.metrics import _adapter_off, text_loss


@dataclass
class GuardReport:
    """What the guard saw and did, recorded in the pocket book's metrics."""

    checks: list[dict[str, float]] = field(default_factory=list)
    kept_step: int | None = None
    restored: bool = False
    within_budget: bool | None = None


#: The KL term is added on every ``KL_EVERY``-th step, ``KL_EVERY`` times as heavy. Each term is a
#: forward and backward of its own, whose fixed cost (about 0.25 s on 2 CPU cores for
#: SmolLM2-135M, whatever the length) dominates a short anchor chunk. Measured on the quickstart
#: (SmolLM2-135M, lr 1e-3, 30 steps of 8, weight 0.3; general-text loss change, all at 100%
#: held-out accuracy): every step +0.38%, every 2nd +0.46-0.47%, every 3rd +0.55%, every 4th +0.67%
#: (every 4th on 128-token chunks: +0.77%; the full-vocabulary KL on every step: +0.28%). The
#: every-step and every-4th runs had LoRA dropout on in the KL pass; every 2nd with it: +0.44%.
KL_EVERY = 2
#: Base tokens per position the KL term keeps (the rest of the vocabulary is one bucket).
TOP_K = 64
#: Adapter snapshots the budget can fall back to, held at once (see ForgettingGuard.snapshot).
MAX_SNAPSHOTS = 8


@dataclass
class BaseTarget:
    """The base's next-token distribution on one anchor chunk, coarsened to its ``k`` most
    likely tokens per position plus one bucket for the rest of the vocabulary: all the KL
    term needs, and small enough to cache (``k`` × 12 bytes per position, not the vocabulary)."""

    index: Any  # [positions, k] token ids
    logp: Any  # [positions, k] their log-probabilities
    rest: Any  # [positions] log of the probability of every other token

    @classmethod
    def of(cls, logits: Any, k: int) -> BaseTarget:
        """From the base's logits on the chunk (``[positions, vocabulary]``)."""
        logp = logits.float().log_softmax(-1)
        values, index = logp.topk(min(k, logp.shape[-1] - 1), dim=-1)
        rest = logp.scatter(-1, index, float("-inf")).logsumexp(-1)
        return cls(index, values, rest)

    def to(self, device: Any) -> BaseTarget:
        """On ``device`` (the cache holds them on the CPU)."""
        return BaseTarget(self.index.to(device), self.logp.to(device), self.rest.to(device))


def top_k_kl(target: BaseTarget, logits: Any) -> Any:
    """KL(base ‖ adapted) between the two distributions coarsened to ``target``'s top-k tokens
    and one rest-of-vocabulary bucket, averaged over positions.

    Coarsening never raises a KL (so this is at most the full one, and equals it when the base
    puts no mass outside its top-k), and keeps the gradient of the full KL on the tokens the
    base finds likely; the rest bucket still pulls their total mass back.
    """
    import torch

    logp = logits.float().log_softmax(-1)
    top = logp.gather(-1, target.index)
    rest = logp.scatter(-1, target.index, float("-inf")).logsumexp(-1)
    kl = (target.logp.exp() * (target.logp - top)).sum(-1)
    rest_mass = target.rest.exp()
    kl = kl + torch.where(rest_mass > 0, rest_mass * (target.rest - rest), 0.0)
    return kl.mean()


class ForgettingGuard:
    """KL anchor toward the base plus a forgetting budget (see module docstring).

    :param tokenizer: the base's tokenizer.
    :param anchor_texts: prose for the KL term.
    :param general_texts: prose the budget is measured on.
    :param budget_pct: allowed relative rise of general-text loss, in percent (None: no budget).
    :param weight: KL weight (0 disables the KL term).
    :param every: steps between the snapshots the budget can fall back to.
    :param max_length: tokens per anchor chunk.
    :param kl_every: the KL term comes on one optimizer step in ``kl_every``.
    :param top_k: base tokens per position the KL term keeps.
    """

    def __init__(self, tokenizer: Any, *, anchor_texts: list[str], general_texts: list[str],
                 budget_pct: float | None, weight: float, every: int = 10,
                 max_length: int = 128, kl_every: int = KL_EVERY, top_k: int = TOP_K) -> None:
        self.tokenizer = tokenizer
        self.anchor = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_length]
                       for t in anchor_texts if t.strip()]
        self.general_texts = general_texts
        self.budget_pct = budget_pct
        self.weight = weight
        self.every = every
        self.kl_every = kl_every
        self.top_k = top_k
        #: The base's top-k distribution per anchor chunk (index → target); the run fills it
        #: from the library's cache and saves what :meth:`penalty` had to compute.
        self.targets: dict[int, BaseTarget] = {}
        self.targets_computed = 0
        self.targets_loaded = 0
        #: Reads earlier runs' targets into :attr:`targets` when the first KL term is due (the
        #: run sets the library's cache: ``TrainJob.load_anchor_targets``); and where they are.
        self.load_targets: Callable[[ForgettingGuard], int] | None = None
        self.targets_path: Path | None = None
        self.report = GuardReport()
        self._calls = 0
        self._terms = 0
        self._base_loss: float | None = None
        #: General-text loss of the weights last measured (the kept ones after :meth:`finish`).
        self.kept_loss: float | None = None
        self._snapshots: list[tuple[int, dict[str, Any]]] = []

    def penalty(self, model: Any, step: int | None = None) -> Any:
        """The KL term for this batch (a scalar tensor; 0 when disabled or off-schedule).

        Every :attr:`kl_every`-th optimizer step carries the term, weighted ``kl_every`` times
        (the same pull toward the base per step on average); the others pay nothing.

        :param step: the optimizer step: every micro-batch of one step then uses the same
            anchor text and schedule, so gradient accumulation changes only how a step's batch
            is split, not what the guard measures (default: each call counts as a step).
        """
        import torch

        device = next(model.parameters()).device
        at = self._calls if step is None else step
        self._calls += 1
        if self.weight <= 0 or not self.anchor or at % self.kl_every:
            return torch.zeros((), device=device)
        chunk = (at // self.kl_every) % len(self.anchor)
        self._terms += 1
        if self.load_targets is not None:
            self.targets_loaded, self.load_targets = self.load_targets(self), None
        input_ids = torch.tensor([self.anchor[chunk]], device=device)
        was_training = model.training
        # both sides as the model answers: no dropout (a base's own, or LoRA's, whose cost is
        # also saved). Eval mode also skips gradient checkpointing for this one short chunk.
        model.eval()
        try:
            target = self._target(model, chunk, input_ids)
            logits = model(input_ids=input_ids, use_cache=False).logits[0].float()
        finally:
            model.train(was_training)
        return self.weight * self.kl_every * top_k_kl(target, logits)

    def _target(self, model: Any, chunk: int, input_ids: Any) -> BaseTarget:
        """The base's top-k next-token distribution on an anchor chunk: read from the store
        (filled by an earlier run on this reference) or computed once with the book off."""
        import torch

        target = self.targets.get(chunk)
        if target is None:
            with torch.no_grad(), _adapter_off(model):
                logits = model(input_ids=input_ids, use_cache=False).logits[0].float()
            target = BaseTarget.of(logits, self.top_k)
            self.targets[chunk] = target
            self.targets_computed += 1
        return target.to(input_ids.device)

    # -- budget -------------------------------------------------------------------------------

    def snapshot(self, model: Any, step: int) -> None:
        """Keep these adapter weights (on the CPU; under FSDP each rank's shard where it is)
        as a candidate to fall back to. At most :data:`MAX_SNAPSHOTS` are held: past that,
        every other one counting back from the newest is dropped, so the spacing doubles and
        early steps stay reachable."""
        from peft import get_peft_model_state_dict

        weights = {k: v.detach().clone() if type(v).__name__ == "DTensor"  # FSDP: its shard
                   else v.detach().to("cpu", copy=True)
                   for k, v in get_peft_model_state_dict(model).items()}
        self._snapshots.append((step, weights))
        if len(self._snapshots) > MAX_SNAPSHOTS:
            self._snapshots = self._snapshots[::-2][::-1]

    def finish(self, model: Any, step: int, base_loss: float) -> GuardReport:
        """Decide which weights the pocket book keeps, measuring only as far as needed.

        General-text loss is measured on the final weights; when they exceed the budget, the
        snapshots are measured newest first and the first one within it is restored. The
        weights kept are the newest snapshot within the budget, as if every snapshot had been
        checked while training — which would cost a forward over the general text each time.

        :param base_loss: the plain base's loss on the general text, measured the same way.
        """
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        from adapterkit.training.launch import ranks, share

        # one decision for all ranks: the main one's figures (float round-off on other hardware
        # could tip a borderline check the other way, and the ranks would keep different weights)
        self._base_loss = share(base_loss) if ranks().distributed else base_loss
        last = self._check(model, step)
        self.report.kept_step = step
        if self.budget_pct is None:
            return self.report
        if last["general_loss_change_pct"] <= self.budget_pct:
            self.report.within_budget = True
            return self.report
        final = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
        for at, weights in reversed(self._snapshots):
            if at >= step:
                continue
            set_peft_model_state_dict(model, weights)
            if self._check(model, at)["general_loss_change_pct"] <= self.budget_pct:
                self.report.kept_step, self.report.restored = at, True
                self.report.within_budget = True
                return self.report
        set_peft_model_state_dict(model, final)  # none within: the final weights, said so
        self.kept_loss = last["general_loss"]
        self.report.within_budget = False
        return self.report

    def _check(self, model: Any, step: int) -> dict[str, float]:
        """General-text loss of the weights now on ``model``, against the base's."""
        from adapterkit.training.launch import ranks, share

        loss = text_loss(model, self.tokenizer, self.general_texts)
        if ranks().distributed:  # the main one's figure (see finish)
            loss = share(loss)
        assert self._base_loss is not None
        change = 100.0 * (loss - self._base_loss) / self._base_loss
        entry = {"step": step, "general_loss": loss, "general_loss_change_pct": change}
        self.report.checks.append(entry)
        self.kept_loss = loss
        return entry

    @property
    def penalty_calls(self) -> int:
        """How many training batches :meth:`penalty` gave a KL term (0: it never acted)."""
        return self._terms

    @property
    def snapshots(self) -> list[int]:
        """The steps whose weights the budget can fall back to."""
        return [at for at, _ in self._snapshots]

    @property
    def base_loss(self) -> float | None:
        """The plain base's loss on the general text, once given to :meth:`finish`."""
        return self._base_loss

    def callback(self) -> Any:
        """A transformers ``TrainerCallback`` that keeps a :meth:`snapshot` every ``every``
        steps."""
        from transformers import TrainerCallback

        guard = self

        class _GuardCallback(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kwargs):
                if guard.budget_pct is not None and model is not None and \
                        state.global_step % guard.every == 0 and \
                        state.global_step < state.max_steps:  # the final weights are measured
                    guard.snapshot(model, state.global_step)

        return _GuardCallback()


def guarded(trainer_class: type, guard: ForgettingGuard | None) -> type:
    """``trainer_class`` (a transformers or TRL trainer) with the guard's KL term added to its
    training loss — ``trainer_class`` itself when there is no KL term to add.

    The term is a mean over its anchor chunk, like TRL's auxiliary losses, and is scaled for
    gradient accumulation exactly as transformers scales the trainer's own loss (divided by the
    micro-batches when ``compute_loss`` already normalises the loss by the items of the whole
    step, left to the trainer otherwise), so it counts once per optimizer step. DDP's gradient
    averaging already makes it the mean over ranks.
    """
    if guard is None or guard.weight <= 0:
        return trainer_class

    class Guarded(trainer_class):  # type: ignore[valid-type,misc]
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
            if not model.training:
                return result
            # past DDP's wrapper: a second forward through it would confuse its gradient
            # reduction; the KL term's gradient joins the task loss's in the one backward
            penalty = guard.penalty(self.accelerator.unwrap_model(model),
                                    step=self.state.global_step)
            scaled = getattr(self, "loss_is_scaled_for_ga", None)
            if scaled is None:  # transformers' own rule (Trainer.training_step)
                scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) \
                    or self.compute_loss_func is not None
            if scaled:
                penalty = penalty / self.current_gradient_accumulation_steps
            if return_outputs:
                loss, outputs = result
                return loss + penalty, outputs
            return result + penalty

    Guarded.__name__ = Guarded.__qualname__ = f"Guarded{trainer_class.__name__}"
    return Guarded
