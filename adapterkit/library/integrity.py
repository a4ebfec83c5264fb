"""Re-checking a library pocket book's files each time they are loaded or copied.

Import checks an adapter once, on the way in; after that its folder can still be damaged (a
disk, a half-copied backup, a hand edit). A damaged file must be refused with what to do, not
reach PEFT or safetensors — which give a traceback, or worse, load weights for another model with
only a warning and answer like the plain base. :func:`check_book` is cheap enough to run on
every load: it hashes the few MB of a LoRA and reads its safetensors header, never its tensors.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterkit.errors import AdapterkitError, InvalidAdapter
from adapterkit.files import sha256_file
from adapterkit.library.metadata import CONFIG_FILE, HASHED_FILES, WEIGHTS_FILE
from adapterkit.library.peft_folder import (
    AdapterFiles,
    config_problems,
    fit_problems,
    read_config,
    read_shapes,
    summarize,
)

if TYPE_CHECKING:  # pragma: no cover
    from adapterkit.base.load import BaseStructure
    from adapterkit.library.store import PocketBook

#: What a user can do about a damaged pocket book: its name@version stays taken until doctor
#: moves it aside (a re-import straight away was refused as "already exists").
REPAIR = ("`adapterkit doctor` moves it to quarantine; then re-import or re-train it "
          "(--name NAME@V gives it back its number)")
#: Pickle formats: loading one can run code, and adapterkit never writes one into the library.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def check_book(book: PocketBook, structure: BaseStructure | None = None) -> None:
    """Raise :class:`InvalidAdapter` (one line: the file, what is wrong, what to do) unless
    ``book``'s folder is as it was saved and fits ``structure``, the base it is loaded on.

    Checked: no pickle and no link in the folder; the SHA-256 of ``adapter_config.json`` and
    ``adapter_model.safetensors`` against those recorded when it was saved (``meta.files``;
    pocket books saved before 0.2 recorded none, and get the other checks only); the config is a
    JSON object; the safetensors header is whole, and with a ``structure`` every tensor lands
    on that base and its config targets every LoRA it holds, at its rank. A stack has no files
    of its own to load: check each of its members.
    """
    folder = book.path
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        raise InvalidAdapter(f"{book.ref}: cannot read its folder {folder} ({exc}); "
                             f"{REPAIR}") from None
    for item in entries:
        if item.is_symlink():
            raise InvalidAdapter(f"{book.ref}: {item} is a link; a library folder holds only "
                                 f"files adapterkit wrote: remove it, or {REPAIR}")
        if item.suffix.lower() in PICKLE_SUFFIXES:
            raise InvalidAdapter(f"{book.ref}: {item} is a pickle, which can run code when "
                                 "loaded, and adapterkit never saves one in the library: remove "
                                 f"it, or {REPAIR}")
    if book.meta.kind != "adapter":
        return
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise InvalidAdapter(f"{book.ref}: {folder / name} is missing; {REPAIR}")
    for name in HASHED_FILES:
        recorded = book.meta.files.get(name)
        if recorded and sha256_file(folder / name) != recorded:
            raise InvalidAdapter(f"{book.ref}: {folder / name} does not match the SHA-256 "
                                 f"recorded when it was saved (damaged or changed since); "
                                 f"{REPAIR}")
    try:
        config = read_config(folder)
        shapes = read_shapes(folder / WEIGHTS_FILE)
    except InvalidAdapter as exc:
        raise InvalidAdapter(f"{book.ref}: {exc}; {REPAIR}") from None
    if not shapes:
        raise InvalidAdapter(f"{book.ref}: {folder / WEIGHTS_FILE} holds no tensors; {REPAIR}")
    if structure is not None:
        adapter = AdapterFiles(folder, config, shapes, pickled=False)
        problems = fit_problems(adapter, structure)
        if problems:
            raise InvalidAdapter(
                f"{book.ref}: {folder / WEIGHTS_FILE} does not fit base "
                f"{structure.architecture}: {summarize(problems)}. It was made for another "
                f"base, or damaged: if `adapterkit show {book.ref}` names another base, load "
                "it with that one; if it names this one, remove it (`adapterkit rm "
                f"{book.ref} --force`) and re-import or re-train it (doctor, which does not "
                "load the base, cannot tell)")
        problems = config_problems(adapter, structure)  # imported before this was checked
        if problems:
            raise InvalidAdapter(
                f"{book.ref}: {summarize(problems)}. Its {CONFIG_FILE} does not describe its "
                f"weights; correct the adapter and import it again, or re-train it")


def base_structure(base: Any) -> BaseStructure:
    """The structure of a loaded :class:`~adapterkit.base.load.Base`, built once per base
    (its fingerprint names its config and weights) rather than on every load."""
    return _structure(base.fingerprint, str(base.source.folder))


def recorded_structure(book: PocketBook, home: Path) -> BaseStructure | None:
    """The structure of the base ``book`` records, where that base is on this machine (or is
    a Hub id, fetched as loading it would); None where it cannot be found."""
    from adapterkit.base.load import inspect_structure
    from adapterkit.base.resolve import base_spec_for, resolve_base

    try:
        return inspect_structure(resolve_base(base_spec_for(book.meta.base, home), home).folder)
    except AdapterkitError:
        return None


@functools.lru_cache(maxsize=8)
def _structure(fingerprint: str, folder: str) -> BaseStructure:
    # ``fingerprint`` is part of the key: a folder whose model changed is read again.
    from adapterkit.base.load import inspect_structure

    return inspect_structure(Path(folder))


def held_weights(book: PocketBook) -> str:
    """The SHA-256 of ``book``'s weights file: as recorded, or (a book saved before hashes
    were recorded) hashed from the file now; ``"none"`` without one."""
    held = book.meta.files.get(WEIGHTS_FILE)
    if held:
        return held
    weights = book.path / WEIGHTS_FILE
    return sha256_file(weights) if weights.is_file() else "none"
