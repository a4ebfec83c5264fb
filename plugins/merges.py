"""Merge strategies: every combination PEFT's ``add_weighted_adapter`` offers, plus
``exact_svd``, adapterkit's own exact low-rank combination.

``exact_svd`` gives the same ΔW as PEFT's ``svd`` at the same rank without ever forming a full
ΔW. The weighted sum of LoRAs is itself a product of two thin matrices,
ΣᵢwᵢsᵢBᵢAᵢ = B·A with B = [w₁s₁B₁ … wₙsₙBₙ] (out × R) and A = [A₁; …; Aₙ] (R × in), so with
QR factorisations B = Q_B R_B and Aᵀ = Q_A R_A, ΔW = Q_B (R_B R_Aᵀ) Q_Aᵀ and its SVD is that of
the small R × R core. Cost O((out + in)·R²) instead of an SVD of every out × in ΔW.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from adapterkit import MergeStrategy, hookimpl

#: The seed of DARE's random drop when the core passes none (a core before ``seed=``).
DEFAULT_SEED = 0


class PeftMerge(MergeStrategy):
    """A strategy that runs PEFT's ``add_weighted_adapter`` with one combination type."""

    def __init__(self, combination: str, description: str, *, density: bool = False,
                 negative: bool = True) -> None:
        self.name = combination
        self.combination = combination
        self.description = description
        self.uses_density = density
        self.uses_rank = combination.endswith("svd")  # PEFT reads svd_rank for these only
        self.uses_seed = combination.startswith("dare")  # DARE's random drop
        self.allows_negative = negative

    def merge(self, *, adapters, weights, rank=None, density=None, base_model=None,
              seed: int | None = None, **_: Any):
        import torch
        from peft import PeftModel, get_peft_model_state_dict

        from adapterkit import ConfigError, MergeOutput, loadable_together

        path = f"merge --method {self.name}"
        factors = [a.factors(path=path) for a in adapters]
        ranks = [{m: f.rank for m, f in layers.items()} for layers in factors]
        if not self.name.endswith(("svd", "cat")) and len(
                {r for layer_ranks in ranks for r in layer_ranks.values()}) > 1:
            raise ConfigError(f"{self.name} adds the LoRA factors themselves, so every layer of "
                              "every pocket book needs the same rank (rank_pattern or different "
                              "r here); use cat, svd or exact_svd")
        names = [f"m{i}" for i in range(len(adapters))]
        with tempfile.TemporaryDirectory() as tmp:
            # factors() above refused any saved bias tensor, so bias="all"/"lora_only" here
            # saves nothing and means "none" — which PEFT needs to load several at once.
            folders = [loadable_together(a, Path(tmp) / name, alone=False)
                       for a, name in zip(adapters, names)]
            model = PeftModel.from_pretrained(base_model(), str(folders[0]),
                                              adapter_name=names[0])
            for name, folder in zip(names[1:], folders[1:]):
                model.load_adapter(str(folder), adapter_name=name)
        # add_weighted_adapter copies the first member's config into the result: its layer
        # filter would drop the other members' layers, so use the union of them all.
        layers = [getattr(model.peft_config[n], "layers_to_transform", None) for n in names]
        union = None if any(ls is None for ls in layers) else sorted(
            {i for ls in layers if ls is not None for i in ([ls] if isinstance(ls, int) else ls)})
        model.peft_config[names[0]].layers_to_transform = union  # type: ignore[attr-defined]
        kwargs: dict[str, Any] = {"combination_type": self.combination}
        if rank is not None:
            kwargs["svd_rank"] = rank
        if density is not None:
            kwargs["density"] = density
        try:
            # DARE drops entries at random from torch's global generator: seeded here (and the
            # caller's random state left as it was), the same merge gives the same weights
            with torch.random.fork_rng():
                torch.manual_seed(DEFAULT_SEED if seed is None else seed)
                model.add_weighted_adapter(names, list(weights), "merged", **kwargs)
        except ValueError as exc:  # PEFT's own checks: equal ranks, matching targets...
            raise ConfigError(f"PEFT cannot merge these with {self.name}: {exc}") from None
        config = model.peft_config["merged"].to_dict()
        config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
        # Every member's scale is inside the merged factors (PEFT multiplies it in), so the
        # result's own scale must be 1: alpha = r, and no rsLoRA copied from the first member.
        config.update(lora_alpha=config["r"], use_rslora=False, rank_pattern={},
                      alpha_pattern={})
        # (save_embedding_layers="auto" would look the base up on the Hub, from a member's
        # base_model_name_or_path, and add the base's own embedding matrices to the result)
        tensors = get_peft_model_state_dict(model, adapter_name="merged",
                                            save_embedding_layers=False)
        return MergeOutput(config, {k: v.detach().cpu() for k, v in tensors.items()})


_PEFT = [
    ("linear", "weighted sum of the LoRA factors (equal ranks)", False),
    ("cat", "concatenated ranks: the exact weighted sum of the deltas", False),
    ("svd", "weighted sum of the deltas, truncated SVD (PEFT computes every full ΔW)", False),
    ("ties", "TIES: trim, elect sign, merge (equal ranks)", True),
    ("ties_svd", "TIES on the deltas, truncated SVD", True),
    ("dare_linear", "DARE random drop and rescale, then linear (equal ranks)", True),
    ("dare_ties", "DARE then TIES (equal ranks)", True),
    ("dare_linear_svd", "DARE then linear on the deltas, truncated SVD", True),
    ("dare_ties_svd", "DARE then TIES on the deltas, truncated SVD", True),
    ("magnitude_prune", "keep the largest-magnitude entries (equal ranks)", True),
    ("magnitude_prune_svd", "magnitude pruning on the deltas, truncated SVD", True),
]


class ExactSVD(MergeStrategy):
    name = "exact_svd"
    description = "same ΔW as svd at the same rank, from the stacked factors (QR + small SVD)"
    uses_rank = True

    def merge(self, *, adapters, weights, rank=None, **_: Any):
        import torch

        from adapterkit import MergeOutput, pad, plain_config, tensors_of

        members = [(a.factors(path="merge --method exact_svd"), w)
                   for a, w in zip(adapters, weights)]
        new_rank = rank or max(f.rank for factors, _ in members for f in factors.values())
        blocks = {}
        modules = sorted(set().union(*(factors.keys() for factors, _ in members)))
        for module in modules:
            parts = [(factors[module], w) for factors, w in members if module in factors]
            dtype = parts[0][0].a.dtype
            # float64: the QR/SVD adds no round-off of its own
            a_cat = torch.cat([f.a.double() for f, _ in parts])  # R x in
            b_cat = torch.cat([f.b.double() * (f.scale * w) for f, w in parts], dim=1)  # out x R
            q_b, r_b = torch.linalg.qr(b_cat)
            q_a, r_a = torch.linalg.qr(a_cat.T)
            u, s, vh = torch.linalg.svd(r_b @ r_a.T)
            k = min(new_rank, s.shape[0])
            new_b = (q_b @ u[:, :k]) * s[:k]
            new_a = vh[:k] @ q_a.T
            # fewer directions than asked: padded so every module has one rank
            new_a, new_b = pad(new_a, new_b, new_rank)
            blocks[module] = (new_a.to(dtype), new_b.to(dtype))
        targets = sorted({m.rsplit(".", 1)[-1] for m in modules})
        return MergeOutput(plain_config(adapters[0].config, rank=new_rank,
                                        target_modules=targets), tensors_of(blocks))


@hookimpl
def register_merge_strategies(register):
    for combination, description, density in _PEFT:
        register(PeftMerge(combination, description, density=density,
                           negative=combination in ("linear", "cat", "svd")))
    register(ExactSVD())
