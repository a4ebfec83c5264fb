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
    assert result.metrics["loss_logs"] == 1  # (shown as one logged value, not "A → A")
    card = (result.pocket_book.path / "README.md").read_text()
    assert "train loss (one logged value)" in card and "train loss first" not in card


def test_the_final_loss_covers_the_last_steps(tiny_base, adapterkit_data, home, pm):
    """Logged every 5 steps, a run of 8 reported the mean of steps 1-5 as both its first and
    its final loss. Compared with the same run logging every step: the first window (steps
    1-5) and the steps after it (6-8), each averaged as transformers averages a window."""
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
    assert abs(every_five["train_loss_first"] - statistics.mean(losses[0:5])) < 1e-3
    assert abs(every_five["train_loss_final"] - statistics.mean(losses[5:8])) < 1e-3
    assert every_five["loss_logs"] == 2 and every_step["loss_logs"] == 8
