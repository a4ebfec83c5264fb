"""Sharing pocket books through the Hugging Face Hub.

Everything goes through ``huggingface_hub`` (``create_repo``, ``upload_folder``,
``snapshot_download``): the user's login, ``HF_TOKEN`` and ``HF_ENDPOINT`` are honoured as in
every other Hub tool, downloads land in the Hub cache, and no token is ever printed.

What is pushed is a valid PEFT repository — ``adapter_config.json``,
``adapter_model.safetensors``, ``adapterkit.json`` (with the SHA-256 of every file, checked on
pull) and a ``README.md`` model card — so PEFT, vLLM, TGI and LoRAX users can load it without
adapterkit. Pull works for any PEFT LoRA repository, not only ours.
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
from adapterkit.library.metadata import (
    CARD_FILE,
    CONFIG_FILE,
    METADATA_FILE,
    WEIGHTS_FILE,
    PocketBookMeta,
)
from adapterkit.library.store import PocketBook

if TYPE_CHECKING:  # pragma: no cover
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
    """Download a PEFT LoRA repository (``owner/name[@revision]``) into the library."""
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


def _verify(folder: Path, recorded: dict[str, Any]) -> None:
    for fname, digest in (recorded.get("files") or {}).items():
        path = folder / fname
        if path.exists() and sha256_file(path) != digest:
            raise InvalidAdapter(f"{fname} from the Hub does not match the SHA-256 its "
                                 "adapterkit.json records: the download is corrupt or was "
                                 "altered; pull again")


def _import_download(library: Library, folder: Path, name: str, *, repo_id: str, revision: str,
                     base: str | None, trust_pickle: bool) -> PocketBook:
    from adapterkit.library.peft_folder import import_peft_folder, read_adapter

    adapter = read_adapter(folder, trust_pickle=trust_pickle)  # refuses a non-LoRA repo early
    commit = folder.name
    recorded = None
    if (folder / METADATA_FILE).is_file():
        recorded = json.loads((folder / METADATA_FILE).read_text(encoding="utf-8"))
        _verify(folder, recorded)
    source = {"kind": "hub", "repo_id": repo_id, "revision": revision, "commit": commit}
    if recorded is None:
        _warn_if_card_names_other_base(folder, base)
        return import_peft_folder(library, folder, name, base=base, trust_pickle=trust_pickle,
                                  source=source)
    meta = PocketBookMeta.from_dict(recorded)
    if base is not None:
        _warn_if_other_base(library, meta, base)
    meta.source = source
    meta.tags = []
    missing = [r for r in meta.stacked_on if not library.exists(r)]
    if missing:
        warnings.warn(f"{repo_id} is trained on top of {', '.join(missing)}, which this library "
                      "does not have: pull or train those under the same names before using it",
                      HubWarning, stacklevel=2)
    with library.draft() as staged:
        for item in folder.iterdir():
            if item.is_file() and item.name != METADATA_FILE:
                shutil.copy(item, staged / item.name)  # the cache holds links: copy contents
        if adapter.pickled:
            from adapterkit.library.peft_folder import convert_pickle

            convert_pickle(folder, staged)
        return library.commit(staged, meta, name=name)


def _warn_if_card_names_other_base(folder: Path, base: str | None) -> None:
    if base is None or not (folder / CARD_FILE).is_file():
        return
    from huggingface_hub import ModelCard

    card_base = ModelCard.load(folder / CARD_FILE).data.to_dict().get("base_model")
    if card_base and isinstance(card_base, str) and card_base != base:
        warnings.warn(f"the model card names {card_base} as the base, not {base}; the adapter "
                      "is checked against the base you named", HubWarning, stacklevel=4)


def _warn_if_other_base(library: Library, meta: PocketBookMeta, base: str) -> None:
    from adapterkit.base.fingerprints import fingerprint
    from adapterkit.base.resolve import resolve_base

    source = resolve_base(base, library.home)
    fp = fingerprint(source.folder)
    if fp != meta.base_fingerprint:
        warnings.warn(
            f"this pocket book was made on base {meta.base.get('name')} (fingerprint "
            f"{meta.base_fingerprint[:12]}), not on {base} (fingerprint {fp[:12]}); it will be "
            "refused when attached to that base",
            HubWarning, stacklevel=3,
        )

