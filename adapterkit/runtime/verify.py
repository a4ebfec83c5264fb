"""``adapterkit verify NAME``: every path a pocket book can take, checked against plain PEFT.

The reference is PEFT itself (``PeftModel.from_pretrained`` on the library folders, through
:func:`adapterkit.runtime.peft_model.peft_model`); each of our own paths — a session swap, a
session stack of the pocket book alone at weight 1, ``stack --flatten`` (saved as a PEFT folder
and loaded back by PEFT) and the merged weights as ``export --merged`` forms them (the same
deltas added to the base in memory; the shard writing itself is checked by the export's own
comparison with PEFT) —
reports its largest logit difference from it, or the true reason it refuses the pocket book.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterkit.errors import AdapterkitError
from adapterkit.library.metadata import CONFIG_FILE, WEIGHTS_FILE
from adapterkit.library.store import Library, PocketBook

PROMPTS = ["The capital of France is", "I have had a headache for three days and",
           "def fibonacci(n):", "Once upon a time"]


@dataclass
class PathResult:
    """One path: its max |logit difference| from PEFT, or why it refuses the pocket book."""

    path: str
    max_logit_diff: float | None = None
    refused: str | None = None
    #: Whose logits hold NaN or ±inf, where any do ("plain PEFT's", "this path's", or both):
    #: then no difference measures a drift.
    not_finite: str | None = None

    def ok(self, tolerance: float) -> bool:
        return self.refused is not None or (self.not_finite is None
                                            and self.max_logit_diff is not None
                                            and self.max_logit_diff <= tolerance)

    def mark(self, tolerance: float) -> str:
        """``ok``, ``DRIFT``, or which logits are not finite numbers."""
        if self.not_finite is not None:
            return f"NOT FINITE ({self.not_finite} logits hold NaN or inf)"
        return "ok" if self.ok(tolerance) else "DRIFT"


@dataclass
class Verification:
    ref: str
    tolerance: float
    results: list[PathResult] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    #: The base the paths were compared on (always full precision: see :func:`verify`).
    checked_on: str = "float32 base"

    @property
    def ok(self) -> bool:
        """No path that accepts the pocket book drifts from PEFT."""
        return all(r.ok(self.tolerance) for r in self.results)

    @property
    def compared(self) -> int:
        """How many paths accepted it and were compared (0: every path refused it)."""
        return sum(r.refused is None for r in self.results)

    def verdict(self) -> str:
        broken = [r for r in self.results if r.not_finite is not None]
        if broken:
            ours = [r.path for r in broken if "this path's" in (r.not_finite or "")]
            peft = any("PEFT" in (r.not_finite or "") for r in broken)
            if peft and not ours:
                return ("plain PEFT's logits are not finite (NaN or inf) while "
                        f"{', '.join(r.path for r in broken)} give numbers: they disagree, "
                        "and PEFT cannot be the yardstick for this pocket book")
            return ("logits not finite (NaN or inf) on " + ", ".join(ours)
                    + ("; plain PEFT's are not finite either: the pocket book's own weights "
                       "(or a stack weight) overflow, not a drift between paths" if peft
                       else ""))
        if not self.ok:
            return f"DRIFT beyond {self.tolerance:g} on some path"
        if not self.compared:
            return ("not verified: every adapterkit path refuses it (reasons above); "
                    "`adapterkit eval`/`generate` use it through PEFT")
        return f"exact on the {self.compared} path(s) that accept it, on the {self.checked_on}"

    def as_dict(self) -> dict[str, Any]:
        return {"tolerance": self.tolerance, "ok": self.ok, "compared": self.compared,
                "versions": self.versions, "checked_on": self.checked_on,
                "paths": {r.path: ({"refused": r.refused} if r.refused is not None
                                   else {"max_logit_diff": r.max_logit_diff,
                                         **({"not_finite": r.not_finite}
                                            if r.not_finite is not None else {})})
                          for r in self.results}}


def verify(library: Library, ref: str, *, tolerance: float = 1e-3, record: bool = True,
           progress: Callable[[str], None] | None = None) -> Verification:
    """Run ``ref`` through every path and compare each with plain PEFT on the same prompts.

    With ``record`` the result goes into the pocket book's metadata (``verification``) and
    its model card.
    """
    import torch

    from adapterkit.base.load import load_base
    from adapterkit.base.resolve import base_spec_for
    from adapterkit.library.integrity import check_book
    from adapterkit.plugin_api.manager import default_plugin_manager
    from adapterkit.runtime.export import check_tolerance
    from adapterkit.runtime.peft_model import members_of, peft_model, quantization_of

    check_tolerance(tolerance)
    say = progress or (lambda m: None)
    book = library.get(ref)
    members = members_of(library, book)
    for item, _ in members:  # before the base loads; with its structure once it has
        check_book(item)
    checked_on = "float32 base"
    quant = quantization_of([item for item, _ in members],
                            library.plugins or default_plugin_manager())
    if quant:
        # a quantized base rounds differently in each path's kernels: compare like with like
        checked_on = f"float32 base (trained on a {quant} one)"
        say(f"Note: checked on the full-precision base; the pocket book was trained on a "
            f"{quant} one, whose kernels add their own rounding")
    spec = base_spec_for(book.meta.base, library.home)
    say(f"Loading base {spec}...")
    base = load_base(spec, home=library.home, dtype=torch.float32)
    batch = base.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    mask = batch["attention_mask"].bool()

    def logits(model: Any) -> Any:
        with torch.no_grad():
            return model(**batch).logits.float()

    say("Plain PEFT (the reference)...")
    reference_model = peft_model(base, book, weights=members)
    reference = logits(reference_model)
    reference_model.unload()
    reference_finite = bool(torch.isfinite(reference[mask]).all())
    result = Verification(book.ref, tolerance, versions=_versions(), checked_on=checked_on)
    for name, run in _paths(library, base, book, members).items():
        say(f"{name}...")
        try:
            out = run(logits)
        except AdapterkitError as exc:
            result.results.append(PathResult(name, refused=str(exc)))
            continue
        finite = bool(torch.isfinite(out[mask]).all())
        whose = [w for w, ok in (("plain PEFT's", reference_finite), ("this path's", finite))
                 if not ok]
        # no difference where either side is not a number (JSON has no NaN: None, not NaN)
        diff = None if whose else float((out - reference).abs()[mask].max())
        result.results.append(PathResult(name, max_logit_diff=diff,
                                         not_finite=" and ".join(whose) or None))
    if record:
        record_verification(library, result)
    return result


def record_verification(library: Library, result: Verification) -> None:
    """Write ``result`` into its pocket book's metadata and card."""
    from adapterkit.library.card import refresh_card

    def change(meta: Any) -> None:
        meta.verification = result.as_dict()

    book = library.update_meta(result.ref, change)
    refresh_card(book.path, book.meta)


def summary(result: Verification) -> str:
    """One line: each path's figure (or refusal), and the verdict."""
    cells = [f"{r.path} refused" if r.refused is not None else
             f"{r.path} not finite" if r.max_logit_diff is None else
             f"{r.path} {r.max_logit_diff:.1e}" for r in result.results]
    return (f"{result.ref} vs plain PEFT (max |logit diff|): {', '.join(cells)} — "
            f"{result.verdict()}")


def _paths(library: Library, base: Any, book: PocketBook,
           members: list[tuple[PocketBook, float]]) -> dict[str, Callable[[Any], Any]]:
    from adapterkit.runtime.session import Session

    # on the float32 base whatever the book was trained on (checked_on records it): the
    # session's own refusal of a 4-bit-trained book there is lifted for this comparison
    def session_swap(logits: Callable[[Any], Any]) -> Any:
        session = Session(base, library, any_quantization=True)
        try:
            session.swap(book.ref)
            return logits(session.model)
        finally:
            session.close()

    def session_stack(logits: Callable[[Any], Any]) -> Any:
        session = Session(base, library, any_quantization=True)
        try:
            session.stack({item.ref: w for item, w in members})
            return logits(session.model)
        finally:
            session.close()

    def flatten(logits: Callable[[Any], Any]) -> Any:
        from peft import PeftModel
        from safetensors.torch import save_file

        from adapterkit.lora.combine import concatenate, inputs_of

        inputs = inputs_of(library, [item for item, _ in members])
        out = concatenate(inputs, [w for _, w in members], path="stack --flatten")
        with tempfile.TemporaryDirectory() as tmp:
            import json

            (Path(tmp) / CONFIG_FILE).write_text(json.dumps(out.config))
            save_file(out.tensors, str(Path(tmp) / WEIGHTS_FILE))
            model = PeftModel.from_pretrained(base.model, tmp, adapter_name="flat")
            try:
                return logits(model)
            finally:
                model.unload()

    def merged(logits: Callable[[Any], Any]) -> Any:
        import torch

        from adapterkit.lora.factors import resident_tensors
        from adapterkit.runtime.export import check_foldable, merged_deltas

        deltas = merged_deltas(members, base_weights=resident_tensors(base.model))
        check_foldable(base.model, deltas)
        saved = {}
        try:
            with torch.no_grad():
                for module, (b, a) in deltas.items():
                    weight = base.model.get_submodule(module).weight
                    saved[module] = weight.detach().clone()
                    weight += (b @ a).to(weight.dtype)
            return logits(base.model)
        finally:
            with torch.no_grad():
                for module, weight in saved.items():
                    base.model.get_submodule(module).weight.copy_(weight)

    return {"session swap": session_swap, "session stack": session_stack,
            "stack --flatten": flatten, "export --merged": merged}


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("adapterkit", "peft", "transformers", "torch")}
