"""Pocket books in plain PEFT: what ``eval``/``generate`` run, and the independent reference.

Our own paths (sessions, stacks, flatten, merges, ``export --merged``) read the LoRA factors
themselves for speed and memory. Their checks compare against *this* — PEFT loading the same
folders through ``PeftModel.from_pretrained`` — so a bug in our math can never certify itself.
"""

from __future__ import annotations

from typing import Any

from adapterkit.base.compat import check_base
from adapterkit.library.store import Library, PocketBook


def members_of(library: Library, book: PocketBook, weight: float = 1.0
               ) -> list[tuple[PocketBook, float]]:
    """What ``book`` puts on the base: a stack's members with their weights, and for each
    pocket book trained ``--on`` others those underneath at weight 1 (bottom first)."""
    if book.meta.kind == "stack":
        out: list[tuple[PocketBook, float]] = []
        for ref, w in book.meta.hyperparameters["weights"].items():
            for item, iw in members_of(library, library.get(ref), weight * float(w)):
                if all(item.ref != seen.ref for seen, _ in out):
                    out.append((item, iw))
        return out
    under = [(library.get(ref), 1.0) for ref in book.meta.stacked_on]
    return [*under, (book, weight)]


def peft_model(base: Any, book: PocketBook, *, adapter_name: str = "default",
               force: bool = False, library: Library | None = None,
               weights: list[tuple[PocketBook, float]] | None = None) -> Any:
    """Wrap ``base.model`` with ``book`` as a plain PEFT model (inference mode).

    A pocket book trained ``--on`` others brings its stack back, and a stack its members: all
    are loaded as PEFT adapters and active together (PEFT's multi-adapter support), each
    PEFT-computed scale multiplied by the member's weight (``weights`` overrides the list).
    """
    from peft import PeftModel

    from adapterkit.lora.underlay import refuse_reward

    items = weights or members_of(library or Library(), book)
    for item, _ in items:
        refuse_reward(item)
        check_base(base, item, force=force)
    names = [f"m{i}" for i in range(len(items) - 1)] + [adapter_name]
    model = PeftModel.from_pretrained(base.model, str(items[0][0].path), adapter_name=names[0],
                                      is_trainable=False)
    for (item, _), name in zip(items[1:], names[1:]):
        model.load_adapter(str(item.path), adapter_name=name, is_trainable=False)
    if len(names) > 1:
        model.base_model.set_adapter(names, inference_mode=True)  # type: ignore[operator]
    _weigh(model, dict(zip(names, (w for _, w in items))))
    model.eval()
    return model


def _weigh(model: Any, weights: dict[str, float]) -> None:
    """Multiply PEFT's own per-layer scale of each adapter by its stack weight."""
    from peft.tuners.lora import LoraLayer

    if all(w == 1.0 for w in weights.values()):
        return
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name, w in weights.items():
                if name in module.scaling:
                    module.scaling[name] *= w
