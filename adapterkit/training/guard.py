"""The forgetting guard: learn the task without losing general English.

Two parts, both working on the one resident base, and both paid for only where they act:

* **A KL anchor.** On every ``kl_every``-th step a chunk of anchor prose (different from the
  text the forgetting check measures) is run with the pocket book on, and the KL divergence
  from the base's next-token distribution to the adapted one is added to the loss, weighted
  ``guard_weight × kl_every``. The chunk rides along as one more row of the step's own forward
  (:class:`_Fold`): on a CPU a forward and backward of its own for one 59-token row of
  SmolLM2-135M took about 0.2 s, a fifth of a whole step of 8 rows (per-operation overhead),
  while the row in the batch costs about its share. Where it cannot
  ride along (a chunk longer than the batch, embeddings passed in, packed rows), it gets a
  forward of its own. The base's side does not change while training, so it is computed once
  per chunk with the pocket book switched off — no second copy of the model — in fixed groups
  of chunks, one batched forward per group the run visits, kept as its top-k tokens plus a
  rest-of-vocabulary bucket (:class:`BaseTarget`), and cached in the library by the run, so a
  later run on the same reference pays only the student's side.
* **A budget.** Every ``guard_every`` steps the adapter weights are kept in memory (they are
  small). After training, general-text loss is measured on the final weights — the same
  measurement as the forgetting figure, on the base as inference loads it — and only if they
  exceed ``forgetting_budget`` percent are the kept ones measured, newest first; the first
  within the budget is restored.

Trainer plugins opt in by declaring ``uses_guard = True``, building their transformers/TRL
trainer from :func:`guarded` (``job.guarded(TrainerClass)``: it runs the trainer's loss through
:meth:`ForgettingGuard.with_task`, which adds the KL term) and passing ``job.callbacks`` (which
hold :meth:`ForgettingGuard.callback`: it tells the guard the run's steps) to their loop; the
built-in ``sft`` and ``dpo`` trainers do. A trainer with a loop of its own adds
:meth:`ForgettingGuard.penalty` (a forward of its own) or wraps its loss in ``with_task``. The core
refuses the guard's options for any other trainer, and records the KL weight only when
:attr:`ForgettingGuard.penalty_calls` shows the term was added.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterkit.training.metrics import (
    _adapter_off,
    _answering,
    _base_of,
    _right_padded,
    text_loss,
)


@dataclass
class GuardReport:
    """What the guard saw and did, recorded in the pocket book's metrics."""

    checks: list[dict[str, float]] = field(default_factory=list)
    kept_step: int | None = None
    restored: bool = False
    within_budget: bool | None = None


#: The KL term is added on every ``KL_EVERY``-th step, ``KL_EVERY`` times as heavy. Measured on
#: the quickstart (SmolLM2-135M, lr 1e-3, 30 steps of 8, weight 0.3; general-text loss change,
#: all at 100% held-out accuracy) when each term had a forward of its own: every step +0.38%,
#: every 2nd +0.46-0.47%, every 3rd +0.55%, every 4th +0.67% (the full-vocabulary KL on every
#: step: +0.28%). With the anchor row in the task's forward (benchmarks/bench_train_wall.py, the
#: triage data, 30 steps of 8, 2-core AMD EPYC, one run each; guard off: +5.43%): every 2nd
#: +0.56% at 1.067x the unguarded run's time (a forward of its own: +0.40% at 1.10x), every 3rd
#: +0.57% at 1.037x (1.020x with the base's side cached).
KL_EVERY = 3
#: Base tokens per position the KL term keeps (the rest of the vocabulary is one bucket).
TOP_K = 64
#: Adapter snapshots the budget can fall back to, held at once (see ForgettingGuard.snapshot).
MAX_SNAPSHOTS = 8
#: Anchor chunks per batched forward of the base (their logits are held in float32 at once),
#: and the most memory those logits may take.
TARGET_BATCH = 8
TARGET_BYTES = 256 * 2**20


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
        #: The run's last optimizer step + 1 (``max_steps``; its :meth:`callback` sets it): the
        #: base's side is computed up front for the groups of anchor chunks it will visit.
        self.planned_steps: int | None = None
        #: KL terms that rode on the task's forward (the rest had a forward of their own).
        self.folded = 0
        self._head: Any = False  # the output layer the folded row's logits come from; False:
        # not yet checked against the model's own logits, None: no such layer (or it differs)

    def penalty(self, model: Any, step: int | None = None) -> Any:
        """The KL term for this batch, from a forward of its own (a scalar tensor; 0 when
        disabled or off-schedule). :meth:`with_task` is the same term riding on the task's
        forward.

        Every :attr:`kl_every`-th optimizer step carries the term, weighted ``kl_every`` times
        (the same pull toward the base per step on average); the others pay nothing.

        :param step: the optimizer step: every micro-batch of one step then uses the same
            anchor text and schedule, so gradient accumulation changes only how a step's batch
            is split, not what the guard measures (default: each call counts as a step).
        """
        return self.with_task(model, None, step)[1]

    def with_task(self, model: Any, task: Callable[[], Any] | None,
                  step: int | None = None) -> tuple[Any, Any]:
        """Run ``task`` (the trainer's loss on this batch) with this step's anchor chunk folded
        into its forward as one more row; return its result and the KL term (see
        :meth:`penalty` for the schedule).

        The chunk joins the first forward of the model's decoder that records gradients (a
        reference model's pass, without them, is left alone) and is taken out of its output
        before the trainer sees it, so the task loss and the trainer's metrics are the
        batch's own. The row goes through the step's dropout with the rest of the batch. When
        it cannot join (see :class:`_Fold`), it gets a forward of its own, without dropout.
        """
        import torch

        device = next(model.parameters()).device
        at = self._calls if step is None else step
        self._calls += 1
        if self.weight <= 0 or not self.anchor or at % self.kl_every:
            return (task() if task is not None else None), torch.zeros((), device=device)
        chunk = self._chunk(at)
        self._terms += 1
        if self.load_targets is not None:
            self.targets_loaded, self.load_targets = self.load_targets(self), None
        target = self._target(model, at, device)
        head = self._output_layer(model, self.anchor[chunk], device) if task is not None else None
        result = None
        if task is not None and head is not None:
            fold = _Fold(model, self.anchor[chunk], self._pad_id(), head)
            with fold:
                result = task()
            if fold.logits is not None:
                self.folded += 1
                return result, self._term(target, fold.logits.float())
        input_ids = torch.tensor([self.anchor[chunk]], device=device)
        # both sides as the model answers: no dropout (a base's own, or LoRA's, whose cost is
        # also saved). Eval mode also skips gradient checkpointing for this one short chunk.
        with _answering(model):
            logits = model(input_ids=input_ids, use_cache=False).logits[0].float()
        if task is not None and result is None:
            result = task()
        return result, self._term(target, logits)

    def _output_layer(self, model: Any, chunk: list[int], device: Any) -> Any:
        """The module that turns the decoder's last hidden states into ``model``'s logits —
        checked once per run on an anchor chunk against the model's own logits, both from one
        forward as the fold computes them (a model whose forward does more, such as Gemma's
        softcapping, gets forwards of their own) — or None."""
        import torch

        if self._head is False:
            self._head = None
            head, decoder = _output_layer(model), _decoder(model)
            if head is not None and decoder is not None:
                seen = []
                hook = decoder.register_forward_hook(
                    lambda module, args, output: seen.append(head(output.last_hidden_state)))
                try:
                    with _answering(model), torch.no_grad():
                        theirs = model(input_ids=torch.tensor([chunk], device=device),
                                       use_cache=False).logits
                finally:
                    hook.remove()
                mine = seen[0] if len(seen) == 1 else None
                if mine is not None and mine.shape == theirs.shape and float(
                        (mine.float() - theirs.float()).abs().max()) <= \
                        1e-4 * max(1.0, float(theirs.abs().max())):
                    self._head = head
        return self._head

    def _term(self, target: BaseTarget, logits: Any) -> Any:
        return self.weight * self.kl_every * top_k_kl(target, logits)

    def _chunk(self, step: int) -> int:
        """The anchor chunk the KL term of ``step`` is measured on."""
        return (step // self.kl_every) % len(self.anchor)

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else (self.tokenizer.eos_token_id or 0))

    def _target(self, model: Any, step: int, device: Any) -> BaseTarget:
        """The base's top-k next-token distribution on ``step``'s anchor chunk: read from the
        store (filled by an earlier run on this reference) or computed with the book off, in
        one batched forward for each fixed group of chunks the run visits from here (to
        :attr:`planned_steps`) and has not computed yet (on a CPU one short row's forward
        costs several times its share of a batched one)."""
        chunk = self._chunk(step)
        if chunk not in self.targets:
            end = max(self.planned_steps or 0, step + 1)
            due = {self._chunk(s) for s in range(step, end) if s % self.kl_every == 0} | {chunk}
            # fixed groups of chunks, each padded to the anchor's longest: a chunk's figures do
            # not depend on which others were due (a resume, another max_steps), so the cache
            # holds what a fresh run computes
            size = self._target_batch(model)
            for group in sorted({c // size for c in due if c not in self.targets}):
                self._compute_targets(model, range(group * size,
                                                   min((group + 1) * size, len(self.anchor))),
                                      device)
        return self.targets[chunk].to(device)

    def _target_batch(self, model: Any) -> int:
        """Anchor chunks per batched forward: at most :data:`TARGET_BATCH`, and their float32
        logits within :data:`TARGET_BYTES`."""
        config = getattr(model, "config", None)
        vocabulary = getattr(config, "vocab_size", None) or 1
        per_row = max(len(c) for c in self.anchor) * vocabulary * 4
        return max(1, min(TARGET_BATCH, TARGET_BYTES // per_row))

    def _compute_targets(self, model: Any, chunks: Any, device: Any) -> None:
        import torch

        chunks = [c for c in chunks if c not in self.targets]
        rows = [self.anchor[c] for c in chunks]
        ids, mask = _right_padded(rows, self._pad_id(), max(len(c) for c in self.anchor), device)
        with _answering(model), torch.no_grad(), _adapter_off(model):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        for i, (chunk, row) in enumerate(zip(chunks, rows)):
            self.targets[chunk] = BaseTarget.of(logits[i, :len(row)].float(), self.top_k)
            self.targets_computed += 1

    # -- budget -------------------------------------------------------------------------------

    def snapshot(self, model: Any, step: int) -> None:
        """Keep these adapter weights (on the CPU; under FSDP each rank's shard where it is)
        as a candidate to fall back to. At most :data:`MAX_SNAPSHOTS` are held: past that,
        every other one counting back from the newest is dropped, so the spacing doubles and
        early steps stay reachable."""
        from peft import get_peft_model_state_dict

        weights = {k: v.detach().clone() if type(v).__name__ == "DTensor"  # FSDP: its shard
                   else v.detach().to("cpu", copy=True)
                   # (no Hub look-up of the base, no copy of its embeddings: the LoRA only)
                   for k, v in get_peft_model_state_dict(model,
                                                         save_embedding_layers=False).items()}
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
        final = {k: v.detach().clone() for k, v in get_peft_model_state_dict(
            model, save_embedding_layers=False).items()}
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
        """A transformers ``TrainerCallback`` that tells the guard the run's steps and keeps a
        :meth:`snapshot` every ``every`` steps when there is a budget."""
        from transformers import TrainerCallback

        guard = self

        class _GuardCallback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                guard.planned_steps = state.max_steps

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

    The logged ``loss`` (and so the loss curve and ``train_loss_final``) stays the trainer's own
    task loss, as it would be without the guard; the KL term is logged beside it as
    ``guard_kl``: the mean over the terms of the logging interval (over every rank) of the KL
    divergence itself, before the guard's weight.
    """
    if guard is None or guard.weight <= 0:
        return trainer_class

    class Guarded(trainer_class):  # type: ignore[valid-type,misc]
        _guard_task: Any = None  # this micro-batch's task loss, detached, when a term was added
        _guard_kl: Any = None  # [sum of the interval's KL terms, their count], on the device

        def _scaled_for_ga(self, num_items_in_batch: Any) -> bool:
            scaled = getattr(self, "loss_is_scaled_for_ga", None)
            if scaled is None:  # transformers' own rule (Trainer.training_step)
                scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) \
                    or self.compute_loss_func is not None
            return bool(scaled)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            def task():
                return super(Guarded, self).compute_loss(
                    model, inputs, return_outputs=return_outputs,
                    num_items_in_batch=num_items_in_batch)

            if not model.training:
                return task()
            # the anchor row joins the task's forward (through DDP's wrapper, one reduction);
            # a forward of its own goes past the wrapper, whose gradient reduction a second
            # forward through it would confuse. Either way the KL term's gradient joins the
            # task loss's in the one backward.
            terms = guard.penalty_calls
            result, penalty = guard.with_task(self.accelerator.unwrap_model(model), task,
                                              step=self.state.global_step)
            loss = result[0] if return_outputs else result
            if guard.penalty_calls > terms:  # a term was added: log it apart from the task loss
                self._guard_task = loss.detach()
                kl = penalty.detach() / (guard.weight * guard.kl_every)
                if self._guard_kl is None:
                    self._guard_kl = [kl * 0, 0]
                self._guard_kl[0] = self._guard_kl[0] + kl
                self._guard_kl[1] += 1
            if self._scaled_for_ga(num_items_in_batch):
                penalty = penalty / self.current_gradient_accumulation_steps
            if return_outputs:
                return loss + penalty, result[1]
            return loss + penalty

        def training_step(self, model, inputs, num_items_in_batch=None):
            """The trainer's step (its backward takes task loss + KL term); what it returns
            for the logged loss is the task loss alone, scaled as the trainer scales it."""
            self._guard_task = None
            logged = super().training_step(model, inputs, num_items_in_batch)
            task = self._guard_task
            if task is None:
                return logged
            self._guard_task = None
            if self.args.n_gpu > 1:
                task = task.mean()
            if not self._scaled_for_ga(num_items_in_batch):
                task = task / self.current_gradient_accumulation_steps
            return task.to(logged.device, logged.dtype)

        def log(self, logs, *args, **kwargs):
            if "loss" in logs and self._guard_kl is not None:
                total, count = self._guard_kl
                self._guard_kl = None
                import torch

                both = torch.stack([total.float(), total.new_tensor(float(count))])
                both = self.accelerator.reduce(both, reduction="sum")
                logs["guard_kl"] = float(both[0] / both[1])
            return super().log(logs, *args, **kwargs)

    Guarded.__name__ = Guarded.__qualname__ = f"Guarded{trainer_class.__name__}"
    return Guarded


def _decoder(model: Any) -> Any:
    """``model``'s decoder (the transformer under the LM head), or None."""
    base = _base_of(model)
    return base.get_decoder() if hasattr(base, "get_decoder") else None


def _output_layer(model: Any) -> Any:
    """``model``'s output layer, or None where it has none or it is sharded (FSDP: the head's
    weight is a DTensor outside the forward)."""
    base = _base_of(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if head is None or weight is None or type(weight).__name__ == "DTensor":
        return None
    return head


class _Fold:
    """Adds one anchor chunk as an extra, right-padded row to the first forward of the model's
    decoder that records gradients while it is entered, takes the row back out of the output so
    the caller sees its own batch, and keeps the row's logits (:attr:`logits`: ``head`` of its
    last hidden states, computed inside the model's forward, under its autocast).

    Written here rather than taken from a library: neither transformers nor TRL runs an extra
    row through a step's forward. A forward it cannot extend is left alone (:attr:`logits`
    stays None): one given anything but token ids, an attention mask (2-D) and output flags —
    embeddings, position ids (packed rows), a cache, token type ids —, one that asks for tuples
    or for a mixture of experts' router logits (their load-balancing loss reads the batch's
    mask), and a batch shorter than the chunk. The folded forward keeps no cache.
    """

    #: Keyword arguments a folded forward may carry (other ones: left alone, see above).
    ALLOWED = frozenset({"input_ids", "attention_mask", "use_cache", "output_attentions",
                         "output_hidden_states", "return_dict", "cache_position"})

    def __init__(self, model: Any, chunk: list[int], pad_id: int, head: Any) -> None:
        self.decoder = _decoder(model)
        self.chunk, self.pad_id, self.head = chunk, pad_id, head
        self.logits: Any = None
        self._rows: int | None = None  # the caller's batch size while its forward runs
        self._done = False
        self._hooks: list[Any] = []

    def __enter__(self) -> _Fold:
        if self.decoder is not None:
            self._hooks = [
                self.decoder.register_forward_pre_hook(self._before, with_kwargs=True),
                self.decoder.register_forward_hook(self._after, with_kwargs=True)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for hook in self._hooks:
            hook.remove()

    def _foldable(self, module: Any, args: tuple, kwargs: dict) -> bool:
        import torch

        if self._done or args or not torch.is_grad_enabled():
            return False
        if any(v is not None and v is not False and k not in self.ALLOWED
               for k, v in kwargs.items()):
            return False
        config = getattr(module, "config", None)
        if kwargs.get("return_dict") is False or getattr(config, "return_dict", True) is False \
                or getattr(config, "output_router_logits", False):
            return False
        ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        return ids is not None and ids.dim() == 2 and ids.shape[1] >= len(self.chunk) and (
            mask is None or (mask.dim() == 2 and mask.shape == ids.shape))

    def _before(self, module: Any, args: tuple, kwargs: dict) -> Any:
        import torch

        if not self._foldable(module, args, kwargs):
            return None
        ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
        n = len(self.chunk)
        row = ids.new_full((1, ids.shape[1]), self.pad_id)
        row[0, :n] = torch.tensor(self.chunk, device=ids.device)
        if mask is None:
            mask = torch.ones_like(ids)
        row_mask = mask.new_zeros((1, ids.shape[1]))
        row_mask[0, :n] = 1
        self._done, self._rows = True, ids.shape[0]
        return args, {**kwargs, "input_ids": torch.cat([ids, row]),
                      "attention_mask": torch.cat([mask, row_mask]), "use_cache": False}

    def _after(self, module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
        rows, self._rows = self._rows, None
        if rows is None:
            return None
        if not hasattr(output, "last_hidden_state"):  # refused in _before; never a wrong batch
            raise RuntimeError("the forgetting guard's anchor row was added to a forward whose "
                               "output it cannot take it out of; please report this")
        # here, inside the model's forward: under its autocast, as its own logits are
        self.logits = self.head(output.last_hidden_state[rows, :len(self.chunk)])
        output.last_hidden_state = output.last_hidden_state[:rows]
        for name in ("hidden_states", "attentions"):
            value = getattr(output, name, None)
            if value is not None:
                setattr(output, name, tuple(v[:rows] for v in value))
        return output
