"""Sharing pocket books through the Hugging Face Hub.

Everything goes through ``huggingface_hub`` (``create_repo``, ``upload_folder``,
``snapshot_download``): the user's login, ``HF_TOKEN`` and ``HF_ENDPOINT`` are honoured as in
every other Hub tool, downloads land in the Hub cache, and no token is ever printed.

What is pushed is a valid PEFT repository — ``adapter_config.json``,
``adapter_model.safetensors``, ``adapterkit.json`` (with the SHA-256 of every file, checked on
pull) and a ``README.md`` model card — so PEFT, vLLM, TGI and LoRAX users can load it without
adapterkit. Pull works for any PEFT LoRA repository, not only ours.

A pull asks the Hub which commit the revision is at before it downloads, and imports that
commit: ``snapshot_download`` alone answers an unreachable Hub from the cache, silently. Only
``HF_HUB_OFFLINE`` imports the cache's copy without asking (said so), and a pull of a full
commit id, whose files never change, is answered from the cache when the Hub cannot be reached
(said so too).

A pull trusts nothing the repo says about itself: every pull runs import's checks (LoRA config,
whole safetensors header, every tensor fits the base) whatever ``adapterkit.json`` records — save
one: where the repo's ``adapterkit.json`` names a base this machine does not have and no
``--base`` is given, the fit check waits until the pocket book is loaded (a :class:`HubWarning`
says so). Pickled weights are not even downloaded unless trusted.
The hashes it records prove the download is what was pushed (integrity), not who pushed it
(authorship): whoever can write to the repo can write matching hashes. A model card (or loss
curve) that no longer matches was edited on the Hub, which is routine: warned about, not refused.
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

from adapterkit.errors import AdapterkitError, InvalidAdapter, InvalidName, UnsafeWeights
from adapterkit.files import sha256_file
from adapterkit.hub_errors import explain_hub_error, is_network_error, without_credentials
from adapterkit.library.card import config_base, render_card
from adapterkit.library.integrity import check_book, held_weights
from adapterkit.library.metadata import (
    CARD_FILE,
    CONFIG_FILE,
    METADATA_FILE,
    WEIGHTS_FILE,
    PocketBookMeta,
)
from adapterkit.library.record import Origin, read_record, record_meta, verify_record
from adapterkit.library.store import PocketBook

if TYPE_CHECKING:  # pragma: no cover
    from adapterkit.library.store import Library

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
#: what a pull downloads; pickled weights (which can run code when loaded) only when trusted
_PULL_PATTERNS = [CONFIG_FILE, WEIGHTS_FILE, METADATA_FILE, CARD_FILE, "*.png"]


class HubError(AdapterkitError):
    """A Hub operation failed (authentication, permissions, network, missing repo...)."""


class HubWarning(UserWarning):
    """Something about a push or pull the user should know: a pocket book that may not fit the
    base named, files that could not be checked or were edited on the Hub, an offline pull."""


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


def _explain(exc: Exception, repo_id: str, revision: str | None = None, *,
             writing: bool = False, outcome: str = "nothing was changed") -> HubError:
    """A one-line :class:`HubError` for a ``huggingface_hub`` / network exception."""
    return HubError(explain_hub_error(exc, repo_id, revision=revision, writing=writing,
                                      outcome=outcome))


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
    """Upload a pocket book to ``repo`` (``owner/name``) as a PEFT repository with a card.

    ``private`` creates the repo private; a repo that already exists keeps its visibility on
    the Hub, so with ``private`` a public one is refused (:class:`HubError`) before anything is
    uploaded. Without it, a new repo takes its owner's default visibility.
    """
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
        outcome = "nothing was uploaded"  # what is true if the next step fails
        try:
            # None, not False: a repo created without --private takes its owner's default
            api.create_repo(repo_id, private=private or None, exist_ok=True, repo_type="model")
            outcome = f"{repo_id} exists but nothing was uploaded to it"
            if private:
                _refuse_public(api, repo_id)
            if branch != "main":
                api.create_branch(repo_id, branch=branch, exist_ok=True)
            outcome = f"{repo_id} exists but the upload did not complete"
            info = api.upload_folder(
                repo_id=repo_id, folder_path=str(folder), revision=branch,
                commit_message=message or f"Upload pocket book {book.ref} with adapterkit",
            )
        except AdapterkitError:
            raise
        except Exception as exc:
            raise _explain(exc, repo_id, branch, writing=True, outcome=outcome) from None
    url = without_credentials(getattr(info, "commit_url", None) or str(info))
    return PushResult(repo_id, branch, url, files)


def _refuse_public(api: Any, repo_id: str) -> None:
    """``--private`` on a repo that already exists: the Hub keeps its visibility whatever
    ``create_repo`` is asked, so a public one is refused before anything is uploaded."""
    if api.repo_info(repo_id, repo_type="model").private is not True:
        raise HubError(f"{repo_id} already exists and is public, so --private cannot make it "
                       "private and nothing was uploaded: make it private in its settings on "
                       "the Hub and push again, or push without --private")


def _prepare_upload(book: PocketBook, folder: Path, *, license: str | None) -> list[str]:
    """Copy the PEFT files, a refreshed card and metadata with file hashes into ``folder``."""
    names = [CONFIG_FILE, WEIGHTS_FILE] + [p.name for p in book.path.glob("*.png")]
    for name in names:
        shutil.copy2(book.path / name, folder / name)
    meta = PocketBookMeta.from_dict(json.loads(book.meta.to_json()))
    _name_base_as_the_card(folder / CONFIG_FILE, meta)
    (folder / CARD_FILE).write_text(render_card(meta, license=license), encoding="utf-8")
    data = json.loads(meta.to_json())
    data["files"] = {name: sha256_file(folder / name) for name in names + [CARD_FILE]}
    (folder / METADATA_FILE).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n",
                                        encoding="utf-8")
    return sorted(names + [CARD_FILE, METADATA_FILE])


def _name_base_as_the_card(config_file: Path, meta: PocketBookMeta) -> None:
    """Make the uploaded ``adapter_config.json`` name the base as the card's ``base_model``
    does: a pocket book imported before adapterkit rewrote it may name a local path, which
    means nothing on the Hub. Left byte for byte as it is where it already agrees."""
    config = json.loads(config_file.read_text(encoding="utf-8"))
    wanted = config_base(meta)
    if isinstance(config, dict) and wanted and config.get("base_model_name_or_path") != wanted:
        config["base_model_name_or_path"] = wanted
        config_file.write_text(json.dumps(config, indent=2), encoding="utf-8")


def pull(library: Library, repo: str, *, name: str | None = None, base: str | None = None,
         trust_pickle: bool = False, token: str | None = None,
         subfolder: str | None = None) -> PocketBook:
    """Download a PEFT LoRA repository (``owner/name[@revision]``) into the library.

    Checked as :meth:`Library.import_peft` checks a folder, whatever the repo's own
    ``adapterkit.json`` says; the hashes it records are checked too (they show the files are
    the ones pushed, not who pushed them). A file they do not cover is said to be unchecked
    (:class:`HubWarning`), never silently passed.

    The revision is resolved with the Hub first, and that commit is what is imported (its sha
    recorded): an unreachable Hub is refused, never answered from an older copy in the Hub
    cache — unless ``HF_HUB_OFFLINE`` is set, when the cache's copy is imported without asking
    the Hub (a :class:`HubWarning` says so). A full commit id (``owner/name@<40 hex>``) names
    files that never change: with the Hub unreachable, the cache's copy of it is imported (said
    so).

    :param subfolder: the folder inside the repo that holds the adapter (PEFT saves an adapter
        with a non-default name under a folder of that name).
    """
    repo_id, revision = parse_repo(repo)
    ref = library.reserve(name or repo_id.split("/")[1])
    where = f"{subfolder.strip('/')}/" if subfolder and subfolder.strip("/") else ""
    info = _ask_hub(repo_id, revision, token)
    if info is not None:
        _check_listing(info, repo_id, revision or "main", where, trust_pickle=trust_pickle)
    snapshot = _download(repo_id, revision, info.sha if info is not None else None, where,
                         trust_pickle=trust_pickle, token=token)
    folder = snapshot / where if where else snapshot
    source = {"kind": "hub", "repo_id": repo_id, "revision": revision or "main",
              "commit": snapshot.name, **({"subfolder": where.rstrip("/")} if where else {})}
    # the cache repo: a snapshot's files are links to its blobs
    return _import_download(library, folder, str(ref), source=source, within=snapshot.parent.parent,
                            base=base, trust_pickle=trust_pickle)


def _ask_hub(repo_id: str, revision: str | None, token: str | None) -> Any | None:
    """The repo as the Hub has it at ``revision`` (its commit sha, its files), asked before
    anything is downloaded: ``snapshot_download`` alone answers an unreachable Hub with whatever
    the cache holds for this repo id — an older commit, or one from another ``HF_ENDPOINT`` —
    and says nothing. None where the user asked for offline (``HF_HUB_OFFLINE``), or where
    the Hub cannot be reached and ``revision`` is a full commit id: the cache's copy of a commit
    cannot be stale (its files never change)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        return _api(token).repo_info(repo_id, revision=revision, repo_type="model")
    except Exception as exc:
        if is_network_error(exc) and _is_commit(revision):
            return None
        raise _explain(exc, repo_id, revision, outcome=_NOT_IMPORTED) from None


def _is_commit(revision: str | None) -> bool:
    """Whether ``revision`` is a full commit id (40 hex digits), which names fixed files."""
    return revision is not None and re.fullmatch(r"[0-9a-f]{40}", revision) is not None


#: what is true, and what can be done, when the Hub cannot be asked during a pull
_NOT_IMPORTED = ("nothing was imported (to import the copy in the Hub cache without asking the "
                 "Hub, set HF_HUB_OFFLINE=1)")


def _check_listing(info: Any, repo_id: str, revision: str, where: str, *,
                   trust_pickle: bool) -> None:
    """Refuse, before downloading, a repo whose files at ``revision`` hold no adapter where it
    is looked for (naming the subfolders that do hold one), and pickled weights not trusted."""
    from adapterkit.library.peft_folder import PICKLE_FILE

    if info.siblings is None:  # a Hub that lists no files: read_adapter says what is missing
        return
    names = {s.rfilename for s in info.siblings}
    if not names - {".gitattributes"}:
        raise InvalidAdapter(f"{repo_id}: {revision} has no files (nothing has been pushed to "
                             "it); nothing was imported")
    if where + CONFIG_FILE not in names:
        _refuse_no_adapter(repo_id, revision, where, names)
    if not trust_pickle and where + PICKLE_FILE in names and where + WEIGHTS_FILE not in names:
        raise UnsafeWeights(f"{repo_id} holds only pickled weights ({where}{PICKLE_FILE}), "
                            "which can run arbitrary code when loaded, so they were not "
                            "downloaded. If you trust its source, pull again with "
                            "--trust-pickle; they are then converted to safetensors")


def _refuse_no_adapter(repo_id: str, revision: str, where: str, names: set[str]) -> None:
    """No ``adapter_config.json`` where one was looked for: say which subfolders hold one (an
    adapter saved under a non-default name lives in a folder of that name)."""
    held = sorted({n[:-len(CONFIG_FILE) - 1] for n in names if n.endswith("/" + CONFIG_FILE)})
    place = f"in its folder {where.rstrip('/')}" if where else "at its top"
    if where and CONFIG_FILE in names:
        raise InvalidAdapter(f"{repo_id} ({revision}) has no {CONFIG_FILE} {place}: its "
                             "adapter is at its top; pull it without --subfolder; nothing was "
                             "imported")
    if held:
        raise InvalidAdapter(f"{repo_id} ({revision}) has no {CONFIG_FILE} {place}: its "
                             f"adapter is in the subfolder {', '.join(held)}; pull it with "
                             f"--subfolder {held[0]}; nothing was imported")
    raise InvalidAdapter(f"{repo_id} ({revision}) is not a PEFT adapter: it has no {CONFIG_FILE} "
                         f"{place}; nothing was imported")


def _download(repo_id: str, revision: str | None, commit: str | None, where: str, *,
              trust_pickle: bool, token: str | None) -> Path:
    """The repo's files a pull needs, as a Hub-cache snapshot folder named by its commit:
    ``commit``, the one the Hub resolved, or with none (offline) the one the cache holds."""
    from huggingface_hub import constants, snapshot_download

    from adapterkit.library.peft_folder import PICKLE_FILE

    patterns = [where + p for p in _PULL_PATTERNS + ([PICKLE_FILE] if trust_pickle else [])]
    offline, asked_offline = commit is None, constants.HF_HUB_OFFLINE
    try:
        # by branch, not by sha: huggingface_hub then records branch → commit in the cache,
        # which a later offline pull reads
        snapshot = Path(snapshot_download(repo_id, revision=revision, token=token,
                                          allow_patterns=patterns, local_files_only=offline))
    except Exception as exc:
        if offline and not asked_offline:
            raise HubError(f"cannot reach the Hub at {without_credentials(constants.ENDPOINT)} "
                           f"and the Hub cache holds no complete copy of {repo_id} at commit "
                           f"{revision}; check the connection and retry — nothing was "
                           "imported") from None
        if offline:
            raise HubError(f"HF_HUB_OFFLINE is set and the Hub cache holds no complete copy of "
                           f"{repo_id} ({revision or 'main'}): unset HF_HUB_OFFLINE to download "
                           "it; nothing was imported") from None
        raise _explain(exc, repo_id, revision, outcome=_NOT_IMPORTED) from None
    if offline and not asked_offline:  # a full commit id (see _ask_hub)
        warnings.warn(f"cannot reach the Hub at {without_credentials(constants.ENDPOINT)}: "
                      f"{repo_id} at commit {snapshot.name} is imported from the Hub cache (a "
                      "commit's files never change)", HubWarning, stacklevel=3)
    elif offline:
        warnings.warn(f"HF_HUB_OFFLINE is set, so the Hub was not asked: {repo_id} "
                      f"({revision or 'main'}) is imported as the Hub cache holds it, commit "
                      f"{snapshot.name}, which may be older than the Hub's", HubWarning,
                      stacklevel=3)
    elif commit is not None and snapshot.name != commit:  # the Hub moved on, or dropped out and the cache answered
        raise HubError(f"{repo_id} ({revision or 'main'}) was at commit {commit[:12]} but the "
                       f"download gave {snapshot.name[:12]}: it changed on the Hub during the "
                       "pull, or the Hub stopped answering and the cache's older copy was given; "
                       "nothing was imported — pull again")
    return snapshot


def _origin(repo_id: str) -> Origin:
    """How a pulled repo's record is spoken of: its files were pushed, and a mismatch means
    the Hub copy changed or the download is corrupt."""
    return Origin(repo_id, "pushed", "it was changed on the Hub since, or the download is "
                  "corrupt", edit_hint=" (edited on the Hub?)", category=HubWarning,
                  fetch="pull")


def _import_download(library: Library, folder: Path, name: str, *, source: dict[str, Any],
                     within: Path, base: str | None, trust_pickle: bool) -> PocketBook:
    """Import a downloaded repo: with its record as import reuses an export's (see
    :func:`~adapterkit.library.peft_folder.import_recorded`), the card it was pushed with kept;
    without one, as a plain PEFT folder."""
    from adapterkit.library.peft_folder import (
        check_on_recorded_base,
        import_peft_folder,
        import_recorded,
        own_file,
        read_adapter,
        recorded_files,
    )

    origin = _origin(source["repo_id"])
    # refuses a non-LoRA repo, a damaged header, a link out of the cache, early
    adapter = read_adapter(folder, trust_pickle=trust_pickle, within=within)
    recorded = read_record(own_file(folder, METADATA_FILE, within=within), origin)
    if recorded is None:
        _warn_if_card_names_other_base(folder, base)
        return import_peft_folder(library, folder, name, base=base, trust_pickle=trust_pickle,
                                  source=source, within=within)
    files = recorded_files(adapter, within=within, card=True)
    meta = record_meta(recorded, origin)
    verify_record(recorded, files, origin)
    check_on_recorded_base(library, adapter, meta, base, name=name, origin=origin,
                           by_name=False)
    _warn_if_under_differs(library, meta, origin.label)
    return import_recorded(library, adapter, meta, name, files=files, source=source,
                           within=within, origin=origin, card=False)


def _warn_if_under_differs(library: Library, meta: PocketBookMeta, repo_id: str) -> None:
    """Say which pocket books it was trained on top of this library holds with other weights
    under the same name (a pull meets libraries it was not made in): loading refuses it
    (:func:`adapterkit.lora.underlay.check_under`)."""
    wanted = meta.stacked_on_sha256
    others = [r for r in meta.stacked_on if wanted.get(r) and library.exists(r) and
              held_weights(library.get(r)) != wanted[r]]
    if others:
        warnings.warn(f"{repo_id} is trained on top of {', '.join(others)}, and this library's "
                      f"{', '.join(others)} hold other weights: it cannot be used here until "
                      "the ones it was trained on are under those names", HubWarning,
                      stacklevel=3)


def _warn_if_card_names_other_base(folder: Path, base: str | None) -> None:
    """Compare the base a plain PEFT repo's model card names with ``base``. The card is the
    repo's prose, not its weights: an unreadable header skips this comparison (said so), never
    the pull, whose checks against ``base`` do not depend on it."""
    if base is None or not (folder / CARD_FILE).is_file():
        return
    import yaml
    from huggingface_hub import ModelCard

    try:
        card_base = ModelCard.load(folder / CARD_FILE).data.to_dict().get("base_model")
    except (ValueError, yaml.YAMLError) as exc:  # UnicodeDecodeError is a ValueError
        reason = " ".join(str(exc).split())[:120] or type(exc).__name__
        warnings.warn(f"the model card's YAML header cannot be read ({type(exc).__name__}: "
                      f"{reason}), so the base it names was not compared with {base}; the "
                      "adapter is still checked against the base you named", HubWarning,
                      stacklevel=4)
        return
    if card_base and isinstance(card_base, str) and not _same_spec(card_base, base):
        warnings.warn(f"the model card names {card_base} as the base, not {base}; the adapter "
                      "is checked against the base you named", HubWarning, stacklevel=4)


def _same_spec(named: str, given: str) -> bool:
    """Whether two ways of naming a base name the same one: equal, or paths to one folder
    (a card names the absolute path an adapter was saved on; ``--base`` is often relative)."""
    if named == given:
        return True
    one, other = Path(named).expanduser(), Path(given).expanduser()
    return one.exists() and other.exists() and one.resolve() == other.resolve()
