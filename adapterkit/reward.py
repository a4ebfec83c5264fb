"""Kept so plugins written against adapterkit 0.1 still import: ``adapterkit.reward``.

New code imports :class:`RewardScorer` from ``adapterkit`` (it lives in
:mod:`adapterkit.training.reward`).
"""

from adapterkit.training.reward import RewardScorer, reward_of_generations

__all__ = ["RewardScorer", "reward_of_generations"]
