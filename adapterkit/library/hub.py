"""Sharing pocket books through the Hugging Face Hub.

Everything goes through ``huggingface_hub`` (``create_repo``, ``upload_folder``,
``snapshot_download``): the user's login, ``HF_TOKEN`` and ``HF_ENDPOINT`` are honoured as in
every other Hub tool, downloads land in the Hub cache, and no token is ever printed.

What is pushed is a valid PEFT repository — ``adapter_config.json``,
``adapter_model.safetensors``, ``adapterkit.json`` (with the SHA-256 of every file, checked on
pull) and a ``README.md`` model card — so PEFT, vLLM, TGI and LoRAX users can load it without
adapterkit. Pull works for any PEFT LoRA repository, not only ours.

A pull trusts nothing the repo says about itself: every pull runs import's checks (LoRA config,
whole safetensors header, every tensor fits the base) whatever ``adapterkit.json`` records.
The hashes it records prove the download is what was pushed (integrity), not who pushed it
(authorship): whoever can write to the repo can write matching hashes.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterkit.errors import AdapterkitError, InvalidAdapter, InvalidName
from adapterkit.files import sha256_file
from adapterkit.library.card import render_card
from adapterkit.library.integrity import check_book
from adapterkit.library.metadata import (
    CARD_FILE,
    CONFIG_FILE,
    METADATA_FILE,
    WEIGHTS_FILE,
    PocketBookMeta,
)
from adapterkit.library.store import PocketBook

if TYPE_CHECKING:  # pragma: no cover
    from adapterkit.library.peft_folder import AdapterFiles
    from adapterkit.library.store import Library

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
_PULL_PATTERNS = [CONFIG_FILE, WEIGHTS_FILE, "adapter_model.bin", METADATA_FILE, CARD_FILE,
                  "*.png"]


class HubError(AdapterkitError):
    """A Hub operation failed (authentication, permissions, network, missing repo...)."""


class HubWarning(UserWarning):
    """A pulled pocket book may not fit the base the user named."""


@dataclass
class PushResult:
    repo_id: str
    revision: str
    commit_url: str
    files: list[str]


def parse_repo(text: str) -> tuple[str, str | None]:
    """``owner/name`` or ``owner/name@revision`` → ``(repo_id, revision)``."""
    repo_id, _, revision = text.partition("@")
    if not _REPO_ID.fullmatch(repo_id) or ".." in repo_id or "--" in repo_id:
        raise InvalidName(f"invalid Hub repo id {text!r}: write OWNER/NAME (letters, digits, "
                          "'-', '_', '.'), optionally @REVISION")
    return repo_id, (revision or None)


def _api(token: str | None = None) -> Any:
    from huggingface_hub import HfApi

    return HfApi(token=token)


def _explain(exc: Exception, repo_id: str, revision: str | None = None) -> HubError:
    """A readable :class:`HubError` for a ``huggingface_hub`` / network exception."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = constants.ENDPOINT
    if isinstance(exc, RevisionNotFoundError):
        return HubError(f"revision {revision!r} does not exist in {repo_id}")
    if isinstance(exc, GatedRepoError):
        return HubError(f"{repo_id} is gated: accept its conditions on the Hub first")
    if isinstance(exc, RepositoryNotFoundError):
        return HubError(f"repo {repo_id} does not exist, or it is private and your token cannot "
                        "see it (log in with `hf auth login` or set HF_TOKEN)")
    if isinstance(exc, HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        server = getattr(exc, "server_message", None) or str(exc).splitlines()[0]
        if status == 401:
            return HubError(f"the Hub at {endpoint} refused your credentials; log in with "
                            "`hf auth login` or set HF_TOKEN")
        if status == 403:
            return HubError(f"no permission to write to {repo_id}: it belongs to another "
                            f"user or organization (server said: {server})")
        return HubError(f"the Hub at {endpoint} answered {status}: {server}")
    if isinstance(exc, LocalEntryNotFoundError) or _is_network(exc):
        return HubError(f"cannot reach the Hub at {endpoint} ({type(exc).__name__}); check the "
                        "connection (and HF_ENDPOINT) and retry — nothing was changed")
    return HubError(f"Hub operation on {repo_id} failed: {type(exc).__name__}: {exc}")


def _is_network(exc: BaseException) -> bool:
    names = {type(e).__name__ for e in _chain(exc)}
    return bool(names & {"ConnectError", "ConnectTimeout", "ReadTimeout", "ConnectionError",
                         "TimeoutException", "NetworkError", "RemoteProtocolError",
                         "OfflineModeIsEnabled"})


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def whoami(token: str | None = None) -> str:
    """The user name the Hub knows the current token by; :class:`HubError` when logged out."""
    from huggingface_hub.errors import LocalTokenNotFoundError

    try:
        return str(_api(token).whoami()["name"])
    except LocalTokenNotFoundError:
        raise HubError("not logged in to the Hub: run `hf auth login`, or set HF_TOKEN") from None
    except Exception as exc:
        raise _explain(exc, "your account") from None


def push(library: Library, ref: str, repo: str, *, private: bool = False,
         revision: str | None = None, message: str | None = None, license: str | None = None,
         token: str | None = None) -> PushResult:
    """Upload a pocket book to ``repo`` (``owner/name``) as a PEFT repository with a card."""
    repo_id, at = parse_repo(repo)
    if at:
        raise InvalidName(f"give the branch with --revision, not in the repo id ({repo!r})")
    book = library.get(ref)
    if book.meta.kind != "adapter":
        raise InvalidAdapter(f"{book.ref} is a {book.meta.kind}; flatten it before pushing")
    check_book(book)  # a damaged pocket book is never shared
    whoami(token)
    if book.meta.stacked_on:
        warnings.warn(f"{book.ref} is trained on top of {', '.join(book.meta.stacked_on)}: push "
                      "those too — it needs them underneath (its model card says how to load "
                      "the stack)", HubWarning, stacklevel=2)
    api = _api(token)
    branch = revision or "main"
    with tempfile.TemporaryDirectory(prefix="adapterkit-push-") as tmp:
        folder = Path(tmp)
        files = _prepare_upload(book, folder, license=license)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            if branch != "main":
                api.create_branch(repo_id, branch=branch, exist_ok=True)
            info = api.upload_folder(
                repo_id=repo_id, folder_path=str(folder), revision=branch,
                commit_message=message or f"Upload pocket book {book.ref} with adapterkit",
            )
        except Exception as exc:
            raise _explain(exc, repo_id, branch) from None
    url = getattr(info, "commit_url", None) or str(info)
    return PushResult(repo_id, branch, url, files)


def _prepare_upload(book: PocketBook, folder: Path, *, license: str | None) -> list[str]:
    """Copy the PEFT files, a refreshed card and metadata with file hashes into ``folder``."""
    names = [CONFIG_FILE, WEIGHTS_FILE] + [p.name for p in book.path.glob("*.png")]
    for name in names:
        shutil.copy2(book.path / name, folder / name)
    meta = PocketBookMeta.from_dict(json.loads(book.meta.to_json()))
    (folder / CARD_FILE).write_text(render_card(meta, license=license), encoding="utf-8")
    data = json.loads(meta.to_json())
    data["files"] = {name: sha256_file(folder / name) for name in names + [CARD_FILE]}
    (folder / METADATA_FILE).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n",
                                        encoding="utf-8")
    return sorted(names + [CARD_FILE, METADATA_FILE])


def pull(library: Library, repo: str, *, name: str | None = None, base: str | None = None,
         trust_pickle: bool = False, token: str | None = None) -> PocketBook:
    """Download a PEFT LoRA repository (``owner/name[@revision]``) into the library.

    Checked as :meth:`Library.import_peft` checks a folder, whatever the repo's own
    ``adapterkit.json`` says; the hashes it records are checked too (they show the files are
    the ones pushed, not who pushed them). A file they do not cover is said to be unchecked
    (:class:`HubWarning`), never silently passed.
    """
    from huggingface_hub import snapshot_download

    repo_id, revision = parse_repo(repo)
    ref = library.reserve(name or repo_id.split("/")[1])
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, token=token,
                                        allow_patterns=_PULL_PATTERNS))
    except Exception as exc:
        raise _explain(exc, repo_id, revision) from None
    return _import_download(library, folder, str(ref), repo_id=repo_id,
                            revision=revision or "main", base=base, trust_pickle=trust_pickle)


def _read_recorded(folder: Path, repo_id: str, within: Path) -> dict[str, Any] | None:
    """The repo's ``adapterkit.json`` as a JSON object, None where it has none; refused (one
    line) where it is not one: what it records (base, hashes) cannot then be read."""
    from adapterkit.library.peft_folder import own_file

    path = own_file(folder, METADATA_FILE, within=within)
    if path is None:
        return None
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidAdapter(f"{repo_id}: its {METADATA_FILE} is not valid JSON ({exc}); "
                             "nothing was imported") from None
    if not isinstance(recorded, dict):
        raise InvalidAdapter(f"{repo_id}: its {METADATA_FILE} is not a JSON object, so the "
                             "base and hashes it should record cannot be read; nothing was "
                             "imported")
    return recorded


def _verify(folder: Path, recorded: dict[str, Any], names: list[str], *, repo_id: str,
            within: Path) -> None:
    """Check the SHA-256 that ``adapterkit.json`` records for each downloaded file; warn,
    naming them, about files among ``names`` (those that will join the library) it records
    none for."""
    from adapterkit.library.peft_folder import own_file

    files = recorded.get("files")
    checked = set()
    for fname, digest in (files.items() if isinstance(files, dict) else ()):
        if not isinstance(digest, str) or fname not in names:
            continue  # not a file that joins the library (or not a hash): nothing to check
        path = own_file(folder, fname, within=within)
        if path is not None and sha256_file(path) != digest:
            raise InvalidAdapter(f"{fname} from the Hub does not match the SHA-256 its "
                                 "adapterkit.json records: the download is corrupt or was "
                                 "altered; pull again")
        checked.add(fname)
    unchecked = [n for n in names if n not in checked]
    if unchecked:
        warnings.warn(f"{repo_id}: its {METADATA_FILE} records no SHA-256 for "
                      f"{', '.join(unchecked)}, so they could not be checked against what was "
                      "pushed", HubWarning, stacklevel=4)


def _recorded_meta(recorded: dict[str, Any], repo_id: str) -> PocketBookMeta:
    try:
        meta = PocketBookMeta.from_dict(recorded)
    except (TypeError, ValueError) as exc:
        raise InvalidAdapter(f"{repo_id}: its {METADATA_FILE} is not pocket-book metadata "
                             f"({exc}); nothing was imported") from None
    if not isinstance(meta.base, dict) or not isinstance(meta.stacked_on, list):
        raise InvalidAdapter(f"{repo_id}: its {METADATA_FILE} is not pocket-book metadata "
                             "(base, stacked_on); nothing was imported")
    return meta


def _import_download(library: Library, folder: Path, name: str, *, repo_id: str, revision: str,
                     base: str | None, trust_pickle: bool) -> PocketBook:
    from adapterkit.library.peft_folder import (
        PICKLE_FILE,
        copy_files,
        import_peft_folder,
        read_adapter,
    )

    within = folder.parent.parent  # the cache repo: a snapshot's files are links to its blobs
    # refuses a non-LoRA repo, a damaged header, a link out of the cache, early
    adapter = read_adapter(folder, trust_pickle=trust_pickle, within=within)
    source = {"kind": "hub", "repo_id": repo_id, "revision": revision, "commit": folder.name}
    recorded = _read_recorded(folder, repo_id, within)
    if recorded is None:
        _warn_if_card_names_other_base(folder, base)
        return import_peft_folder(library, folder, name, base=base, trust_pickle=trust_pickle,
                                  source=source, within=within)
    weights = PICKLE_FILE if adapter.pickled else WEIGHTS_FILE
    names = [n for n in (CONFIG_FILE, weights, CARD_FILE) if (folder / n).exists()]
    names += sorted(p.name for p in folder.glob("*.png"))
    meta = _recorded_meta(recorded, repo_id)
    _verify(folder, recorded, names, repo_id=repo_id, within=within)
    _check_on_its_base(library, adapter, meta, base, name=name, repo_id=repo_id)
    meta.source = source
    meta.tags = []
    meta.kind = "adapter"  # what was pulled is one PEFT adapter, whatever the file says
    missing = [r for r in meta.stacked_on if not library.exists(r)]
    if missing:
        warnings.warn(f"{repo_id} is trained on top of {', '.join(missing)}, which this library "
                      "does not have: pull or train those under the same names before using it",
                      HubWarning, stacklevel=2)
    with library.draft() as staged:
        # trusted pickled weights are written as safetensors (copy_files converts them)
        copy_files(adapter, staged, tuple(WEIGHTS_FILE if n == PICKLE_FILE else n for n in names),
                   within=within)
        return library.commit(staged, meta, name=name)


def _check_on_its_base(library: Library, adapter: AdapterFiles, meta: PocketBookMeta,
                       base: str | None, *, name: str, repo_id: str) -> None:
    """Import's checks against the base the pocket book records where this machine has it,
    else against ``base``; where neither can be done, say so (it is checked when loaded)."""
    from adapterkit.base.fingerprints import fingerprint
    from adapterkit.base.resolve import find_base, resolve_base
    from adapterkit.library.peft_folder import _refuse_base_rewriting, check_on_base

    target, advice = None, ("its adapterkit.json names the wrong base, or the weights were "
                            "changed after it was written; nothing was imported")
    known = find_base(library.home, meta.base_fingerprint) if meta.base_fingerprint else None
    if known:
        try:
            target = resolve_base(known, library.home).folder
        except AdapterkitError:
            target = None
    if base is not None:
        given = resolve_base(base, library.home).folder
        fp = fingerprint(given)
        if fp != meta.base_fingerprint:
            warnings.warn(
                f"this pocket book was made on base {meta.base.get('name')} (fingerprint "
                f"{meta.base_fingerprint[:12]}), not on {base} (fingerprint {fp[:12]}); it will "
                "be refused when attached to that base", HubWarning, stacklevel=4)
        if target is None:
            target, advice = given, "pass the base it was made on with --base"
    if target is None:
        _refuse_base_rewriting(adapter)  # needs no base: refused whatever the base
        warnings.warn(f"{repo_id} was made on base {meta.base.get('name')}, which is not on this "
                      "machine, so its weights could not be checked against it now; they are "
                      "checked when it is loaded (or pass --base to check now)", HubWarning,
                      stacklevel=4)
        return
    check_on_base(adapter, target, name=name, label=repo_id, advice=advice)


def _warn_if_card_names_other_base(folder: Path, base: str | None) -> None:
    if base is None or not (folder / CARD_FILE).is_file():
        return
    from huggingface_hub import ModelCard

    card_base = ModelCard.load(folder / CARD_FILE).data.to_dict().get("base_model")
    if card_base and isinstance(card_base, str) and card_base != base:
        warnings.warn(f"the model card names {card_base} as the base, not {base}; the adapter "
                      "is checked against the base you named", HubWarning, stacklevel=4)
