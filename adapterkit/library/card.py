"""Model cards and loss curves for pocket books.

The card is built with ``huggingface_hub``'s card tools so that its YAML header is what the Hub
expects (``base_model``, ``library_name: peft``, ``pipeline_tag``, ``tags``, ``datasets``,
``license``), and its body tells a colleague what the pocket book is: which base (and whether it
fits theirs), what data, what method, and how well it did — forgetting included.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from adapterkit.files import atomic_write_text
from adapterkit.library.metadata import PocketBookMeta

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

An adapterkit pocket book: a LoRA adapter for **{{ base_label }}**, stored as a standard PEFT
folder (`adapter_config.json` + `adapter_model.safetensors`).

## Base

{{ base_section }}

## How it was made

{{ made_section }}

## Results

{{ results_section }}

## Use it

{{ use_section }}

or with adapterkit: `adapterkit pull …` / `adapterkit generate --adapter {{ name }} "…"`.
"""


def base_id(meta: PocketBookMeta) -> str | None:
    """The Hub id a colleague would load as the base, where one is known."""
    prov = meta.base.get("provenance", {})
    return prov.get("hub_id") or prov.get("derived_from")


def config_base(meta: PocketBookMeta) -> str:
    """What ``base_model_name_or_path`` says in the pocket book's ``adapter_config.json``: the
    card's ``base_model`` where there is one, else the base's name — never a local path, which
    means nothing on another machine (as trained pocket books write it)."""
    return base_id(meta) or str(meta.base.get("name", ""))


def _base_section(meta: PocketBookMeta) -> str:
    prov = meta.base.get("provenance", {})
    lines = [f"- name: `{meta.base.get('name', '?')}`",
             f"- adapterkit fingerprint: `{meta.base_fingerprint}`"]
    if prov.get("kind") == "hub":
        lines.append(f"- Hugging Face: `{prov['hub_id']}` at revision `{prov.get('revision')}`")
    elif prov.get("kind") == "gguf":
        lines.append(f"- GGUF file `{prov.get('file')}` (sha256 `{prov.get('sha256')}`), "
                     "dequantized to float32")
        if prov.get("package"):
            lines.append(f"- shipped in the Python package `{prov['package']}`")
        if prov.get("derived_from"):
            lines.append(f"- a quantized copy of `{prov['derived_from']}`: the adapter was trained "
                         "on these dequantized weights, which differ slightly from the original")
    else:
        lines.append(f"- a local model folder `{prov.get('folder', '?')}` "
                     "(identified by the fingerprint above)")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


#: Requested guard settings: the results report the guard as it acted (metrics ``guard``),
#: never as it was asked for.
_GUARD_OPTIONS = ("forgetting_budget", "guard_weight")


def _maker(meta: PocketBookMeta) -> str:
    """What made a pocket book that no trainer made: a merge, a stack, an import, a pull."""
    source = meta.source or {}
    members = ", ".join(f"`{p}`" for p in meta.parents)
    kind = source.get("kind")
    if kind == "merge":
        return f"none (merge `{source.get('method', '?')}` of {members})"
    if kind == "stack":
        flat = "flattened " if meta.hyperparameters.get("flattened") else ""
        return f"none ({flat}stack of {members})"
    if kind == "hub":
        return f"none (pulled from `{source.get('repo_id', '?')}`)"
    if kind == "import":
        return "none (imported)"
    return "none"


def _made_section(meta: PocketBookMeta) -> str:
    trainer = f"`{meta.trainer}`" if meta.trainer else _maker(meta)
    lines = [f"- method: `{meta.method}`", f"- trainer: {trainer}"]
    if meta.data:
        lines.append(f"- data: {meta.data.get('description', '?')}, shape "
                     f"`{meta.data.get('shape', '?')}`, sha256 `{meta.data.get('sha256', '?')}`")
    if meta.parents:
        lines.append(f"- parents: {', '.join(f'`{p}`' for p in meta.parents)}")
    if meta.stacked_on:
        lines.append(f"- trained on top of (frozen, active underneath): "
                     f"{', '.join(f'`{p}`' for p in meta.stacked_on)}")
    if meta.hyperparameters:
        lines += ["", "| hyperparameter | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in sorted(meta.hyperparameters.items())
                  if v not in (None, {}, []) and k not in _GUARD_OPTIONS]
        notes = _scale_notes(meta.hyperparameters)
        lines += ["", *(f"- {note}" for note in notes)] if notes else []
    lines += _pipeline_lines(meta.pipeline)
    tracked = tracking_lines(meta.tracking)
    if tracked:
        lines += ["", "Tracked while training (`--report-to`):", "",
                  *(f"- {line}" for line in tracked)]
    return "\n".join(lines)


def _scale_notes(h: dict[str, Any]) -> list[str]:
    """A reader takes ``r`` and ``lora_alpha`` as every adapted layer's rank and its scale as
    alpha / r: say where the adapter's own PEFT settings (an imported one's) make that untrue."""
    notes = []
    if h.get("rank_pattern") or h.get("alpha_pattern"):
        notes.append("`r` and `lora_alpha` are defaults: `rank_pattern` / `alpha_pattern` give "
                     "the modules they match their own rank / alpha")
    if h.get("use_rslora"):
        notes.append("rsLoRA: each layer's scale is lora_alpha / √r, not lora_alpha / r")
    if h.get("layers_to_transform") not in (None, []):
        notes.append("only the layers in `layers_to_transform` are adapted")
    if h.get("use_dora"):
        notes.append("DoRA: a learned magnitude rescales each adapted weight")
    if h.get("modules_to_save"):
        notes.append("`modules_to_save` are whole trained copies of those modules, besides the "
                     "LoRA")
    if h.get("bias") not in (None, "none"):
        notes.append(f"biases trained too (`bias: {h['bias']}`)")
    return notes


def tracking_lines(tracking: dict[str, Any]) -> list[str]:
    """One line per experiment tracker of a ``tracking`` record: where its run is."""
    lines = []
    for name, where in sorted(tracking.items()):
        if not isinstance(where, dict):
            continue
        if name == "tensorboard":
            lines.append(f"TensorBoard: `tensorboard --logdir {where.get('logdir')}`")
        elif name == "trackio":
            place = where.get("space") or where.get("server") or where.get("store")
            lines.append(f"trackio: project `{where.get('project')}`, run `{where.get('run')}` "
                         f"({place}; `trackio show --project {where.get('project')}`)")
        elif name == "wandb":
            lines.append(f"W&B ({where.get('mode')}): project `{where.get('project')}`, run "
                         f"`{where.get('run_id')}` ({where.get('dir')})")
        elif name == "mlflow":
            lines.append(f"MLflow: run `{where.get('run_id')}` of experiment "
                         f"`{where.get('experiment_id')}` in {where.get('tracking_uri')}")
        else:
            lines.append(f"{name}: {_fmt(where)}")
    return lines


#: Lineage figures with a column of their own; a stage's other numbers go under "other".
_LINEAGE_COLUMNS = ("steps", "train_loss_first", "train_loss_final", "loss_logs", "train_seconds",
                    "loop_seconds", "prepare_seconds", "tokens", "tokens_per_second",
                    # said in the train-loss cell (kept_weights_line)
                    "weights_step", "weights_kept_by", "train_loss_kept", "train_loss_kept_step")


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|")


def _forgetting_cell(f: dict[str, Any] | None) -> str:
    if not f:
        return "not measured"
    cell = (f"{f['general_loss_change_pct']:+.2f}% ({_fmt(f['general_loss_base'])} → "
            f"{_fmt(f['general_loss'])}")
    return cell + (f", vs {f['relative_to']})" if f.get("relative_to") else ")")


def _pipeline_lines(p: dict[str, Any]) -> list[str]:
    """The pipeline stage that made the pocket book, and the lineage: each stage up to it,
    with the figures measured when that stage was trained."""
    if not p:
        return []
    lines = ["", f"- pipeline: stage {p.get('stage', '?')} of {p.get('stages', '?')} of recipe "
                 f"`{p.get('recipe', '?')}` (sha256 `{str(p.get('recipe_sha256', '?'))[:16]}…`)"]
    lineage = p.get("lineage") or []
    if not lineage:
        return lines
    lines += ["", "Lineage (forgetting: general-text loss with the stage's pocket book off → on, "
                  "relative to what was underneath it):", "",
              "| stage | pocket book | trainer | data | on | steps | train loss | eval loss "
              "| forgetting | other metrics |", "|---|---|---|---|---|---|---|---|---|---|"]
    for s in lineage:
        m = s.get("metrics") or {}
        first, final = m.get("train_loss_first"), m.get("train_loss_final")
        loss = "not logged" if first is None or final is None else \
            f"{_fmt(final)} (one logged value)" if m.get("loss_logs") == 1 else \
            f"{_fmt(first)} → {_fmt(final)}"
        if m.get("weights_step") is not None:  # the last loss is not the saved weights'
            loss = kept_weights_line(m) if first is None or final is None else \
                f"{loss}, at step {m.get('steps', '?')}; {kept_weights_line(m)}"
        under = s.get("on") or (f"copy of {s['from']}" if s.get("from") else "base")
        other = ", ".join(f"{k} {_fmt(v)}" for k, v in sorted(m.items())
                          if k not in _LINEAGE_COLUMNS) or "–"
        lines.append("| " + " | ".join(_cell(c) for c in (
            f"{s.get('stage')} {s.get('name', '')}", f"`{s.get('ref', '?')}`",
            s.get("trainer", "?"), s.get("data", "?"), under, m.get("steps", "?"), loss,
            _fmt(s["eval_loss"]) if s.get("eval_loss") is not None else "–",
            _forgetting_cell(s.get("forgetting")), other)) + " |")
    return lines


def _results_section(meta: PocketBookMeta) -> str:
    m = meta.metrics or {}
    lines = []
    one_log = m.get("loss_logs") == 1  # first and final would be the same window's mean
    for key in ("train_loss_first", "train_loss_final", "steps", "train_seconds",
                "tokens_per_second"):
        if one_log and key == "train_loss_first":
            continue
        if m.get(key) is not None:
            label = "train loss (one logged value)" if one_log and key == "train_loss_final" \
                else key.replace('_', ' ')
            if key == "train_loss_final" and m.get("weights_step") is not None:
                label += f" (step {m.get('steps')}, whose weights were not kept)"
            lines.append(f"- {label}: {_fmt(m[key])}")
    if m.get("weights_step") is not None:
        lines.append(f"- {kept_weights_line(m)}")
    if m.get("eval") and "pair_accuracy" in m["eval"]:  # a reward head's held-out pairs
        e = m["eval"]
        lines.append(f"- eval loss (reward, −log σ(chosen − rejected)): {_fmt(e.get('loss'))}; "
                     f"chosen ranked first in {e['pair_accuracy']:.1%} of {e['pairs']} pairs"
                     if e.get("pairs") else "- eval: no held-out pair fits the max length")
    elif m.get("eval") and m["eval"].get("measured_by") == "trainer":  # DPO's held-out pairs
        e = m["eval"]
        line = (f"- eval loss (the trainer's, on {e.get('pairs')} held-out pairs, step "
                f"{e.get('step')}): {_fmt(e.get('loss'))}")
        if e.get("reward_accuracy") is not None:
            line += (f"; the chosen answer's implicit reward above the rejected one's in "
                     f"{e['reward_accuracy']:.1%} of pairs (mean margin "
                     f"{_fmt(e.get('reward_margin'))})")
        lines.append(line)
    elif m.get("eval"):
        lines.append(f"- eval loss: {_fmt(m['eval'].get('loss'))} "
                     f"(perplexity {_fmt(m['eval'].get('perplexity'))})")
    f = m.get("forgetting")
    if f:
        lines.append(f"- **forgetting**: general-text loss {_fmt(f['general_loss_base'])} → "
                     f"{_fmt(f['general_loss'])} ({f['general_loss_change_pct']:+.2f}%)")
    guard = _guard_line(m.get("guard") or {}, m)
    if guard:
        lines.append(guard)
    if m.get("early_stopping"):
        lines.append(f"- {early_stopping_line(m['early_stopping'], m.get('precision'), m.get('weights_step'))}")
    lines += _search_lines(m.get("search") or {})
    lines += _verification_lines(meta.verification)
    lines += harness_lines(meta.harness)
    if m.get("loss_curve"):  # the file saved with it, whatever the metadata says
        lines += ["", "![loss curve](loss_curve.png)"]
    return "\n".join(lines) or "No metrics recorded."


def _search_lines(s: dict[str, Any]) -> list[str]:
    """``train --search``: every trial, the kept one marked."""
    if not s.get("trials"):
        return []
    budget = f", forgetting budget {s['budget_pct']:g}%" if s.get("budget_pct") else ""
    lines = ["", f"Kept trial {s['kept']} of a search over {', '.join(s['space'])} "
             f"({s['objective']} on {s['eval_split']:.0%} held out{budget}):", "",
             "| trial | lr | r | steps | held-out loss | forgetting | |", "|---|---|---|---|---|---|---|"]
    for t in s["trials"]:
        forgetting = "" if t.get("forgetting_pct") is None else f"{t['forgetting_pct']:+.2f}%"
        note = "kept" if t["trial"] == s["kept"] else ("" if t["within_budget"] else "over budget")
        lr = f"{t['lr']:.2e}" if t.get("lr") is not None else ""
        lines.append(f"| {t['trial']} | {lr} | {t.get('r', '')} | {t.get('steps', '')} | "
                     f"{_fmt(t['eval_loss'])} | {forgetting} | {note} |")
    return lines


def early_stopping_line(record: dict[str, Any], precision: str | None = None,
                        kept_step: int | None = None) -> str:
    """One line for a run's ``early_stopping`` record (the card, the end of ``train``). Its
    loss is the trainer's own evaluation while training, in the run's ``precision``: the
    held-out figure recorded after the run is measured apart, and may differ in bf16.
    ``kept_step`` is the metrics' ``weights_step``: where it is not the best step (the
    forgetting guard then fell back further), the saved pocket book is not the best step's."""
    if not record.get("evaluations"):
        return (f"Early stopping (patience {record['patience']}): no evaluation of the held-out "
                "split in this run, nothing to act on")
    n = record.get("eval_every")
    every = (f" every {n} steps" if n != 1 else " every step") if n else ""
    line = (f"Early stopping (patience {record['patience']}, {record['evaluations']} "
            f"evaluations{every}): best eval loss {record['best_eval_loss']:.4f} "
            f"(the trainer's evaluation{f', in {precision}' if precision else ''}) at step "
            f"{record['best_step']}")
    if record.get("stopped_at_step") is not None:
        line += f"; stopped at step {record['stopped_at_step']}"
    if record.get("restored_best") and kept_step not in (None, record.get("best_step")):
        line += "; the best step's weights were restored, then the forgetting guard kept earlier ones"
    elif record.get("restored_best"):
        line += "; the pocket book saved is the best step's"
    return line


def _verification_lines(v: dict[str, Any]) -> list[str]:
    """The last ``adapterkit verify``: each path against plain PEFT, with the versions."""
    if not v:
        return []
    versions = ", ".join(f"{k} {val}" for k, val in sorted(v.get("versions", {}).items()))
    cells = v.get("paths", {})
    ours = [p for p, cell in cells.items() if "this path's" in (cell.get("not_finite") or "")]
    peft = any("PEFT" in (cell.get("not_finite") or "") for cell in cells.values())
    if ours:
        verdict = f"logits not finite (NaN or inf) on {', '.join(ours)}" + (
            ", and plain PEFT's too" if peft else "")
    elif peft:
        verdict = "plain PEFT's logits are not finite (NaN or inf) while these paths give numbers"
    elif not v.get("ok"):
        verdict = "DRIFT on some path"
    elif not v.get("compared"):
        verdict = "not verified: every adapterkit path refuses it; PEFT itself applies it"
    else:
        verdict = f"exact on the {v['compared']} path(s) that accept it"
    on = f"; on the {v['checked_on']}" if v.get("checked_on") else ""
    lines = [f"- **checked against plain PEFT** ({versions}; tolerance "
             f"{_fmt(v['tolerance'])}{on}): {verdict}"]
    for path, cell in v.get("paths", {}).items():
        lines.append(f"  - {path}: " + (
            f"refused ({cell['refused']})" if "refused" in cell
            else f"{cell['not_finite']} logits not finite" if cell.get("not_finite")
            else f"max logit difference {cell['max_logit_diff']:.1e}"))
    return lines


def harness_lines(harness: dict[str, Any]) -> list[str]:
    """``adapterkit eval --harness`` results: per task and metric, the plain base beside the
    pocket book (and how each run was limited)."""
    if not harness:
        return []
    lines = ["", "Standard evaluations (lm-evaluation-harness; the plain base and with this "
                 "pocket book, same run settings):", "",
             "| task | metric | plain base | with the pocket book | change | samples | "
             "lm-eval |", "|---|---|---|---|---|---|---|"]
    for task, rec in sorted(harness.items()):
        if not isinstance(rec, dict):
            continue
        limit = rec.get("limit")
        samples = f"{rec.get('samples', '?')}" + (f" (limit {limit})" if limit else "")
        for metric, pair in sorted((rec.get("metrics") or {}).items()):
            base, book = pair.get("base"), pair.get("pocket_book")
            change = f"{book - base:+.4g}" if isinstance(base, (int, float)) and \
                isinstance(book, (int, float)) else "–"
            lines.append("| " + " | ".join(_cell(c) for c in (
                task, metric, _fmt(base), _fmt(book), change, samples,
                rec.get("lm_eval", "?"))) + " |")
    return lines


def _guard_line(g: dict[str, Any], m: dict[str, Any]) -> str | None:
    """The forgetting guard as it acted: the KL term only if it was added to the loss (counted
    in ``kl_batches``) with the divergence it logged (first and last logging interval), the
    budget only if one was checked."""
    parts = []
    if g.get("kl_batches") and g.get("weight"):
        n = g["kl_batches"]
        parts.append(f"KL term at weight {_fmt(g['weight'])}, added to the loss of "
                     f"{n} training batch{'es' if n != 1 else ''}"
                     + (f" (one step in {g['kl_every']}, {g['kl_every']}× as heavy)"
                        if (g.get("kl_every") or 1) > 1 else "")
                     + (f"; KL to the base on the anchor text {_fmt(m['guard_kl_first'])} → "
                        f"{_fmt(m['guard_kl_final'])} (first and last logged)"
                        if m.get("guard_kl_final") is not None else ""))
    if g.get("budget_pct") is not None:
        parts.append(f"budget {_fmt(g['budget_pct'])}%, within budget: {g['within_budget']}"
                     + (f" (restored step {g['kept_step']})" if g.get("restored") else ""))
    return f"- forgetting guard: {'; '.join(parts)}" if parts else None


def _use_section(meta: PocketBookMeta) -> str:
    """How to load it with plain PEFT. A base that is only a local folder (or a GGUF file) has
    no name another machine can load: the snippet then holds a placeholder, not a name that
    looks loadable, and the fingerprint tells whether the reader's copy is the same base."""
    hub_base = base_id(meta)
    lines = []
    if not hub_base:
        prov = meta.base.get("provenance", {})
        what = (f"the GGUF file `{prov.get('file', '?')}`" if prov.get("kind") == "gguf"
                else f"a local model folder (`{meta.base.get('name', '?')}`)")
        lines += [f"Its base is {what}, not a model on the Hub: load your copy of it, after "
                  "checking it is the same base (`adapterkit base show PATH` prints adapterkit "
                  f"fingerprint `{meta.base_fingerprint}`).", ""]
    where = hub_base or "path/to/your/copy/of/the/base"
    if meta.method != "qlora":
        lines += ["```python", "from peft import PeftModel",
                  "from transformers import AutoModelForCausalLM", "",
                  f'base = AutoModelForCausalLM.from_pretrained("{where}")']
    else:  # its ΔW was learnt on the 4-bit base: answers differ on another
        made = "Its members were" if meta.source.get("kind") in ("merge", "stack") \
            else "It was"
        lines += [f"{made} trained on the base in 4 bits (`qlora`: NF4, double quantization); "
                  "load the base so, as adapterkit does, for its answers.", "",
                  "```python", "import torch", "from peft import PeftModel",
                  "from transformers import AutoModelForCausalLM, BitsAndBytesConfig", "",
                  "dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32",
                  "quantization = BitsAndBytesConfig(",
                  '    load_in_4bit=True, bnb_4bit_quant_type="nf4", '
                  "bnb_4bit_use_double_quant=True,",
                  "    bnb_4bit_compute_dtype=dtype)",
                  f'base = AutoModelForCausalLM.from_pretrained("{where}", '
                  "quantization_config=quantization, dtype=dtype)"]
    lines += [_use_code(meta), "```"]
    return "\n".join(lines)


def _use_code(meta: PocketBookMeta) -> str:
    """How plain PEFT loads it: a pocket book trained ``--on`` others needs them active too."""
    if not meta.stacked_on:
        return 'model = PeftModel.from_pretrained(base, "path/or/repo/of/this/adapter")'
    names = [f"under{i}" for i in range(len(meta.stacked_on))]
    lines = [f"# trained on top of {', '.join(meta.stacked_on)}: load those too, all active",
             f'model = PeftModel.from_pretrained(base, "path/of/{meta.stacked_on[0]}", '
             f'adapter_name="{names[0]}")']
    for ref, name in zip(meta.stacked_on[1:], names[1:]):
        lines.append(f'model.load_adapter("path/of/{ref}", adapter_name="{name}")')
    lines.append('model.load_adapter("path/or/repo/of/this/adapter", adapter_name="top")')
    lines.append(f"model.base_model.set_adapter({[*names, 'top']!r}, inference_mode=True)")
    return "\n".join(lines)


def render_card(meta: PocketBookMeta, *, license: str | None = None) -> str:
    """The README.md text of a pocket book (YAML header + body)."""
    from huggingface_hub import ModelCard, ModelCardData

    hub_base = base_id(meta)
    datasets = [meta.data["description"][4:].split(" ")[0]] if str(
        meta.data.get("description", "")).startswith("hub:") else None
    data = ModelCardData(
        base_model=hub_base, library_name="peft", pipeline_tag="text-generation",
        tags=[t for t in ("adapterkit", "lora", meta.method, meta.trainer) if t] + list(meta.tags),
        datasets=datasets, license=license,
    )
    card = ModelCard.from_template(
        data, template_str=CARD_TEMPLATE, title=f"{meta.name} — adapterkit pocket book",
        base_label=hub_base or meta.base.get("name", "its base"), name=meta.name,
        base_section=_base_section(meta), made_section=_made_section(meta),
        results_section=_results_section(meta), use_section=_use_section(meta),
    )
    return str(card.content)


#: Every card adapterkit renders says so; a card an imported adapter brought is left alone.
OUR_CARD = "An adapterkit pocket book:"


def write_card(folder: Path, meta: PocketBookMeta) -> Path:
    path = folder / "README.md"
    atomic_write_text(path, render_card(meta))
    return path


_SECTION = ("<!-- adapterkit:verification -->", "<!-- /adapterkit:verification -->")


def refresh_card(folder: Path, meta: PocketBookMeta) -> Path:
    """Re-render the card if adapterkit wrote it. An imported or pulled adapter's own card is
    its author's: it stays, and the verification goes into a marked section at its end
    (replaced, not repeated, on the next ``verify``)."""
    path = folder / "README.md"
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if not text or OUR_CARD in text:
        return write_card(folder, meta)
    start, end = _SECTION
    if start in text and end in text:
        text = text[:text.index(start)].rstrip() + text[text.index(end) + len(end):]
    section = "\n".join(["## adapterkit", "", *_verification_lines(meta.verification),
                         *harness_lines(meta.harness)])
    atomic_write_text(path, f"{text.rstrip()}\n\n{start}\n{section}\n{end}\n")
    return path


def kept_weights_line(metrics: dict[str, Any]) -> str:
    """What the saved weights are, where they are not the last step's (``weights_step``:
    :func:`adapterkit.training.save.kept_weights`): said on the card, after a run and in a
    pipeline's stage line, beside the last step's loss."""
    loss, at = metrics.get("train_loss_kept"), metrics.get("train_loss_kept_step")
    return (f"weights kept: step {metrics['weights_step']}'s, "
            f"{metrics.get('weights_kept_by') or 'an earlier step'}; "
            + (f"train loss logged at step {at}: {_fmt(loss)}" if loss is not None
               else "no train loss logged by then" if metrics.get("train_loss_final") is not None
               else "no train loss logged"))


def loss_curve_png(log_history: list[dict[str, Any]], path: Path,
                   kept_step: int | None = None) -> bool:
    """Plot training (and eval) loss against steps, with a line at ``kept_step`` where the
    saved weights are that step's; False when there is nothing to plot."""
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    if not train:
        return False
    # matplotlib's object API, not pyplot: no backend to pick, no global figure to close, and
    # one import less in the process (pyplot's)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.subplots()
    ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    if kept_step is not None:
        ax.axvline(kept_step, color="grey", linestyle="--", label=f"weights kept (step {kept_step})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return True
