"""On a CPU, project through the LM head only the positions that carry a loss.

TRL's trainers (``SFTTrainer``, ``DPOTrainer``, ``GRPOTrainer``...) compute the loss through
the fused LM head of ``trl.trainer.utils.add_fused_lm_head``: per-token log-probabilities in
vocabulary tiles, without materialising the full logits. It scores *every* position of the
batch except on Triton devices (CUDA, XPU), where it scores only those whose label is not
``-100``; the reason it gives is compilation — elsewhere (Neuron) a varying number of positions
would change the tile shapes on every batch and recompile. A CPU runs the head eagerly: the
shapes cost nothing there, and the positions without a label are pure waste — on the quickstart's
triage chats (prompt tokens carry no loss) most of the batch. Profiled on the embedded base
(``torch.profiler``, one step of 8 rows): the head's tiles of every position were ~4 GB of
allocations per step and the largest transient of the run; scoring only the labelled positions
took the whole ``train sft`` command from 34.7 s to 27.9 s and its peak resident memory from
3.16 GB to 2.30 GB, with the same final loss to the last digit (``benchmarks/bench_train_wall.py``,
one run each: ``benchmarks/results/train_cpu/``).

The two paths are TRL's own: the values at labelled positions are the same computation, and
positions without a label are zero either way (``tests/test_labelled_positions.py`` compares
loss and gradients with transformers' plain cross-entropy over full logits). We change the one
decision, not the kernel: ``trl.trainer.utils`` looks ``_use_triton`` up at call time to choose,
and we wrap it there so that it also says "compact" for a CPU tensor. The wrap is
process-wide, idempotent and left in place (a TRL trainer a caller runs later in the same
process on a CPU scores the same way — the same values, fewer rows; under ``torch.compile`` the
varying row count could recompile, which is why TRL keeps it off elsewhere); it changes nothing
on a GPU. It is private TRL API, so it is applied only where ``add_fused_lm_head``'s source
still reads ``compact = _use_triton(`` — the one use in that module, in TRL 1.16 — and where a
release changes that, :func:`score_only_labelled_positions` returns ``False`` and training goes
on as TRL does it (slower); the test that checks the wrap took effect then fails, so a TRL
upgrade cannot drop the saving silently, nor make it pick a GPU kernel on a CPU.
"""

from __future__ import annotations

from typing import Any

#: Marks our wrapper, so that a second call does not wrap it again.
_MARK = "_adapterkit_labelled_positions"


def score_only_labelled_positions() -> bool:
    """Make TRL's fused LM head score only labelled positions on a CPU too (see the module
    docstring). Returns whether TRL's decision point was found (and is now wrapped)."""
    try:
        from trl.trainer import utils as trl_utils
    except ImportError:  # pragma: no cover - trl is a core dependency
        return False
    decide = getattr(trl_utils, "_use_triton", None)
    if not callable(decide):
        return False
    if getattr(decide, _MARK, False):
        return True
    if not _decides_compact_only(trl_utils):
        return False

    def compact(device: Any) -> bool:
        return getattr(device, "type", None) == "cpu" or bool(decide(device))

    setattr(compact, _MARK, True)
    trl_utils._use_triton = compact  # type: ignore[attr-defined]
    return True


def _decides_compact_only(trl_utils: Any) -> bool:
    """Whether ``_use_triton`` is read in ``trl.trainer.utils`` only to choose the compact path
    of ``add_fused_lm_head`` (a module's other uses would be handed a CPU "yes" too)."""
    import inspect

    try:
        source = inspect.getsource(trl_utils)
    except (OSError, TypeError):
        return False
    uses = source.count("_use_triton(")
    return uses == 1 and "compact = _use_triton(" in source
