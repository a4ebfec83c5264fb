"""Serving past one machine: vLLM's OpenAI server, its ``model`` names resolved by the library.

``adapterkit serve --engine vllm`` starts ``vllm serve`` with LoRA on and this module's resolver
registered through vLLM's plugin entry point. vLLM asks the resolver what a ``model`` it does not
know means, and gets back a pocket-book folder checked as the adapterkit engine checks one
(:mod:`adapterkit.serving.names`: ``NAME``, ``NAME@V``, saved and inline stacks, underlays, the
base fingerprint; then the files' SHA-256 and that every tensor lands on the base). Stacks, and
pocket books whose config vLLM would misread, are flattened into one exact PEFT adapter by
``stack --flatten``'s code (:func:`adapterkit.lora.combine.concatenate`). Checked only on GPUs:
the tests drive it against a stand-in vLLM with the real interfaces' signatures.

vLLM's side, as read in its source (vLLM 0.10 and later):

- ``vllm/lora/resolver.py``: ``LoRAResolver.resolve_lora(base_model_name, lora_name)``, async,
  returns a ``LoRARequest`` or ``None`` ("cannot be found"); ``LoRAResolverRegistry
  .register_resolver(resolver_name, resolver)``.
- ``vllm/lora/request.py``: ``LoRARequest(lora_name, lora_int_id, lora_path, base_model_name)``;
  ``lora_int_id`` must be > 0.
- ``vllm/plugins/__init__.py``: entry points of group ``vllm.general_plugins`` are called in
  every vLLM process; ``VLLM_PLUGINS`` (comma-separated names) limits which.
- ``vllm/entrypoints/openai/models/serving.py`` (``OpenAIServingModels.resolve_lora``): asks the
  resolvers only with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` set, replaces ``lora_int_id`` with its
  own counter, and keeps the answer under the request's ``model`` string for the server's life.
- ``vllm/v1/core/kv_cache_utils.py`` (``_gen_lora_extra_hash_keys``): prefix-cache blocks are
  keyed by ``LoRARequest.lora_name``, so an adapter reloaded under the same name can be served
  the old one's cached blocks (vllm#42125).

Hence every ``LoRARequest`` is named ``KEY#CONTENT`` (``triage@2#3f9a0c1d2e4b``): the canonical
target and 12 hex digits of a hash of its files' SHA-256 (the metadata's ``files``) and weights;
its ``lora_int_id`` comes from the same hash (vLLM's server replaces it; ``LLM.generate`` callers
keep it). New content never shares a prefix-cache namespace with old. And because vLLM pins a
``model`` string to its first answer, :class:`Refresher` unloads (``POST /v1/unload_lora_adapter``)
the strings that now mean other content — ``triage`` after ``triage@2`` is trained — so the next
request resolves afresh.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterkit.base.fingerprints import fingerprint
from adapterkit.base.resolve import (
    BaseSource,
    Progress,
    canonical_spec,
    remember_base,
    resolve_base,
)
from adapterkit.errors import AdapterkitError, ConfigError, MissingDependency, PocketBookNotFound
from adapterkit.files import atomic_write_text, sha256_file
from adapterkit.library.metadata import CONFIG_FILE, WEIGHTS_FILE
from adapterkit.library.store import Library, PocketBook
from adapterkit.serving.names import resolve as resolve_model

log = logging.getLogger(__name__)

#: The entry point's name in ``vllm.general_plugins`` (pyproject), as ``VLLM_PLUGINS`` lists it.
PLUGIN_NAME = "adapterkit"
INSTALL = "pip install 'adapterkit[vllm]' on a machine with a GPU"
#: ``--max-lora-rank`` values vLLM accepts (``MaxLoRARanks``, vllm/config/lora.py).
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
#: How many hex digits of the content hash a name carries.
DIGITS = 12
# What `vllm_command` tells the resolver in vLLM's processes.
ENV_FOLDER = "ADAPTERKIT_VLLM_BASE_FOLDER"
ENV_BASE_ID = "ADAPTERKIT_VLLM_BASE_ID"
ENV_MAX_RANK = "ADAPTERKIT_VLLM_MAX_LORA_RANK"
ENV_STATE = "ADAPTERKIT_VLLM_STATE"
_MANIFEST = "adapterkit-flattened.json"


def vllm_modules() -> tuple[Any, Any]:
    """``(vllm.lora.request, vllm.lora.resolver)``, or :class:`MissingDependency`."""
    try:
        import vllm.lora.request as request
        import vllm.lora.resolver as resolver
    except ImportError:
        raise MissingDependency(f"adapterkit serve --engine vllm needs vLLM: {INSTALL}") from None
    return request, resolver


@dataclass(frozen=True)
class ServedBase:
    """The base vLLM serves, as the checks read a loaded base (``name``, ``fingerprint``,
    ``source.folder``: see :func:`adapterkit.base.compat.check_base`), without its weights."""

    source: BaseSource
    fingerprint: str

    @property
    def name(self) -> str:
        return self.source.name

    @classmethod
    def of(cls, spec: str, home: str | os.PathLike[str] | None = None, *,
           progress: Progress | None = None) -> ServedBase:
        """Resolve ``spec`` as every command does — a GGUF file or alias is converted once to a
        safetensors folder, which is what vLLM then serves — and remember it, so pocket books
        and stacks of this base find it again (:func:`adapterkit.base.resolve.remember_base`)."""
        source = resolve_base(spec, home, progress=progress)
        fp = fingerprint(source.folder)
        remember_base(home, fp, canonical_spec(spec, source))
        return cls(source, fp)


@dataclass(frozen=True)
class Resolved:
    """What a ``model`` name means to vLLM: the fields of its ``LoRARequest``."""

    name: str  #: ``KEY#CONTENT``
    lora_int_id: int
    path: Path
    rank: int


class AdapterkitResolver:
    """vLLM's ``LoRAResolver`` (vllm/lora/resolver.py) over an adapterkit library and one base.

    :meth:`resolve` is the adapterkit half (no vLLM needed); :meth:`resolve_lora` is vLLM's hook.
    :func:`register` hands vLLM an instance of a subclass that also derives from vLLM's ABC.
    """

    def __init__(self, library: Library, base: ServedBase, *, max_rank: int = VLLM_RANKS[-1],
                 state: Path | None = None) -> None:
        self.library, self.base, self.max_rank, self.state = library, base, max_rank, state
        self.cache = library.home / "serving" / "vllm"
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> AdapterkitResolver | None:
        """The resolver :func:`vllm_command` describes in the environment, or None outside it."""
        env = os.environ if environ is None else environ
        if not env.get(ENV_FOLDER):
            return None
        folder = Path(env[ENV_FOLDER])
        base = ServedBase(BaseSource(env.get(ENV_BASE_ID) or folder.name, folder),
                          fingerprint(folder))
        return cls(Library(env.get("ADAPTERKIT_HOME") or None), base,
                   max_rank=int(env.get(ENV_MAX_RANK) or VLLM_RANKS[-1]),
                   state=Path(env[ENV_STATE]) if env.get(ENV_STATE) else None)

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> Any:
        """vLLM's hook: a ``LoRARequest`` for ``lora_name``, or None where the library has no
        such pocket book (vLLM answers 404). A pocket book that exists but cannot be served on
        this base is refused with a ``ValueError`` carrying our message: vLLM's routes catch it
        and answer with it (400 in current vLLM; 500 in some older releases), caching nothing.
        """
        request_module, _ = vllm_modules()
        if Path(base_model_name).expanduser().resolve() != self.base.source.folder.resolve():
            log.warning("adapterkit resolver: vLLM serves %s, not %s; not resolving %r",
                        base_model_name, self.base.source.folder, lora_name)
            return None
        try:  # hashing and flattening read files: off vLLM's event loop (as hf_hub_resolver.py)
            found = await asyncio.to_thread(self.resolve, lora_name)
        except AdapterkitError as exc:
            raise ValueError(str(exc)) from None
        if found is None:
            return None
        self.remember(lora_name, found.name)
        return request_module.LoRARequest(lora_name=found.name, lora_int_id=found.lora_int_id,
                                          lora_path=str(found.path),
                                          base_model_name=base_model_name)

    def resolve(self, model: str) -> Resolved | None:
        """What ``model`` — ``NAME``, ``NAME@V``, a stack, or a name vLLM listed
        (``KEY#CONTENT``) — means on this base now; None where there is no such pocket book.

        Raises :class:`~adapterkit.errors.BaseMismatch` (both fingerprints named) for another
        base's, :class:`~adapterkit.errors.InvalidAdapter` for damaged files or tensors that do
        not fit, :class:`ConfigError` for bad stack syntax or a rank above ``max_rank``.
        """
        from adapterkit.library.integrity import base_structure, check_book
        from adapterkit.library.peft_folder import read_config

        found = self.members(model)
        if found is None:
            return None
        key, books, content = found
        _refuse_quantized(self.library, key, [book for book, _ in books])
        structure = base_structure(self.base)
        for book, _ in books:  # the files as saved, and every tensor on a layer of this base
            check_book(book, structure)
        book, weight = books[0]
        if len(books) == 1 and weight == 1.0 and _plain(book):
            path, rank = book.path, max_rank(read_config(book.path))
        else:
            path, rank = self._flattened(books, content)
        if rank > self.max_rank:
            raise ConfigError(f"{key} needs LoRA rank {rank}, above this server's "
                              f"--max-lora-rank {self.max_rank}; restart it with "
                              f"--max-lora-rank {vllm_rank(rank)}")
        return Resolved(f"{key}#{content[:DIGITS]}", lora_id(content), path, rank)

    def members(self, model: str) -> tuple[str, list[tuple[PocketBook, float]], str] | None:
        """``(canonical key, [(pocket book, weight)], content hash)`` for ``model``, or None;
        names are read as the adapterkit engine reads them (:func:`adapterkit.serving.names
        .resolve`), afresh from the library each call."""
        wanted, _, digits = model.partition("#")
        if not wanted.strip() or wanted.strip() == self.base.name:
            return None  # vLLM serves the plain base itself
        try:
            target = resolve_model(self.library, self.base, wanted, base_id=self.base.name)
        except PocketBookNotFound:
            return None
        books = [(self.library.get(ref), weight) for ref, weight in target.members]
        content = content_key(books)
        if digits and digits != content[:DIGITS]:
            return None  # content the library no longer gives that name
        return target.key, books, content

    def current_name(self, model: str) -> str | None:
        """The ``KEY#CONTENT`` name ``model`` would resolve to now, or None (cheap: no file is
        checked or written)."""
        try:
            found = self.members(model)
        except AdapterkitError:
            return None
        return None if found is None else f"{found[0]}#{found[2][:DIGITS]}"

    def remember(self, asked: str, name: str) -> None:
        """Record that vLLM now keeps ``asked`` as ``name`` (for :class:`Refresher`)."""
        if self.state is None:
            return
        with self._lock:
            known = read_state(self.state)
            known[asked] = name
            atomic_write_text(self.state, json.dumps(known, indent=1, sort_keys=True))

    def _flattened(self, books: list[tuple[PocketBook, float]], content: str) -> tuple[Path, int]:
        """One plain PEFT adapter equal to the weighted members, kept under its content hash
        (so it is never stale); what vLLM cannot apply exactly is refused by name there."""
        from safetensors.torch import save_file

        from adapterkit.lora.combine import concatenate, inputs_of

        folder = self.cache / content[:32]
        rank = _intact_rank(folder)
        if rank is not None:
            return folder, rank
        out = concatenate(inputs_of(self.library, [b for b, _ in books]),
                          [w for _, w in books], path="serve --engine vllm")
        tmp = self.cache / f".{folder.name}.partial-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            (tmp / CONFIG_FILE).write_text(json.dumps(out.config, indent=2), encoding="utf-8")
            save_file({k: v.contiguous() for k, v in out.tensors.items()}, str(tmp / WEIGHTS_FILE),
                      metadata={"format": "pt"})
            manifest = {"members": [[b.ref, w] for b, w in books], "rank": int(out.config["r"]),
                        "files": {n: sha256_file(tmp / n) for n in (CONFIG_FILE, WEIGHTS_FILE)}}
            (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
            if folder.exists():  # damaged (or written meanwhile by another process): replace
                shutil.rmtree(folder, ignore_errors=True)
            os.rename(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return folder, int(out.config["r"])


def _refuse_quantized(library: Library, key: str, books: list[PocketBook]) -> None:
    """vLLM serves the base in full precision here: a pocket book trained on a 4-bit base
    (``qlora``) would answer otherwise than ``adapterkit generate`` does, which loads that base
    as it was trained (the rule of every path: :func:`adapterkit.runtime.session
    .refuse_other_quantization`)."""
    from adapterkit.runtime.session import refuse_other_quantization

    refuse_other_quantization(books, None, library, holder="vLLM (here)",
                              fix=f"serve {key} with `adapterkit serve --preload {key}`, which "
                                  "loads the base as it was trained")


def content_key(members: list[tuple[PocketBook, float]]) -> str:
    """Hex SHA-256 of the members' file hashes (recorded at save; computed for entries saved
    before 0.2) and weights: what decides what the adapter computes, nothing else."""
    h = hashlib.sha256(b"adapterkit-vllm-1\n")
    for book, weight in members:
        hashes = [book.meta.files.get(n) or sha256_file(book.path / n)
                  for n in (CONFIG_FILE, WEIGHTS_FILE)]
        h.update(json.dumps([*hashes, float(weight)]).encode())
    return h.hexdigest()


def lora_id(content: str) -> int:
    """A ``lora_int_id`` in 1..2³¹-1 (vLLM requires > 0) drawn from the content hash."""
    return int(content[:15], 16) % (2**31 - 1) + 1


def max_rank(config: Mapping[str, Any]) -> int:
    """The largest rank an adapter's config gives a layer (``r`` or a ``rank_pattern`` entry)."""
    return max([int(config.get("r", 8)), *(int(v) for v in (config.get("rank_pattern") or {})
                                           .values())])


def vllm_rank(rank: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds ``rank`` (at most 512)."""
    return next((r for r in VLLM_RANKS if r >= rank), VLLM_RANKS[-1])


def library_rank(resolver: AdapterkitResolver) -> int:
    """The ``--max-lora-rank`` the base's pocket books and saved stacks need once flattened
    (ranks add up where stacked members share a layer), as vLLM accepts it; 16 (vLLM's
    default) for an empty library. Books that cannot be served are refused when asked for."""
    from adapterkit.library.peft_folder import read_config

    need = 0
    for summary in resolver.library.list(base=resolver.base.fingerprint):
        if summary.base_fingerprint != resolver.base.fingerprint or summary.trainer == "reward":
            continue
        try:
            found = resolver.members(f"{summary.name}@{summary.version}")  # NAME may be the base
            if found is not None:
                need = max(need, sum(max_rank(read_config(b.path)) for b, _ in found[1]))
        except AdapterkitError:
            continue
    return vllm_rank(need) if need else 16


def _plain(book: PocketBook) -> bool:
    """Whether vLLM reads ``book``'s folder as PEFT does: plain linear LoRA with one rank and
    alpha per config (vLLM's ``PEFTHelper`` ignores ``rank_pattern``/``alpha_pattern``,
    vllm/lora/peft_helper.py, and refuses DoRA and ``modules_to_save``)."""
    from adapterkit.library.peft_folder import read_config
    from adapterkit.lora.factors import features, saved_names

    config = read_config(book.path)
    return not (config.get("rank_pattern") or config.get("alpha_pattern")
                or features(config, saved_names(book.path)))


def _intact_rank(folder: Path) -> int | None:
    """The rank of a flattened adapter whose files still match its manifest, else None."""
    try:
        manifest = json.loads((folder / _MANIFEST).read_text(encoding="utf-8"))
        if all(sha256_file(folder / n) == h for n, h in manifest["files"].items()):
            return int(manifest["rank"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def read_state(path: Path) -> dict[str, str]:
    """``model`` string → the ``KEY#CONTENT`` name vLLM keeps for it ({} when unreadable)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def register() -> None:
    """vLLM's ``vllm.general_plugins`` entry point: register the resolver that
    :func:`vllm_command` describes. Called in every vLLM process (vllm/plugins/__init__.py);
    outside ``adapterkit serve --engine vllm`` (no ``ADAPTERKIT_VLLM_BASE_FOLDER``) it does
    nothing, as vLLM's filesystem resolver does without its cache folder."""
    if not os.environ.get(ENV_FOLDER):
        return
    _, resolver_module = vllm_modules()
    # A true subclass of vLLM's ABC, built here because vLLM is imported only now.
    kind: type[AdapterkitResolver] = type(
        "AdapterkitResolver", (AdapterkitResolver, resolver_module.LoRAResolver), {})
    resolver_module.LoRAResolverRegistry.register_resolver(PLUGIN_NAME, kind.from_env())


@dataclass
class Refresher:
    """Keeps vLLM's pinned names current: every ``interval`` seconds, each ``model`` string
    vLLM keeps (recorded by the resolver in the state file; preloads seeded by the CLI) is
    resolved again, and those that now mean other content are unloaded through vLLM's
    ``POST /v1/unload_lora_adapter`` (vllm/entrypoints/openai/models/serving.py
    ``unload_lora_adapter``), so the next request for them resolves afresh."""

    resolver: AdapterkitResolver
    url: str
    api_key: str | None = None
    interval: float = 2.0
    _done: set[tuple[str, str]] = field(default_factory=set, repr=False)

    def stale(self) -> dict[str, str]:
        """``model`` string → the name vLLM keeps for it, for those that mean other content."""
        known = read_state(self.resolver.state) if self.resolver.state else {}
        return {asked: kept for asked, kept in known.items() if (asked, kept) not in self._done
                and self.resolver.current_name(asked) != kept}

    def step(self) -> list[str]:
        """Unload the stale names; the ``model`` strings unloaded (or already gone)."""
        unloaded = []
        for asked, kept in self.stale().items():
            if self._unload(asked):
                self._done.add((asked, kept))
                unloaded.append(asked)
        return unloaded

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval):
            try:
                self.step()
            except Exception as exc:  # a refresh must never take the server down
                log.warning("adapterkit: refreshing vLLM's names failed: %s", exc)

    def _unload(self, asked: str) -> bool:
        body = json.dumps({"lora_name": asked}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(f"{self.url.rstrip('/')}/v1/unload_lora_adapter",
                                         data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=10):
                return True
        except urllib.error.HTTPError as exc:
            return exc.code == 404  # not loaded (any more): nothing to unload
        except OSError:
            return False  # not up yet: try again next time


def vllm_command(base: ServedBase, *, home: str | os.PathLike[str], host: str = "127.0.0.1",
                 port: int = 8000, max_loras: int = 8, max_lora_rank: int = 16,
                 max_num_seqs: int | None = None, preload: Mapping[str, Path] | None = None,
                 api_key: str | None = None, state: Path | None = None,
                 environ: Mapping[str, str] | None = None, program: str = "vllm"
                 ) -> tuple[list[str], dict[str, str]]:
    """The ``vllm serve`` command line and environment that serve ``base`` with LoRA, names
    resolved by this module (``vllm serve --help`` documents each flag).

    :param preload: ``model`` name → checked adapter folder, loaded at start (``--lora-modules``).
    :param api_key: passed as ``VLLM_API_KEY`` (vLLM reads ``args.api_key or VLLM_API_KEY``),
        never on the command line, which other users of the machine can read.
    """
    if max_lora_rank not in VLLM_RANKS:
        raise ConfigError(f"--max-lora-rank {max_lora_rank}: vLLM takes one of "
                          f"{', '.join(map(str, VLLM_RANKS))}")
    argv = [program, "serve", str(base.source.folder), "--served-model-name", base.name,
            "--host", host, "--port", str(port), "--enable-lora",
            "--max-loras", str(max_loras), "--max-lora-rank", str(max_lora_rank)]
    if max_num_seqs is not None:
        argv += ["--max-num-seqs", str(max_num_seqs)]
    if preload:
        argv += ["--lora-modules", *(f"{name}={path}" for name, path in preload.items())]
    env = dict(os.environ if environ is None else environ)
    # Only resolvers of plugins VLLM_PLUGINS allows run; ours is added to a list the user set.
    # Unset, it allows ours alone: vLLM's filesystem resolver would answer names unchecked.
    plugins = [p.strip() for p in env.get("VLLM_PLUGINS", "").split(",") if p.strip()]
    env.update({
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1",  # else vLLM never asks a resolver
        "VLLM_PLUGINS": ",".join(plugins + [PLUGIN_NAME] * (PLUGIN_NAME not in plugins)),
        "ADAPTERKIT_HOME": str(Path(home).expanduser().resolve()),
        ENV_FOLDER: str(base.source.folder), ENV_BASE_ID: base.name,
        ENV_MAX_RANK: str(max_lora_rank),
    })
    env.pop("VLLM_API_KEY", None)  # a key the user did not give here must not lock them out
    if api_key:
        env["VLLM_API_KEY"] = api_key
    env.pop(ENV_STATE, None)
    if state is not None:
        env[ENV_STATE] = str(state)
    return argv, env


def check_runnable() -> None:
    """Refuse, in one line, a machine where vLLM cannot serve: no vLLM with the resolver
    interface, or no GPU."""
    vllm_modules()
    if not gpu_available():
        raise MissingDependency("adapterkit serve --engine vllm needs a CUDA GPU, and torch sees "
                                "none here; on this machine serve with --engine adapterkit")


def gpu_available() -> bool:
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.device_count() > 0)


def program() -> str:
    """The ``vllm`` command of this Python environment (where the plugin is installed)."""
    beside = Path(sys.executable).with_name("vllm")
    found = str(beside) if beside.is_file() else shutil.which("vllm")
    if not found:
        raise MissingDependency(f"the `vllm` command is not installed: {INSTALL}")
    return found


def run(argv: list[str], env: dict[str, str], *, refresher: Refresher | None = None) -> int:
    """Run ``vllm serve`` until it exits (Ctrl+C stops it), refreshing names meanwhile; its
    exit code."""
    stop = threading.Event()
    if refresher is not None:
        threading.Thread(target=refresher.run, args=(stop,), daemon=True,
                         name="adapterkit-vllm-refresh").start()
    process = subprocess.Popen(argv, env=env)
    try:
        return process.wait()
    except KeyboardInterrupt:  # a terminal's Ctrl+C reached vLLM too: let it shut down
        try:
            return process.wait(timeout=30)
        except subprocess.TimeoutExpired:  # it did not (a signal to this process alone)
            process.terminate()
            return process.wait()
    finally:
        stop.set()
