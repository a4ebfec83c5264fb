"""RLHF: a ``reward`` trainer (reward pocket books) and the ``rlhf`` trainer (online RL).

``reward`` trains a reward pocket book — a LoRA plus a scalar head on the same base — from
preference pairs with TRL's ``RewardTrainer`` (Bradley-Terry loss: chosen scores above rejected).

``rlhf`` optimises a policy pocket book online with TRL's ``GRPOTrainer`` (TRL 1.x has GRPO and
RLOO; PPO is gone): for each prompt it samples a group of completions, scores them with the
reward pocket book, and pushes the policy toward the better ones, with a KL penalty (``beta``)
to the policy before this stage — the plain base, or the base with the ``--on`` pocket books.
Without ``--reward NAME`` it first trains the reward pocket book ``NAME-reward`` from the same
preference file, on the same resident base, then takes the file's prompts for the online stage.

One copy of the base weights serves all three roles: the policy is a LoRA on it, the reference
is that LoRA switched off, and the reward pocket book is folded into the same layers, switched
on only while it scores (``adapterkit.RewardScorer``). It scores as it was trained: with the
pocket books it was trained on top of underneath, through the chat template or as plain text as
its training recorded (whichever way the policy renders its prompts), and the whole text — so
``--max-length`` must hold each prompt with ``max_new_tokens`` of completion, as the reward
pocket book reads them, or the run is refused before it starts.

``rlhf`` options (``--set KEY=VALUE``): :class:`RLHFOptions`. ``reward`` takes none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from adapterkit import Trainer, hookimpl

if TYPE_CHECKING:  # pragma: no cover
    from adapterkit import TrainOptions


@dataclass
class RLHFOptions:
    """``adapterkit train rlhf --set KEY=VALUE`` (or a recipe's ``trainer_options:``)."""

    #: A reward pocket book to optimise against (the same as ``--reward``); without one, the
    #: reward pocket book ``NAME-reward`` is trained first from the preference file.
    reward: str | None = None
    #: Weight of the KL penalty to the policy before this stage (TRL's ``beta``); ≥ 0.
    beta: float = 0.05
    #: Completions sampled per prompt, compared with each other; at least 2, and
    #: ``--batch-size`` a multiple of it.
    num_generations: int = 4
    #: Tokens generated per completion; at least 1.
    max_new_tokens: int = 32
    #: Sampling temperature of the completions; above 0.
    temperature: float = 1.0
    #: Steps of the reward stage (default: the run's ``--max-steps``/epochs).
    reward_steps: int | None = None

    def check(self, options: TrainOptions) -> list[str]:
        """Value ranges, and whole groups of completions per step, one line per problem."""
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens is {self.max_new_tokens}: online RL learns from "
                            "generated text, so it must generate at least 1 token")
        if self.num_generations < 2:
            problems.append("num_generations must be at least 2: GRPO compares completions "
                            "of the same prompt with each other")
        elif options.batch_size % self.num_generations:
            problems.append(f"--batch-size {options.batch_size} must be a multiple of "
                            f"num_generations {self.num_generations} (whole groups per step)")
        if self.beta < 0:
            problems.append(f"beta must be ≥ 0, got {self.beta}")
        if not self.temperature > 0:
            problems.append(f"temperature must be above 0, got {self.temperature}")
        if self.reward and self.reward_steps is not None:
            problems.append(f"reward_steps {self.reward_steps} sets the length of the reward "
                            f"stage, and --reward {self.reward} skips that stage: drop one")
        if self.reward_steps is not None and self.reward_steps < 1:
            problems.append(f"reward_steps must be at least 1, got {self.reward_steps} (leave "
                            "it out to use the run's --max-steps/epochs)")
        return problems


class Reward(Trainer):
    name = "reward"
    description = "Reward pocket book: LoRA + scalar head from preference pairs (TRL RewardTrainer)"
    data_shapes = ("preference",)
    head = "reward"
    drops_out = False  # RewardConfig's disable_dropout (its default) switches LoRA dropout off

    def train(self, *, job: Any, **_: Any) -> Any:
        from trl import RewardConfig, RewardTrainer

        config = RewardConfig(**job.training_arguments(), max_length=job.options.max_length)
        trainer = RewardTrainer(model=job.model, args=config, train_dataset=job.train_dataset(),
                                eval_dataset=job.eval_dataset(), processing_class=job.tokenizer,
                                callbacks=job.callbacks)
        _refuse_dropped_pairs(trainer, job)
        job.configure(trainer)
        trainer.train(resume_from_checkpoint=job.resume_from)
        accuracy = [h["accuracy"] for h in trainer.state.log_history if "accuracy" in h]
        if accuracy:
            trainer.state.adapterkit_metrics = {"pair_accuracy_last_log": accuracy[-1]}  # type: ignore[attr-defined]
        return trainer.state


def _refuse_dropped_pairs(trainer: Any, job: Any) -> None:
    """TRL's RewardTrainer leaves out, as it prepares them, the pairs whose chosen or rejected
    text (with the prompt) is longer than ``max_length``: training on what is left without a
    word would record every pair as trained on (and with none left, TRL fails on an empty
    sampler). Refused instead, before any step, saying how many and what to do."""
    from adapterkit import ConfigError

    for split, given in (("training", job.data), ("held-out", job.eval_data)):
        prepared = trainer.train_dataset if split == "training" else trainer.eval_dataset
        if given is None or prepared is None:
            continue
        total, kept = len(given.rows), len(prepared)
        if kept < total:
            raise ConfigError(
                f"{total - kept} of {total} {split} preference pairs are longer than "
                f"--max-length {job.options.max_length} tokens (prompt and answer), and the "
                "reward trainer (TRL's RewardTrainer) would leave them out: raise --max-length, "
                "or shorten or remove those pairs")


def _prompts(job: Any) -> Any:
    from datasets import Dataset

    seen: dict[str, Any] = {}
    for row in job.rows(job.data):
        seen.setdefault(repr(row["prompt"]), row["prompt"])
    return Dataset.from_list([{"prompt": p} for p in seen.values()])


class RLHF(Trainer):
    name = "rlhf"
    description = "Online RL (TRL GRPO) against a reward pocket book, KL to the base"
    data_shapes = ("preference", "prompt_completion", "prompt")  # (prompts are what it reads)
    options = RLHFOptions
    reuse_option = "reward"  # (the NAME-reward pocket book also_saves names, kept and reused)
    reuse_drops = ("reward_steps", "eval_split", "early_stopping")  # (its reward stage's)
    evaluates = False  # GRPO runs no evaluation: --eval-split serves the reward stage only

    def preflight(self, *, library: Any, name: str, options: Any, trainer_options: Any,
                  data: Any) -> None:
        """Before the base loads: the reward pocket book named exists and is one; without
        one, the data has pairs to train it on (adapterkit refuses a taken ``NAME-reward``
        itself: :meth:`also_saves`)."""
        from adapterkit import ConfigError, RewardScorer

        o: RLHFOptions = trainer_options
        if o.reward:
            RewardScorer.check_kind(library.get(o.reward))  # its base: once the base is loaded
            if options.eval_split:
                raise ConfigError("--eval-split holds out pairs to evaluate the reward pocket "
                                  "book rlhf trains first; with --reward there is none, and "
                                  "the policy is not evaluated: drop --eval-split")
            return
        if data.shape != "preference":
            raise ConfigError("rlhf without --reward first trains a reward pocket book from "
                              "preference pairs: give a prompt/chosen/rejected file, or "
                              "--reward NAME")
        # (a taken NAME-reward is refused by adapterkit itself, from also_saves)

    def also_saves(self, *, name: str, trainer_options: Any) -> list[str]:
        """Without a ``reward``, the reward pocket book it trains first (:meth:`train`)."""
        return [] if trainer_options.reward else [_reward_name(name)]

    def train(self, *, job: Any, **_: Any) -> Any:
        from dataclasses import replace

        from trl import GRPOConfig, GRPOTrainer

        from adapterkit import Library, RewardScorer

        o: RLHFOptions = job.trainer_options
        library = Library(job.home)
        dataset = _prompts(job)
        if len(dataset) < len(job.data.rows):  # the row count said so far is the file's
            job.say(f"The policy samples answers for the {len(dataset)} distinct prompts of "
                    f"the {len(job.data.rows)} rows.")

        def check_room(chat: bool) -> None:  # the reward pocket book reads the whole text
            RewardScorer.check_room(job.tokenizer, [r["prompt"] for r in dataset], chat=chat,
                                    max_new_tokens=o.max_new_tokens,
                                    max_length=job.options.max_length)

        if o.reward:
            book = library.get(o.reward)
            RewardScorer.check(job.base, book)  # before any work: right kind, right base
            check_room(RewardScorer.reads_chat(job.tokenizer, book))
        else:  # (its data and name were checked before the base loaded: preflight)
            check_room(job.chat)  # as the stage will read it: with the run's chat setting
            stage_name = _reward_name(job.name)
            # (the policy's epochs are resolved already: its min_steps acted there; a reward
            # head measures no forgetting on general text)
            # (reward_steps sets the stage's length: the policy's epochs would do nothing)
            # (the policy's --dropout is the policy's: a reward head trains without dropout)
            stage_options = replace(job.options, trainer_options={}, forgetting_budget=0,
                                    dropout=0.0,
                                    guard_weight=None, min_steps=None, general=None,
                                    max_steps=o.reward_steps or job.options.max_steps,
                                    epochs=None if o.reward_steps else job.options.epochs)
            book = job.train_stage("reward", name=stage_name, options=stage_options).pocket_book
        job.options.trainer_options["reward"] = book.ref  # recorded with the policy

        # the reward model exactly as trained: its underlay, its chat setting, the whole text
        scorer = RewardScorer(job.base, book, library=library, policy=job.model)

        def reward_book(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
            return scorer.score(prompts, completions)

        args = job.training_arguments()
        args.update(include_num_input_tokens_seen="no",  # GRPO counts its own tokens
                    remove_unused_columns=False, eval_strategy="no", eval_steps=None)
        config = GRPOConfig(**args, beta=o.beta, num_generations=o.num_generations,
                            max_completion_length=o.max_new_tokens, temperature=o.temperature)
        trainer = GRPOTrainer(model=job.model, reward_funcs=[reward_book], args=config,  # type: ignore[list-item]
                              train_dataset=dataset, processing_class=job.tokenizer,
                              callbacks=job.callbacks)
        job.configure(trainer)
        try:
            trainer.train(resume_from_checkpoint=job.resume_from)
        finally:
            scorer.close()
            if "ref" in job.model.peft_config:  # GRPO's frozen copy of the starting adapter
                job.model.delete_adapter("ref")
                job.model.set_adapter("default")
        rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
        trainer.state.adapterkit_metrics = {  # type: ignore[attr-defined]
            "reward_book": book.ref,
            "reward_first_log": rewards[0] if rewards else None,
            "reward_last_log": rewards[-1] if rewards else None,
        }
        return trainer.state


@hookimpl
def register_trainers(register):
    register(Reward())
    register(RLHF())


def _reward_name(name: str) -> str:
    """The name of the reward pocket book a run of ``name`` (``NAME`` or ``NAME@N``) without
    ``reward`` trains first: ``NAME-reward``."""
    return name.split("@")[0] + "-reward"
