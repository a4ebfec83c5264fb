"""What a training run is built from: the general text and the eval split, the base in the
precision the method needs, the parent and the pocket books underneath, the new LoRA on top,
and the forgetting guard.

Kept apart from :mod:`adapterkit.training.run` (which orders the steps of a run) so that
:mod:`adapterkit.training.pipeline` checks a whole recipe with the very same pieces.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from adapterkit.errors import ConfigError, DataFormatError
from adapterkit.library.peft_folder import read_config
from adapterkit.library.store import Library, PocketBook
from adapterkit.training.data import Data, general_text_path, read_rows
from adapterkit.training.options import TrainOptions

if TYPE_CHECKING:  # pragma: no cover
    from adapterkit.base.load import Base
    from adapterkit.training.guard import ForgettingGuard

#: The anchor text the forgetting guard keeps the model close to, next to the general text.
ANCHOR_FILE = "anchor.txt"


def general_texts(spec: str) -> list[str]:
    rows, source, _ = read_rows(spec)
    texts = [r["text"] for r in rows if isinstance(r.get("text"), str) and r["text"].strip()]
    if not texts:
        raise DataFormatError(f"{source} has no text rows for a general-text check")
    return texts


def held_out_rows(rows: int, fraction: float) -> int:
    """How many of ``rows`` an eval split of ``fraction`` holds out (:func:`split_eval`)."""
    return max(1, int(rows * fraction)) if fraction > 0 else 0


def split_eval(data: Data, fraction: float, seed: int) -> tuple[Data, Data | None]:
    if fraction <= 0:
        return data, None
    rows = list(data.rows)
    random.Random(seed).shuffle(rows)
    n_eval = held_out_rows(len(rows), fraction)
    if n_eval >= len(rows):
        raise ConfigError(f"eval_split {fraction} leaves no training rows out of {len(rows)}")
    evals, train = rows[:n_eval], rows[n_eval:]
    return (Data(train, data.shape, data.source, data.sha256, data.format, data.columns),
            Data(evals, data.shape, data.source + " [eval split]", data.sha256, data.format))


def check_lengths(tokenizer: Any, job_rows: list[dict[str, Any]], max_length: int,
                  chat: bool) -> None:
    """Refuse a max length that leaves no room for the completion of some prompt."""
    from adapterkit.training.metrics import render_prompt

    for i, row in enumerate(job_rows, 1):
        if "prompt" not in row:
            continue
        prompt = render_prompt(tokenizer, row["prompt"], chat=chat)
        n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if n >= max_length:
            raise ConfigError(
                f"max_length {max_length} is not longer than prompt {i} ({n} tokens): nothing "
                f"of its completion would be trained on. Raise --max-length above {n}"
            )


def load_for_method(base: str | Base, method: Any, library: Library,
                    say: Callable[[str], None], precision: str = "auto") -> Base:
    """The base by name or as given, in the quantization ``method`` needs and the dtype
    ``precision`` picks (:mod:`adapterkit.training.precision`); under a launcher on this rank's
    device, a GGUF base converted once per machine. A base given resident is checked here and
    held in the run's dtype by :func:`adapterkit.training.precision.hold` once every check of
    the run has passed."""
    from adapterkit.base.load import load_base
    from adapterkit.training.launch import fsdp_enabled, main_first, ranks
    from adapterkit.training.precision import name_of, training_dtype

    if not isinstance(base, str):
        if base.quantization != method.quantization:
            raise ConfigError(
                f"method {method.name} needs a {method.quantization or 'full-precision'} base, "
                f"but the base given is {base.quantization or 'full precision'}"
            )
        where = str(base.model.device)
        dtype = training_dtype(precision, where, base.quantization)
        fixed = base.quantization is not None or not where.startswith("cpu")  # not held
        if fixed and precision != "auto" and base_dtype(base) != dtype:
            kind = f"{base.quantization} base" if base.quantization else f"base on {where}"
            raise ConfigError(f"precision {precision} needs the {kind} to compute in "
                              f"{name_of(dtype)}, but it was loaded to compute in "
                              f"{name_of(base_dtype(base))}; load it again with dtype={dtype} "
                              "or train with precision auto")
        return base
    device: str | None = None
    if ranks().distributed:  # each rank on its own GPU (accelerate's choice), or the CPU
        from adapterkit.training.launch import join

        device = str(join().device)
    dtype = training_dtype(precision, device or _default_device(), method.quantization)
    say(f"Loading base {base}" + (f" ({method.quantization})" if method.quantization else "")
        + (f" in {name_of(dtype)}" if name_of(dtype) != "fp32" else "") + "...")
    with main_first(local=True):  # a GGUF base is converted once per machine, not per rank
        loaded = load_base(base, quantization=method.quantization, home=library.home,
                           progress=say, device=device, for_fsdp=fsdp_enabled(), dtype=dtype)
    import torch

    if dtype == torch.bfloat16 and (device or _default_device()) == "cpu" and \
            method.quantization is None:  # inference on a CPU loads it in float32
        loaded.rounded_from = torch.float32
    return loaded


def base_dtype(base: Base) -> Any:
    """The dtype a loaded base computes in (a quantized base: its compute dtype)."""
    return base.dtype if base.dtype is not None else getattr(base.model, "dtype", None)


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_lora_shape(loaded: Base, options: TrainOptions) -> None:
    """Targets and rank against the base's structure, before a LoRA is built on it."""
    from adapterkit.base.load import check_rank, check_targets

    structure = loaded.structure()
    check_rank(structure, check_targets(structure, options.target_modules), options.r)


def parent_of(library: Library, on: str | None, start_from: str | None, *,
              head: str = "causal-lm") -> PocketBook | None:
    """The ``--on``/``--from`` pocket book, checked before anything is loaded: a policy to
    train on top of (``--on``, for every trainer) or to continue (``--from``), and for a
    trainer with a reward ``head`` a reward pocket book to continue (``--from``)."""
    if on and start_from:
        raise ConfigError("--on and --from exclude each other: --on trains a new pocket book "
                          "on top of NAME, --from continues a copy of NAME")
    ref = on or start_from
    if not ref:
        return None
    from adapterkit.library.integrity import check_book
    from adapterkit.lora.underlay import chain, is_reward_book

    book = library.get(ref)
    for below in chain(library, book):  # damaged files are refused before the base loads
        check_book(below)
    refused = parent_refusal(book.ref, reward=is_reward_book(book), copy=bool(start_from),
                             head=head, flag="--")
    if refused:
        raise ConfigError(refused)
    return book


def parent_refusal(ref: str, *, reward: bool, copy: bool, head: str, flag: str) -> str:
    """Why pocket book ``ref`` (a ``reward`` one or a policy) cannot be what a run of a trainer
    with ``head`` trains on (``--on``) or continues (``copy``, ``--from``); '' where it can.
    A policy has no reward head to continue; a reward head generates nothing to train on.

    :param flag: ``"--"`` for the command line (``--from NAME``), ``""`` for a recipe's stage
        (``from: NAME``).
    """
    def key(word: str) -> str:
        return f"--{word}" if flag == "--" else f"{word}:"

    role = key("from" if copy else "on")
    if copy and head == "reward" and not reward:
        return (f"{role} {ref} is a policy pocket book (it generates text, it has no "
                "reward head to continue): name a reward pocket book, or train a new reward "
                f"head on top of it with {key('on')} {ref}")
    if reward and not (copy and head == "reward"):
        return (f"{role} {ref} is a reward pocket book (it scores text, it does not "
                "generate); name a policy pocket book"
                + (f", or continue it with {key('from')} {ref}" if head == "reward"
                   else ""))
    return ""


def options_of(book: PocketBook, options: TrainOptions) -> TrainOptions:
    config = read_config(book.path)
    targets = config.get("target_modules") or options.target_modules
    if isinstance(targets, (list, tuple, set)):
        targets = ",".join(sorted(targets))
    # (PeftModel.from_pretrained takes the dropout from the config too: recorded as trained)
    return replace(options, r=int(config.get("r", options.r)),
                   alpha=int(config.get("lora_alpha", options.alpha)), target_modules=targets,
                   dropout=float(config.get("lora_dropout", options.dropout)))


def underlay_of(library: Library, parent: PocketBook | None, *, copy: bool) -> list[PocketBook]:
    """The frozen pocket books under the new one: the parent's chain (``--on``), or the copied
    pocket book's own underlay (``--from``)."""
    if parent is None:
        return []
    from adapterkit.lora.underlay import chain

    books = chain(library, parent)
    return books[:-1] if copy else books


def attach_new(base: Base, method: Any, options: TrainOptions, *,
                underlay: list[PocketBook] | None = None, start: PocketBook | None = None,
                head: str = "causal-lm") -> Any:
    """Wrap the frozen base with a new trainable pocket book of ``method`` (or a trainable copy
    of ``start``), with ``underlay`` frozen and active underneath."""
    from peft import PeftModel, get_peft_model

    from adapterkit.base.load import check_targets, keep_4bit_layout
    from adapterkit.library.integrity import base_structure, check_book
    from adapterkit.lora import underlay as underlay_mod

    structure = base_structure(base)
    targets = check_targets(structure, options.target_modules)
    keep_4bit_layout(base.model)
    model = method.prepare_base(base.model, gradient_checkpointing=options.gradient_checkpointing)
    underlay_mod.remove(model)  # a base reused across runs starts clean
    underlay_mod.apply(model, list(underlay or []), structure=structure)
    if start is not None:
        check_book(start, structure)
        if head == "reward":  # the copy's score head is PEFT's `modules_to_save`: loaded over
            from adapterkit.training.reward import reward_model  # the new head's random one

            model = reward_model(model, pad_token_id=base.tokenizer.pad_token_id)
        copy = PeftModel.from_pretrained(model, str(start.path), is_trainable=True)
        for config in copy.peft_config.values():  # as trained: a trainer without dropout
            if hasattr(config, "lora_dropout"):     # runs the copy with 0 (options_of)
                config.lora_dropout = options.dropout
        return _for_device(copy)
    config = method.peft_config(target_modules=targets, r=options.r, alpha=options.alpha,
                                dropout=options.dropout)
    import torch

    torch.manual_seed(options.seed)
    if head == "reward":  # a LoRA + scalar head on the same backbone: a PEFT SEQ_CLS adapter
        from adapterkit.training.reward import reward_model

        model = reward_model(model, pad_token_id=base.tokenizer.pad_token_id)
        config.task_type = "SEQ_CLS"
        config.modules_to_save = ["score"]
    elif head != "causal-lm":
        raise ConfigError(f"unknown trainer head {head!r}; trainers declare causal-lm or reward")
    return _for_device(get_peft_model(model, config))


def _for_device(model: Any) -> Any:
    """The new pocket book, made ready for where it trains: on a CPU, TRL's fused LM head
    scores only the positions with a label, as it does on a GPU
    (:mod:`adapterkit.training.labelled_positions`), and :func:`_for_precision`."""
    if model.get_base_model().device.type == "cpu":
        from adapterkit.training.labelled_positions import score_only_labelled_positions

        score_only_labelled_positions()
    return _for_precision(model)


def _for_precision(model: Any) -> Any:
    """A pocket book on a bfloat16 base on a CPU: its weights in float32, attention too, and
    LoRA dropout drawn at a fraction of PyTorch's CPU cost (:mod:`adapterkit.training.dropout`;
    on a GPU, and in float32, training is as it always was: TRL's and PEFT's own handling)."""
    import torch

    from adapterkit.training.dropout import use_cpu_dropout
    from adapterkit.training.precision import prepare

    base = model.get_base_model()
    if getattr(base, "dtype", None) == torch.bfloat16 and base.device.type == "cpu":
        prepare(model)
        use_cpu_dropout(model)
    return model


def guard_requested(options: TrainOptions) -> bool:
    """Whether ``options`` ask for the forgetting guard (a budget, or a KL weight above 0; a
    budget of 0, ``off``, asks for none)."""
    return bool(options.forgetting_budget) or (options.guard_weight or 0) > 0


def applies_guard(trainer: Any) -> bool:
    # a reward head scores text: there is no next-token distribution to hold near the base
    return bool(getattr(trainer, "uses_guard", False)) and \
        getattr(trainer, "head", "causal-lm") != "reward"


def refuse_unapplied_guard(name: str, trainer: Any, options: TrainOptions, *,
                           guarded: list[str] | None = None) -> None:
    """Refuse guard options for a trainer that does not apply the guard, before any work.

    Only a trainer that declares ``uses_guard`` adds the guard's KL term to its loss; accepting
    the options anywhere else would record a guard in the pocket book that never acted.

    :param guarded: the trainers that do apply it, named in the message.
    """
    if guard_requested(options) and not applies_guard(trainer):
        others = f"train with {', '.join(sorted(guarded))}, or " if guarded else ""
        measures = "" if getattr(trainer, "head", "causal-lm") == "reward" else \
            " (--general still measures forgetting)"  # a reward head generates nothing
        raise ConfigError(
            f"the {name} trainer does not apply the forgetting guard (nothing adds its KL term "
            f"to its loss): {others}drop --forgetting-budget/--guard-weight{measures}")


def refuse_what_cannot_act(name: str, trainer: Any, options: TrainOptions,
                           trainers: Iterable[Any]) -> None:
    """Every refusal of options that could not act for ``trainer`` (``options`` with its
    defaults): a guard it does not apply (naming the ``trainers`` that do), then the inert
    ones. One place for ``train``, ``--search`` and a recipe's stages."""
    refuse_unapplied_guard(name, trainer, options,
                           guarded=[t.name for t in trainers if applies_guard(t)])
    refuse_inert_options(name, trainer, options)


def refuse_inert_options(name: str, trainer: Any, options: TrainOptions) -> None:
    """Refuse options that would do nothing for this trainer, before any work (after
    :func:`refuse_unapplied_guard`): ``packing`` for a trainer that does not declare ``packs``,
    ``anchor`` without a guard, ``general`` for a reward head (which generates nothing whose
    forgetting could be measured)."""
    if options.packing and not getattr(trainer, "packs", False):
        raise ConfigError(f"the {name} trainer does not pack sequences: drop --packing "
                          "(packing: false in a recipe's stage)")
    if options.anchor and not guard_requested(options):
        turn_on = ", or turn the guard on (--forgetting-budget)" if applies_guard(trainer) \
            else f" (the {name} trainer applies no guard)"
        raise ConfigError("--anchor is the forgetting guard's anchor text, and this run has no "
                          f"guard: drop --anchor (anchor: null in a recipe's stage){turn_on}")
    if options.general and getattr(trainer, "head", "causal-lm") == "reward":
        raise ConfigError(f"the {name} trainer makes a reward head, which scores text and "
                          "generates none: there is no forgetting on general text to measure; "
                          "drop --general (general: null in a recipe's stage)")


def make_guard(tokenizer: Any, options: TrainOptions) -> ForgettingGuard | None:
    weight = options.guard_weight
    if weight is None:
        weight = DEFAULT_GUARD_WEIGHT if options.forgetting_budget is not None else 0.0
    if weight <= 0 and options.forgetting_budget is None:
        return None
    from adapterkit.training.guard import ForgettingGuard

    anchor = options.anchor or str(general_text_path().with_name(ANCHOR_FILE))
    general = options.general or "general"
    return ForgettingGuard(tokenizer, anchor_texts=general_texts(anchor),
                           general_texts=general_texts(general),
                           budget_pct=options.forgetting_budget, weight=weight,
                           every=options.guard_every)


#: KL weight used with a forgetting budget when none is given. Measured on the quickstart
#: (SmolLM2-135M, lr 1e-3, 30 steps) with the full-vocabulary KL on every step: 0.3 kept 100%
#: held-out accuracy and moved general-text loss by +0.3% (plain run: +5.5%); 1.0 held
#: forgetting at -0.2% but cut accuracy to 48%. With the term as it is now (top-64 tokens, one
#: step in three at three times the weight, riding on the task's forward: guard.KL_EVERY), 0.3
#: gives 100% and +0.57% (bench_train_wall.py, 30 steps).
DEFAULT_GUARD_WEIGHT = 0.3
