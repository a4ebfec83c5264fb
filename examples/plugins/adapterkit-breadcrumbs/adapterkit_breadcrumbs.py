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
    uses_rank = True

    def merge(self, *, adapters, weights, rank=None, density=None, **_):
        import torch

        from adapterkit import MergeOutput, pad, plain_config, tensors_of

        # factors(): module path → LoRA factors with PEFT's per-layer scale (rank/alpha
        # patterns, rsLoRA); refuses DoRA, modules_to_save... naming the feature.
        members = [(a.factors(path="merge --method breadcrumbs"), w)
                   for a, w in zip(adapters, weights)]
        new_rank = rank or max(f.rank for factors, _ in members for f in factors.values())
        blocks, targets = {}, set()
        for path in sorted(set().union(*(factors.keys() for factors, _ in members))):
            total = None
            for factors, w in members:
                if path not in factors:
                    continue
                f = factors[path]
                delta = (f.b.float() @ f.a.float()) * f.scale
                total = w * _band(delta, density) + (0 if total is None else total)
            u, s, vh = torch.linalg.svd(total, full_matrices=False)
            k = min(new_rank, s.shape[0])
            new_b, new_a = u[:, :k] * s[:k], vh[:k]
            blocks[path] = pad(new_a, new_b, new_rank)  # one rank for every module
            targets.add(path.rsplit(".", 1)[-1])
        config = plain_config(adapters[0].config, rank=new_rank, target_modules=sorted(targets))
        return MergeOutput(config, tensors_of(blocks))


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
