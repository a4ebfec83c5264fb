"""A run shorter than the logging interval still records its loss (it showed "loss -")."""

from __future__ import annotations

from adapterkit import TrainOptions, train


def test_a_run_shorter_than_the_logging_interval_records_its_loss(tiny_base, adapterkit_data,
                                                                  home, pm):
    result = train("sft", base=str(tiny_base), data=str(adapterkit_data["text"]), name="short",
                   home=home, plugins=pm,
                   options=TrainOptions(max_steps=3, batch_size=4, general="off",
                                        forgetting_budget=0, logging_steps=5))
    assert result.metrics["steps"] == 3
    assert result.metrics["train_loss_final"] is not None
