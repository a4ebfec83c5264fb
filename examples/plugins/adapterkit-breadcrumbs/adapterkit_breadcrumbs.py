"""Model Breadcrumbs merging for adapterkit (Davari & Belilovsky, 2023).

Each member's ΔW = scale·B·A is masked, per layer, to keep only a band of magnitudes: the
outliers (largest ``1 - UPPER`` fraction) and the small perturbations (all but ``density`` of
the entries) are dropped; the masked deltas are summed with the weights and truncated back to
a LoRA of rank ``rank`` by SVD.
"""

from __future__ import annotations

from adapterkit import MergeStrategy, hookimpl

ADAPTERKIT_HOOK_VERSION = 1
UPPER = 0.99  # entries above this magnitude quantile are outliers


class Breadcrumbs(MergeStrategy):
    name = "breadcrumbs"
    description = "Model Breadcrumbs: drop outliers and small entries of each ΔW, sum, SVD"
    uses_density = True

    def merge(self, *, adapters, weights, rank=None, density=None, **_):
        import torch

        from adapterkit.lora.combine import MergeOutput, lora_config, lora_pairs, scale_of

        members = [(lora_pairs(a.tensors()), a.config, w) for a, w in zip(adapters, weights)]
        new_rank = rank or max(p["A"].shape[0] for pairs, _, _ in members
                               for p in pairs.values())
        tensors, targets = {}, set()
        for path in sorted(set().union(*(pairs.keys() for pairs, _, _ in members))):
            total = None
            for pairs, config, w in members:
                if path not in pairs:
                    continue
                a, b = pairs[path]["A"].float(), pairs[path]["B"].float()
                delta = (b @ a) * scale_of(config, a.shape[0])
                total = w * _band(delta, density) + (0 if total is None else total)
            u, s, vh = torch.linalg.svd(total, full_matrices=False)
            k = min(new_rank, s.shape[0])
            new_b, new_a = u[:, :k] * s[:k], vh[:k]
            if k < new_rank:
                new_b = torch.cat([new_b, new_b.new_zeros(new_b.shape[0], new_rank - k)], 1)
                new_a = torch.cat([new_a, new_a.new_zeros(new_rank - k, new_a.shape[1])])
            tensors[f"base_model.model.{path}.lora_A.weight"] = new_a.contiguous()
            tensors[f"base_model.model.{path}.lora_B.weight"] = new_b.contiguous()
            targets.add(path.rsplit(".", 1)[-1])
        config = lora_config(adapters[0].config, rank=new_rank, alpha=new_rank,
                             target_modules=sorted(targets))
        return MergeOutput(config, tensors)


def _band(delta, density):
    """Zero the outliers and keep the ``density`` fraction of entries just below them."""
    import torch

    mag = delta.abs().flatten()
    hi = torch.quantile(mag, UPPER) if mag.numel() <= 16_000_000 else mag.max()
    lo = torch.quantile(mag, max(0.0, UPPER - density)) if mag.numel() <= 16_000_000 else 0.0
    keep = (delta.abs() <= hi) & (delta.abs() >= lo)
    return delta * keep


@hookimpl
def register_merge_strategies(register):
    register(Breadcrumbs())
