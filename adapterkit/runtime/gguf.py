"""``export --format gguf``: a pocket book for llama.cpp, Ollama and LM Studio.

Two files, both written by the ``gguf`` package (llama.cpp's own Python writer) — never by
hand-rolled binary code:

* **A LoRA adapter GGUF** (:func:`export_gguf_lora`), loaded beside the base GGUF
  (``llama-cli -m base.gguf --lora book.gguf``, Ollama's ``ADAPTER``). It follows llama.cpp's
  ``convert_lora_to_gguf.py``: ``general.type = adapter``, ``adapter.type = lora``,
  ``adapter.lora.alpha``; each linear layer's factors as ``<tensor>.lora_a`` (r × in) and
  ``<tensor>.lora_b`` (out × r) in float32, under the tensor names the ``gguf`` package's
  :class:`gguf.TensorNameMap` gives (``blk.0.attn_q.weight``...), with the rows of ``q``/``k``
  permuted for Llama-type models exactly as llama.cpp's converter permutes the base weights.
  llama.cpp scales every pair by ``alpha / rank`` with one ``alpha`` per file, which cannot say
  ``rank_pattern``/``alpha_pattern``/rsLoRA or a stack's weights (its converter silently drops
  them); here each layer's own PEFT scale (from :mod:`adapterkit.lora.factors`, the one home of
  that rule) is folded into ``lora_b`` so that ``alpha / rank`` times it is exactly PEFT's
  ``scale · B``. A stack is written as its flattened adapter (members' ranks concatenated, as
  ``stack --flatten`` does).
* **A merged model GGUF** (:func:`export_gguf_merged`), for Ollama's ``FROM``: ``export
  --merged`` (checked against plain PEFT before it exists) converted by llama.cpp's own
  ``convert_hf_to_gguf.py``, which carries the tokenizer and chat template over; ``f32``,
  ``f16``, ``bf16`` and ``q8_0`` are written by that converter (its ``q8_0`` is the ``gguf``
  package's quantizer), the other types (``q4_0``, ``q4_k_m``...) by llama.cpp's quantizer
  through ``llama-cpp-python`` (``llama_model_quantize``), from the f16 file.

What llama.cpp cannot take is refused before anything is written, with one line naming it: an
architecture whose GGUF layout adapterkit does not know, a module with no GGUF tensor name (a
reward head's ``score``), a LoRA on an output layer the base ties to its embeddings.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterkit.errors import AdapterkitError, ConfigError, InvalidAdapter, MissingDependency
from adapterkit.files import check_new_folder, new_folder

if TYPE_CHECKING:  # pragma: no cover
    from adapterkit.library.store import Library, PocketBook

Progress = Callable[[str], None]


@dataclass(frozen=True)
class GgufLayout:
    """How llama.cpp's converter lays out one transformers architecture."""

    #: the ``gguf.MODEL_ARCH`` member (``general.architecture`` is its lower-case name)
    arch: str
    #: ``LlamaModel.undo_permute`` in llama.cpp's converter: the rows of q/k are reordered
    #: (per head: the two rotary halves interleaved) because llama.cpp's RoPE pairs
    #: neighbouring dimensions where transformers pairs halves.
    rope_permute: bool


#: The architectures whose conversion adapterkit mirrors, read off llama.cpp's
#: ``conversion/llama.py`` and ``conversion/qwen.py``: their linear layers are renamed only
#: (plus the q/k permutation for Llama). Others are refused by name rather than guessed.
#: tests/test_gguf.py runs Llama, Qwen2 and Qwen3 through llama.cpp itself; Mistral is the
#: same converter class as Llama (``LlamaModel``).
LAYOUTS: dict[str, GgufLayout] = {
    "LlamaForCausalLM": GgufLayout("LLAMA", True),
    "MistralForCausalLM": GgufLayout("LLAMA", True),
    "Qwen2ForCausalLM": GgufLayout("QWEN2", False),
    "Qwen3ForCausalLM": GgufLayout("QWEN3", False),
}

#: Written by llama.cpp's ``convert_hf_to_gguf.py`` itself (``--outtype``).
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
#: Written by llama.cpp's quantizer (``llama_model_quantize``) from the f16 file:
#: name → the ``LLAMA_FTYPE_MOSTLY_*`` constant of ``llama_cpp``.
QUANTIZER_TYPES = {
    "q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1", "q2_k": "Q2_K",
    "q3_k_s": "Q3_K_S", "q3_k_m": "Q3_K_M", "q3_k_l": "Q3_K_L", "q4_k_s": "Q4_K_S",
    "q4_k_m": "Q4_K_M", "q5_k_s": "Q5_K_S", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K",
}
QUANT_TYPES = (*CONVERTER_TYPES, *QUANTIZER_TYPES)
#: Where ``find_converter`` looks for llama.cpp's conversion scripts when the environment
#: variable is not set (scripts/bootstrap.sh puts them there from the llama-cpp-python sdist).
CONVERTER_ENV = "ADAPTERKIT_LLAMA_CPP"


class GgufExportError(AdapterkitError):
    """llama.cpp's converter or quantizer failed on a merged model (its last line is kept)."""


@dataclass
class GgufReport:
    """What an export wrote: the file, its size, the time taken, and the Modelfile lines."""

    path: Path
    size: int
    seconds: float
    modelfile: list[str] = field(default_factory=list)
    max_logit_diff: float | None = None


# -- what the base is, in llama.cpp's terms -------------------------------------------------

@dataclass
class _Base:
    config: dict[str, Any]
    layout: GgufLayout
    gguf_file: Path | None  # the base as a GGUF file, where it came as one


def _base_of(library: Library, book: PocketBook) -> _Base:
    """The base's config and GGUF layout; refuses an architecture adapterkit cannot map."""

    from adapterkit.base.resolve import ALIASES, alias_file, base_spec_for, resolve_base

    spec = base_spec_for(book.meta.base, library.home)
    source = resolve_base(spec, library.home)
    config = json.loads((source.folder / "config.json").read_text(encoding="utf-8"))
    archs = config.get("architectures") or [config.get("model_type", "?")]
    layout = LAYOUTS.get(archs[0])
    if layout is None:
        raise InvalidAdapter(
            f"the base of {book.ref} is a {archs[0]}, which adapterkit cannot map to "
            f"llama.cpp's GGUF tensor names (known: {', '.join(sorted(LAYOUTS))}); export it "
            "as a PEFT folder instead")
    gguf_file = None
    if spec in ALIASES:
        gguf_file = alias_file(spec)[0]
    elif spec.lower().endswith(".gguf") and Path(spec).is_file():
        gguf_file = Path(spec).resolve()
    return _Base(config, layout, gguf_file)


def tensor_names(book_modules: list[str], base: _Base, *, ref: str) -> dict[str, str]:
    """module path → llama.cpp tensor name (``blk.0.attn_q.weight``), through the ``gguf``
    package's :func:`gguf.get_tensor_name_map`; refuses modules that have none."""
    import gguf

    arch = getattr(gguf.MODEL_ARCH, base.layout.arch)
    mapping = gguf.get_tensor_name_map(arch, int(base.config["num_hidden_layers"]))
    names, missing = {}, []
    for module in sorted(set(book_modules)):
        name = mapping.get_name(f"{module}.weight", try_suffixes=(".weight",))
        if name is None:
            missing.append(module)
        else:
            names[module] = name
    if missing:
        raise InvalidAdapter(
            f"{ref} has modules with no GGUF tensor name in llama.cpp's "
            f"{gguf.MODEL_ARCH_NAMES[arch]} layout: {', '.join(missing)} (a reward head or a "
            "full layer llama.cpp does not load); only LoRA on the transformer's linear "
            "layers can be exported as GGUF")
    tied = base.config.get("tie_word_embeddings")
    output = [m for m, n in names.items() if n == "output.weight"]
    if tied and output:
        raise InvalidAdapter(
            f"{ref} has a LoRA on {output[0]}, which this base ties to its input embeddings: "
            "its GGUF has no separate output tensor to put it on (llama.cpp's converter "
            "refuses it too)")
    return names


def permute_rows(b: Any, n_head: int) -> Any:
    """llama.cpp's ``LlamaModel.permute`` on the output rows of ``B`` (out × r): the same
    reordering its converter applies to the base's q/k weights, so ``B' A = P (B A)``."""
    return b.reshape(n_head, 2, b.shape[0] // n_head // 2, b.shape[1]) \
            .swapaxes(1, 2).reshape(b.shape)


# -- the LoRA adapter -----------------------------------------------------------------------

def gguf_factors(library: Library, book: PocketBook, base: _Base, names: dict[str, str]
                 ) -> tuple[dict[str, tuple[Any, Any]], float]:
    """llama.cpp tensor name → (A, B) in float32, and the file's ``alpha``, such that
    llama.cpp's ``alpha / rank · B A`` is PEFT's ``Σ wᵢ sᵢ Bᵢ Aᵢ`` (q/k rows permuted)."""
    import torch

    from adapterkit.library.peft_folder import read_config
    from adapterkit.lora.combine import stored_base
    from adapterkit.lora.factors import read_factors
    from adapterkit.runtime.peft_model import members_of

    members = members_of(library, book)  # underlays at weight 1, a stack's members weighted
    weights = stored_base(library, book)
    per_module: dict[str, list[tuple[Any, float]]] = {}
    for item, weight in members:
        for module, f in read_factors(item.path, ref=item.ref, path="export --format gguf",
                                      base_weights=weights).items():
            per_module.setdefault(module, []).append((f.float_(), weight))
    # One alpha for the file (llama.cpp's rule): a single pocket book's own, so that its
    # tensors are written as PEFT saved them wherever its scale is the plain alpha / r.
    alpha = float(read_config(book.path).get("lora_alpha") or 0) \
        if book.meta.kind == "adapter" else 0.0
    if alpha <= 0:
        alpha = float(max(sum(f.rank for f, _ in parts) for parts in per_module.values()))
    out = {}
    n_head = int(base.config["num_attention_heads"])
    n_kv = int(base.config.get("num_key_value_heads") or n_head)
    for module, parts in per_module.items():
        rank = sum(f.rank for f, _ in parts)
        bs = []
        for f, weight in parts:  # llama.cpp multiplies by alpha / rank: undo it, apply PEFT's
            factor = f.scale * weight * rank / alpha
            bs.append(f.b if math.isclose(factor, 1.0, rel_tol=1e-12) else f.b * factor)
        a, b = torch.cat([f.a for f, _ in parts]), torch.cat(bs, dim=1)
        if base.layout.rope_permute and module.endswith("q_proj"):
            b = permute_rows(b, n_head)
        elif base.layout.rope_permute and module.endswith("k_proj"):
            b = permute_rows(b, n_kv)
        out[names[module]] = (a.contiguous(), b.contiguous())
    return out, alpha


def _check_members(library: Library, book: PocketBook) -> list[str]:
    """Every member's files checked; the modules all members' tensors name (full tensors
    included: a reward head must be refused by name, not skipped)."""
    from adapterkit.library.integrity import check_book, recorded_structure
    from adapterkit.lora.factors import saved_names
    from adapterkit.runtime.peft_model import members_of

    structure = recorded_structure(book, library.home)
    modules = []
    for item, _ in members_of(library, book):
        check_book(item, structure)
        modules += [n.module for n in saved_names(item.path)]
    return modules


def _check_dest(dest: Path) -> None:
    check_new_folder(dest)


def _file_stem(book: PocketBook) -> str:
    return f"{book.name}-v{book.version}"


def export_gguf_lora(library: Library, ref: str, dest: str | os.PathLike[str], *,
                     progress: Progress | None = None) -> GgufReport:
    """Write ``ref`` (a pocket book or a stack) as a llama.cpp LoRA adapter GGUF into the new
    folder ``dest``; returns the file, its size and the Ollama ``Modelfile`` lines."""
    import gguf

    say = progress or (lambda m: None)
    library.check_export_dest(dest)
    dest = Path(dest)
    _check_dest(dest)
    start = time.perf_counter()
    book = library.get(ref)
    modules = _check_members(library, book)
    base = _base_of(library, book)
    names = tensor_names(modules, base, ref=book.ref)
    tensors, alpha = gguf_factors(library, book, base, names)
    if base.gguf_file is not None:
        _check_against_base(base.gguf_file, tensors, ref=book.ref)
    file_name = f"{_file_stem(book)}-lora.gguf"
    arch = gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, base.layout.arch)]
    say(f"Writing {len(tensors)} LoRA tensor pairs for llama.cpp's {arch} layout...")
    with new_folder(dest) as tmp:
        writer = gguf.GGUFWriter(str(tmp / file_name), arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(book.ref)
        for name, (a, b) in sorted(tensors.items()):
            writer.add_tensor(f"{name}.lora_a", a.numpy())
            writer.add_tensor(f"{name}.lora_b", b.numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        lines = modelfile_lines(base.gguf_file, adapter=f"./{file_name}")
        if base.gguf_file is not None:
            (tmp / "Modelfile").write_text("\n".join(lines) + "\n", encoding="utf-8")
    path = dest / file_name
    return GgufReport(path, path.stat().st_size, time.perf_counter() - start, lines)


def _check_against_base(base_file: Path, tensors: dict[str, tuple[Any, Any]], *,
                        ref: str) -> None:
    """The check llama.cpp makes when it loads the adapter (every tensor exists in the base,
    ``A`` is r × in and ``B`` out × r), made here so a bad file is never written."""
    from gguf import GGUFReader

    shapes = {t.name: tuple(int(x) for x in t.shape) for t in GGUFReader(base_file).tensors}
    for name, (a, b) in tensors.items():
        if name not in shapes:
            raise InvalidAdapter(f"{ref}: the base GGUF {base_file.name} has no tensor {name}")
        # GGUF lists dimensions innermost first: a torch (out, in) weight is (in, out) there
        if shapes[name] != (a.shape[1], b.shape[0]):
            raise InvalidAdapter(
                f"{ref}: {name} is {shapes[name]} in {base_file.name} but the pocket book's "
                f"LoRA is {b.shape[0]} × {a.shape[1]} (out × in); wrong base?")


def modelfile_lines(base_file: Path | None, *, adapter: str | None = None,
                    model: str | None = None) -> list[str]:
    """The Ollama ``Modelfile`` lines that use an export: ``FROM`` the merged GGUF, or
    ``FROM`` the base GGUF plus ``ADAPTER`` the LoRA GGUF."""
    if model is not None:
        return [f"FROM {model}"]
    base = str(base_file) if base_file is not None else \
        "<the base as a GGUF file: llama.cpp's convert_hf_to_gguf.py on the base's folder>"
    return [f"FROM {base}", f"ADAPTER {adapter}"]


# -- the merged model -----------------------------------------------------------------------

def find_converter() -> Path:
    """The folder holding llama.cpp's ``convert_hf_to_gguf.py`` (and its ``conversion/`` and
    ``gguf-py/``): ``$ADAPTERKIT_LLAMA_CPP``, else ``<venv>/share/llama.cpp``."""
    candidates = [Path(os.environ[CONVERTER_ENV]).expanduser()] if os.environ.get(CONVERTER_ENV) \
        else [Path(sys.prefix) / "share" / "llama.cpp"]
    for folder in candidates:
        if (folder / "convert_hf_to_gguf.py").is_file():
            return folder
    raise MissingDependency(
        "a merged GGUF is written by llama.cpp's convert_hf_to_gguf.py, which was not found in "
        f"{candidates[0]}: set {CONVERTER_ENV} to a llama.cpp checkout (git clone "
        "https://github.com/ggml-org/llama.cpp), or run scripts/bootstrap.sh, which keeps the "
        "one from the llama-cpp-python sdist")


def check_quantize(quantize: str) -> str:
    """The quantization type, lower-cased, or :class:`ConfigError` listing the known ones."""
    q = quantize.lower()
    if q not in QUANT_TYPES:
        raise ConfigError(f"unknown --quantize {quantize!r}; choose one of {', '.join(QUANT_TYPES)}")
    if q in QUANTIZER_TYPES:
        _llama_cpp()
    return q


def _llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise MissingDependency(
            "--quantize q4_0 and the other llama.cpp quantizations run llama.cpp's quantizer "
            "through llama-cpp-python: pip install 'adapterkit[gguf]' (or choose f16/q8_0)"
        ) from None
    return llama_cpp


def export_gguf_merged(library: Library, ref: str, dest: str | os.PathLike[str], *,
                       quantize: str = "f16", tolerance: float = 1e-2, plugins: Any = None,
                       progress: Progress | None = None) -> GgufReport:
    """Fold ``ref`` into its base (``export --merged``, checked against plain PEFT) and convert
    the result with llama.cpp's ``convert_hf_to_gguf.py`` into one GGUF in the new folder
    ``dest`` — tokenizer and chat template included — quantized as asked."""
    from adapterkit.runtime.export import check_tolerance, export_merged

    say = progress or (lambda m: None)
    library.check_export_dest(dest)
    dest = Path(dest)
    check_tolerance(tolerance)
    _check_dest(dest)
    quant = check_quantize(quantize)
    converter = find_converter()
    start = time.perf_counter()
    book = library.get(ref)
    # refused here, before the merge, what llama.cpp could not load (the converter then maps
    # the merged model's own tensors)
    tensor_names(_check_members(library, book), _base_of(library, book), ref=book.ref)
    file_name = f"{_file_stem(book)}-{quant}.gguf"
    with new_folder(dest) as tmp:
        hf = tmp / ".merged-hf"
        merged = export_merged(library, ref, hf, tolerance=tolerance, plugins=plugins,
                               progress=say)
        outtype = quant if quant in CONVERTER_TYPES else "f16"
        converted = tmp / (file_name if quant in CONVERTER_TYPES else ".merged-f16.gguf")
        say(f"Converting with llama.cpp's convert_hf_to_gguf.py ({outtype})...")
        overrides = tmp / ".gguf-metadata.json"
        overrides.write_text(json.dumps(_merged_metadata(library, book, hf)), encoding="utf-8")
        _convert(converter, hf, converted, outtype, metadata=overrides)
        overrides.unlink()
        shutil.rmtree(hf)
        if quant in QUANTIZER_TYPES:
            say(f"Quantizing to {quant} with llama.cpp's quantizer...")
            quantize_gguf(converted, tmp / file_name, quant)
            converted.unlink()
        lines = modelfile_lines(None, model=f"./{file_name}")
        (tmp / "Modelfile").write_text("\n".join(lines) + "\n", encoding="utf-8")
    path = dest / file_name
    return GgufReport(path, path.stat().st_size, time.perf_counter() - start, lines,
                      max_logit_diff=merged.max_logit_diff)


#: ``general.*`` keys of the base that llama.cpp's converter takes from a metadata override
#: file (``--metadata``): the base's identity, kept on the merged model.
_KEPT_KEYS = ("author", "version", "organization", "finetune", "basename", "description",
              "size_label", "license.name", "license.link", "url", "doi", "uuid", "repo_url",
              "source.url", "source.doi", "source.uuid", "source.repo_url", "tags", "languages")


def _merged_metadata(library: Library, book: PocketBook, hf: Path) -> dict[str, Any]:
    """The converter's ``--metadata`` override for the merged GGUF: ``general.name`` is the
    pocket book's (as in its LoRA GGUF), and the base's own identity (organization, basename,
    finetune, size, licence, languages) is kept — read from the base's GGUF file where it came
    as one, else as the converter itself reads the base's folder — instead of what the
    converter would guess from the temporary folder's name. A licence, which the converter
    takes only from a model card, is written into ``hf``'s card where it has none."""
    import gguf

    from adapterkit.base.resolve import base_spec_for, resolve_base

    base = _base_of(library, book)
    kept: dict[str, Any] = {}
    license_ = None
    if base.gguf_file is not None:
        fields = gguf.GGUFReader(base.gguf_file).fields
        for key in _KEPT_KEYS:
            if f"general.{key}" in fields:
                kept[f"general.{key}"] = fields[f"general.{key}"].contents()
        if "general.license" in fields:
            license_ = fields["general.license"].contents()
    else:
        folder = resolve_base(base_spec_for(book.meta.base, library.home), library.home).folder
        kept = _folder_metadata(folder)
    out: dict[str, Any] = dict.fromkeys(  # nothing guessed from the folder name ".merged-hf"
        ("general.finetune", "general.basename", "general.version", "general.size_label"))
    out.update(kept)
    out["general.name"] = book.ref
    card = hf / "README.md"
    if license_ and not card.exists():
        card.write_text(f"---\nlicense: {json.dumps(license_)}\n---\n", encoding="utf-8")
    return out


def _folder_metadata(folder: Path) -> dict[str, Any]:
    """The base's identity as its model card and config say it, as llama.cpp's converter reads
    them — but not guessed from the folder's name, which for a base from the Hub is a commit
    sha (``snapshots/<sha>``) the converter would take for a fine-tune's name."""
    import gguf

    meta = gguf.Metadata.apply_metadata_heuristic(
        gguf.Metadata(), gguf.Metadata.load_model_card(folder),
        gguf.Metadata.load_hf_parameters(folder), None, 0)
    out: dict[str, Any] = {}
    for key in _KEPT_KEYS:
        value = getattr(meta, key.replace(".", "_"), None)
        if value is not None:
            out[f"general.{key}"] = value
    return out


def _convert(converter: Path, folder: Path, out: Path, outtype: str, *,
             metadata: Path | None = None) -> None:
    """Run llama.cpp's converter in its own process (it imports its own ``gguf-py``)."""
    cmd = [sys.executable, str(converter / "convert_hf_to_gguf.py"), str(folder),
           "--outfile", str(out), "--outtype", outtype]
    if metadata is not None:
        cmd += ["--metadata", str(metadata)]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0 or not out.is_file():
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise GgufExportError(f"llama.cpp's convert_hf_to_gguf.py failed: {last}; nothing was "
                              "written")


def quantize_gguf(src: Path, out: Path, quant: str) -> None:
    """Write ``src`` (an f16/f32 model GGUF) quantized to ``quant`` (``q4_0``, ``q4_k_m``...)
    at ``out`` with llama.cpp's own quantizer (``llama_model_quantize``, what
    ``llama-quantize`` runs).

    The quantizer runs in a child process of its own session: in this process a Ctrl-C during
    the long C call only reaches Python inside llama-cpp-python's log callback, where ctypes
    prints and drops the ``KeyboardInterrupt`` and the export would go on. Here the interrupt
    reaches this process while it waits, the child is killed, and ``KeyboardInterrupt`` is
    raised (the caller's :func:`~adapterkit.files.new_folder` removes the partial file)."""
    if quant not in QUANTIZER_TYPES:
        raise ConfigError(f"llama.cpp's quantizer types are {', '.join(QUANTIZER_TYPES)}; "
                          f"got {quant!r}")
    _llama_cpp()
    child = subprocess.Popen(_quantizer_command(src, out, quant), stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)  # the terminal's Ctrl-C reaches us only
    try:
        _, err = child.communicate()
    except BaseException:  # Ctrl-C (or anything else) while it runs: stop it, write nothing
        child.kill()
        child.wait()
        out.unlink(missing_ok=True)
        raise
    if child.returncode != 0 or not out.is_file():
        last = (err.strip().splitlines() or ["(no output)"])[-1]
        out.unlink(missing_ok=True)
        raise GgufExportError(f"llama.cpp's quantizer failed on {quant} ({last}); nothing was "
                              "written")


def _quantizer_command(src: Path, out: Path, quant: str) -> list[str]:
    """The child process :func:`quantize_gguf` runs: :func:`_quantize_here` in this Python."""
    # adapterkit's own folder first on the child's path: it imports this very adapterkit,
    # also where this process found it through a sys.path change (a notebook, a script)
    home = str(Path(__file__).resolve().parents[2])
    code = (f"import sys; sys.path.insert(0, {home!r}); "
            "from adapterkit.runtime.gguf import _quantize_here; "
            "sys.exit(_quantize_here(*sys.argv[1:]))")
    return [sys.executable, "-c", code, str(src), str(out), quant]


def _quantize_here(src: str, out: str, quant: str) -> int:
    """llama.cpp's quantizer in this process (the child of :func:`quantize_gguf`); returns its
    status code."""
    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{QUANTIZER_TYPES[quant]}")
    params.nthread = os.cpu_count() or 1
    # llama.cpp reports every tensor it quantizes through llama-cpp-python's logger: errors only
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    code = int(llama_cpp.llama_model_quantize(src.encode(), out.encode(),
                                              llama_cpp.byref(params)))
    if code != 0:
        print(f"llama_model_quantize returned {code}", file=sys.stderr)
    return 1 if code != 0 else 0
