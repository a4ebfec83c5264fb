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


def test_the_first_and_final_loss_are_the_first_and_last_steps_losses(tiny_base, adapterkit_data,
                                                                      home, pm):
    """Logged every 5 steps, a run of 8 reported the mean of steps 1-5 as both its first and
    its final loss. Compared with the same run logging every step: the first step's loss, and
    the mean of the steps after the last interval (6-8), as transformers averages a window."""
    import statistics

    def run(name, every):
        return train("sft", base=str(tiny_base), data=str(adapterkit_data["text"]), name=name,
                     home=home, plugins=pm,
                     options=TrainOptions(max_steps=8, batch_size=4, general="off",
                                          forgetting_budget=0, logging_steps=every,
                                          learning_rate=1e-2)).metrics

    every_step = run("each", 1)
    every_five = run("five", 5)
    losses = [loss for _, loss in every_step["loss_history"]]  # [[step, loss], ...]
    assert len(losses) == 8
    assert abs(every_five["train_loss_first"] - losses[0]) < 1e-6
    assert abs(every_five["train_loss_final"] - statistics.mean(losses[5:8])) < 1e-3
