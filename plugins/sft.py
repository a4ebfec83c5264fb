"""The ``sft`` trainer: supervised fine-tuning / instruction tuning on TRL's ``SFTTrainer``.

Reads ``text`` (continued pre-training: loss on every token), ``prompt_completion`` and
``messages`` (loss on the completion / final assistant turn only). TRL does the loop, gradient
accumulation, checkpoints, logging and mixed precision; this plugin only maps adapterkit's
options onto ``SFTConfig`` and, when the job carries a forgetting guard, adds its KL term.
"""

from __future__ import annotations

from typing import Any

from adapterkit import Trainer, hookimpl


class SFT(Trainer):
    name = "sft"
    description = "Supervised fine-tuning / instruction tuning (TRL SFTTrainer)"
    data_shapes = ("text", "prompt_completion", "messages")
    uses_guard = True  # GuardedSFTTrainer adds the guard's KL term (on the guard's schedule)

    def train(self, *, job: Any, **_: Any) -> Any:
        from trl import SFTConfig, SFTTrainer

        guard = job.guard
        opts = job.options

        class GuardedSFTTrainer(SFTTrainer):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                              num_items_in_batch=num_items_in_batch)
                if guard is None or guard.weight <= 0 or not model.training:
                    return result
                # past DDP's wrapper: a second forward through it would confuse its gradient
                # reduction; the KL term's gradient joins the task loss's in the one backward
                penalty = guard.penalty(self.accelerator.unwrap_model(model),
                                        step=self.state.global_step)
                # A mean over this micro-batch, like TRL's MoE aux loss, and treated as TRL
                # treats that: with num_items_in_batch, Trainer leaves gradient accumulation to
                # the loss, so the term is averaged over the accumulated micro-batches (else it
                # would count grad_accum times); DDP's gradient averaging already makes it the
                # mean over ranks, so it is not scaled by the number of processes.
                if num_items_in_batch is not None:
                    penalty = penalty / self.current_gradient_accumulation_steps
                if return_outputs:
                    loss, outputs = result
                    return loss + penalty, outputs
                return result + penalty

        config = SFTConfig(
            **job.training_arguments(),
            max_length=opts.max_length,
            packing=opts.packing,
            completion_only_loss=None,  # TRL: completion-only for prompt/completion rows
            dataset_num_proc=None,
        )
        trainer = GuardedSFTTrainer(
            model=job.model,
            args=config,
            train_dataset=job.train_dataset(),
            eval_dataset=job.eval_dataset(),
            processing_class=job.tokenizer,
            callbacks=job.callbacks,
        )
        job.configure(trainer)
        trainer.train(resume_from_checkpoint=job.resume_from)
        return trainer.state


@hookimpl
def register_trainers(register):
    register(SFT())
