"""Merge strategies: every combination PEFT's ``add_weighted_adapter`` offers, plus
``exact_svd``, adapterkit's own exact low-rank combination.

``exact_svd`` gives the same ΔW as PEFT's ``svd`` at the same rank without ever forming a full
ΔW. The weighted sum of LoRAs is itself a product of two thin matrices,
ΣᵢwᵢsᵢBᵢAᵢ = B·A with B = [w₁s₁B₁ … wₙsₙBₙ] (out × R) and A = [A₁; …; Aₙ] (R × in), so with
QR factorisations B = Q_B R_B and Aᵀ = Q_A R_A, ΔW = Q_B (R_B R_Aᵀ) Q_Aᵀ and its SVD is that of
the small R × R core. Cost O((out + in)·R²) instead of an SVD of every out × in ΔW.
"""

from __future__ import annotations

from typing import Any

from adapterkit import MergeStrategy, hookimpl


class PeftMerge(MergeStrategy):
    """A strategy that runs PEFT's ``add_weighted_adapter`` with one combination type."""

    def __init__(self, combination: str, description: str, *, density: bool = False,
                 negative: bool = True) -> None:
        self.name = combination
        self.combination = combination
        self.description = description
        self.uses_density = density
        self.allows_negative = negative

    def merge(self, *, adapters, weights, rank=None, density=None, base_model=None, **_: Any):
        from peft import PeftModel, get_peft_model_state_dict

        from adapterkit.errors import ConfigError
        from adapterkit import MergeOutput

        names = [f"m{i}" for i in range(len(adapters))]
        model = PeftModel.from_pretrained(base_model(), str(adapters[0].path),
                                          adapter_name=names[0])
        for name, adapter in zip(names[1:], adapters[1:]):
            model.load_adapter(str(adapter.path), adapter_name=name)
        kwargs: dict[str, Any] = {"combination_type": self.combination}
        if rank is not None:
            kwargs["svd_rank"] = rank
        if density is not None:
            kwargs["density"] = density
        try:
            model.add_weighted_adapter(names, list(weights), "merged", **kwargs)
        except ValueError as exc:  # PEFT's own checks: equal ranks, matching targets...
            raise ConfigError(f"PEFT cannot merge these with {self.name}: {exc}") from None
        config = model.peft_config["merged"].to_dict()
        config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
        tensors = get_peft_model_state_dict(model, adapter_name="merged")
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

    def merge(self, *, adapters, weights, rank=None, **_: Any):
        import torch

        from adapterkit import MergeOutput
        from adapterkit.lora.combine import lora_config, lora_pairs, scale_of

        members = [(lora_pairs(a.tensors()), a.config, w) for a, w in zip(adapters, weights)]
        ranks = [max(p["A"].shape[0] for p in pairs.values()) for pairs, _, _ in members]
        new_rank = rank or max(ranks)
        tensors, targets = {}, set()
        paths = sorted(set().union(*(pairs.keys() for pairs, _, _ in members)))
        for path in paths:
            As, Bs = [], []
            for pairs, config, w in members:  # float64: the QR/SVD adds no round-off of its own
                if path in pairs:
                    a, b = pairs[path]["A"].double(), pairs[path]["B"].double()
                    As.append(a)
                    Bs.append(b * (w * scale_of(config, a.shape[0])))
            a_cat, b_cat = torch.cat(As), torch.cat(Bs, dim=1)  # R x in, out x R
            q_b, r_b = torch.linalg.qr(b_cat)
            q_a, r_a = torch.linalg.qr(a_cat.T)
            u, s, vh = torch.linalg.svd(r_b @ r_a.T)
            k = min(new_rank, s.shape[0])
            new_b = (q_b @ u[:, :k]) * s[:k]
            new_a = vh[:k] @ q_a.T
            if k < new_rank:  # fewer directions than asked: pad so every module has one rank
                new_b = torch.cat([new_b, new_b.new_zeros(new_b.shape[0], new_rank - k)], 1)
                new_a = torch.cat([new_a, new_a.new_zeros(new_rank - k, new_a.shape[1])])
            dtype = next(pairs[path]["A"].dtype for pairs, _, _ in members if path in pairs)
            tensors[f"base_model.model.{path}.lora_A.weight"] = new_a.to(dtype).contiguous()
            tensors[f"base_model.model.{path}.lora_B.weight"] = new_b.to(dtype).contiguous()
            targets.add(path.rsplit(".", 1)[-1])
        config = lora_config(adapters[0].config, rank=new_rank, alpha=new_rank,
                             target_modules=sorted(targets))
        return MergeOutput(config, tensors)


@hookimpl
def register_merge_strategies(register):
    for combination, description, density in _PEFT:
        register(PeftMerge(combination, description, density=density,
                           negative=combination in ("linear", "cat", "svd")))
    register(ExactSVD())
