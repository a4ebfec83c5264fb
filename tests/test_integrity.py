"""Nothing lost, nothing silent: a damaged library folder, a forged Hub repo, a link out of an
imported folder or an unloadable pickle is refused in one line, and nothing is written."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest

from adapterkit import BaseMismatch, InvalidAdapter, UnsafeWeights
from adapterkit.library.integrity import REPAIR, check_book
from adapterkit.plugin_api.testing import make_peft_adapter
from tests.hub_server import FakeHub, point_client_at

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


@pytest.fixture
def books(library, tiny_base, peft_adapter, tmp_path):
    """Two intact pocket books on the tiny base: ``pe`` and ``pe2``."""
    second = make_peft_adapter(tiny_base, tmp_path / "second", seed=7)
    library.import_peft(peft_adapter, "pe", base=str(tiny_base))
    library.import_peft(second, "pe2", base=str(tiny_base))
    return library


def _renamed_keys(path: Path) -> None:
    """Rewrite an adapter so its tensors name modules the base does not have (what PEFT loads
    with only a warning, and then answers like the plain base)."""
    from safetensors.torch import load_file, save_file

    state = load_file(path)
    save_file({k.replace("q_proj", "qq_proj"): v for k, v in state.items()}, path)


def _foreign_weights(other_base: Path, tmp_path: Path) -> Path:
    return make_peft_adapter(other_base, tmp_path / "foreign") / WEIGHTS


DAMAGE = {
    "zero-byte weights": (lambda d: (d / WEIGHTS).write_bytes(b""), WEIGHTS),
    "truncated weights": (lambda d: (d / WEIGHTS).write_bytes((d / WEIGHTS).read_bytes()[:300]),
                          WEIGHTS),
    "weights changed": (lambda d: _renamed_keys(d / WEIGHTS), "does not match the SHA-256"),
    "config not JSON": (lambda d: (d / CONFIG).write_text("{nope"), CONFIG),
    "config not an object": (lambda d: (d / CONFIG).write_text("[1, 2]"), CONFIG),
    "weights missing": (lambda d: (d / WEIGHTS).unlink(), f"{WEIGHTS} is missing"),
    "planted pickle": (lambda d: (d / "adapter_model.bin").write_bytes(b"x"),
                       "adapter_model.bin is a pickle"),
    "planted link": (lambda d: (d / "notes.txt").symlink_to("/etc/hostname"),
                     "notes.txt is a link"),
}


def one_line_error(result, *needles: str) -> str:
    """The command failed with exit 1 and one ``Error:`` line on stderr — no traceback."""
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: "), result.stderr
    for needle in needles:
        assert needle in last, last
    return last


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.is_symlink() and p.suffix not in (".sqlite", ".lock")
            and "sqlite" not in p.name}


# -- defect 3: library entries are re-checked whenever they are loaded or copied -------------

@pytest.mark.parametrize("damage", list(DAMAGE))
def test_check_book_refuses_each_kind_of_damage_in_one_line(books, damage):
    book = books.get("pe")
    assert check_book(book) is None  # intact: passes
    harm, says = DAMAGE[damage]
    harm(book.path)
    with pytest.raises(InvalidAdapter) as err:
        check_book(books.get("pe"))
    message = str(err.value)
    assert "\n" not in message and message.startswith("pe@1: ")
    assert says in message and REPAIR in message


def test_book_saved_before_hashes_still_gets_format_and_fit_checks(books, tiny_base):
    from adapterkit.base.load import inspect_structure

    book = books.update_meta("pe", lambda meta: setattr(meta, "files", {}))
    _renamed_keys(book.path / WEIGHTS)
    check_book(book)  # a whole file, and no hash to compare: only the base can tell
    with pytest.raises(InvalidAdapter, match="qq_proj does not exist in the base.*another base"):
        check_book(book, inspect_structure(tiny_base))
    (book.path / WEIGHTS).write_bytes(b"")
    with pytest.raises(InvalidAdapter, match="shorter than a safetensors header"):
        check_book(book)


COMMANDS = {
    "generate": ["generate", "hi", "--adapter", "pe", "--max-new-tokens", "2"],
    "eval": ["eval", "pe", "--data", "{data}", "--max-new-tokens", "2"],
    "swap": ["swap", "pe", "pe2", "--prompt", "hi", "--max-new-tokens", "2"],
    "verify": ["verify", "pe"],
    "stack": ["stack", "pe", "pe2", "--name", "s"],
    "stack --flatten": ["stack", "pe", "pe2", "--name", "s", "--flatten"],
    "merge exact_svd": ["merge", "pe", "pe2", "--name", "m"],
    "merge linear": ["merge", "pe", "pe2", "--name", "m", "--method", "linear"],
    "export": ["export", "pe", "{dest}"],
    "export --merged": ["export", "pe", "{dest}", "--merged"],
    "train --on": ["train", "sft", "--base", "{base}", "--data", "{data}", "--name", "t",
                   "--on", "pe", "--max-steps", "1"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_refuses_a_damaged_book_in_one_line(books, adapterkit_cli, home, tiny_base,
                                                          adapterkit_data, tmp_path, command):
    book = books.get("pe")
    (book.path / WEIGHTS).write_bytes((book.path / WEIGHTS).read_bytes()[:300])
    before = files_of(home / "library")
    dest = tmp_path / "out"
    args = [a.format(data=adapterkit_data["prompt_completion"], dest=dest, base=tiny_base)
            for a in COMMANDS[command]]
    one_line_error(adapterkit_cli(*args), "pe@1", WEIGHTS, "re-import or re-train")
    assert files_of(home / "library") == before and not dest.exists()
    assert sorted(s.name for s in books.list()) == ["pe", "pe2"]


def test_the_advice_for_a_damaged_book_works_as_given(books, adapterkit_cli, tiny_base,
                                                     peft_adapter):
    """It said "re-import or re-train it", and a re-import was refused: the damaged folder
    still held the name. As said now: doctor, then re-import under its number."""
    book = books.get("pe")
    (book.path / WEIGHTS).write_bytes((book.path / WEIGHTS).read_bytes()[:300])
    out = adapterkit_cli("generate", "hi", "--adapter", "pe", "--max-new-tokens", "2")
    one_line_error(out, "pe@1", "`adapterkit doctor` moves it to quarantine; then re-import or "
                             "re-train it (--name NAME@V gives it back its number)")
    assert adapterkit_cli("doctor").exit_code == 0
    done = adapterkit_cli("import", peft_adapter, "--name", "pe@1", "--base", tiny_base)
    assert done.exit_code == 0, done.output
    out = adapterkit_cli("generate", "hi", "--adapter", "pe", "--max-new-tokens", "2")
    assert out.exit_code == 0, out.output


def test_generate_refuses_an_adapter_for_other_modules_instead_of_answering(books,
                                                                           adapterkit_cli):
    """PEFT loads tensors for modules the base lacks with a warning and answers like the plain
    base; a pocket book saved before hashes were recorded is caught by the fit check."""
    book = books.update_meta("pe", lambda meta: setattr(meta, "files", {}))
    _renamed_keys(book.path / WEIGHTS)
    out = adapterkit_cli("generate", "hi", "--adapter", "pe", "--max-new-tokens", "2")
    one_line_error(out, "pe@1", "does not fit base", "qq_proj",
                   "if `adapterkit show pe@1` names another base, load it with that one")


def test_generate_refuses_weights_for_another_hidden_size(books, adapterkit_cli, other_base,
                                                          tmp_path):
    book = books.update_meta("pe", lambda meta: setattr(meta, "files", {}))
    shutil.copy(_foreign_weights(other_base, tmp_path), book.path / WEIGHTS)
    out = adapterkit_cli("generate", "hi", "--adapter", "pe", "--max-new-tokens", "2")
    one_line_error(out, "pe@1", "does not fit in_features=64")


def test_a_saved_stack_checks_its_members(books, adapterkit_cli, tiny_base, home):
    import adapterkit

    assert adapterkit_cli("stack", "pe", "pe2", "--name", "both").exit_code == 0
    (books.get("pe2").path / CONFIG).write_text("{nope")
    out = adapterkit_cli("generate", "hi", "--adapter", "both", "--max-new-tokens", "2")
    one_line_error(out, "pe2@1", CONFIG, "does not match the SHA-256")
    session = adapterkit.open(str(tiny_base), home=home)
    try:
        with pytest.raises(InvalidAdapter, match=f"pe2@1: .*{CONFIG}"):
            session.swap("both")
    finally:
        session.close()


def test_export_refuses_a_zero_byte_weights_file(books, tmp_path):
    (books.get("pe").path / WEIGHTS).write_bytes(b"")
    with pytest.raises(InvalidAdapter, match="re-import or re-train"):
        books.export("pe", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- defect 4: pull runs import's checks, whatever the repo's adapterkit.json says -----------

@pytest.fixture
def hub(monkeypatch, tmp_path):
    with FakeHub({"tok-alice": "alice"}) as server:
        point_client_at(server, monkeypatch, str(tmp_path / "hub-cache"))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        yield server


@pytest.fixture
def pushed(hub, books):
    """The files of ``pe`` as pushed to alice/pe."""
    from adapterkit.library.hub import push

    push(books, "pe", "alice/pe")
    repo = hub.repos["alice/pe"]
    return dict(repo.commits[repo.branches["main"]])


def _hashes(files: dict[str, bytes]) -> dict[str, str]:
    import hashlib

    return {n: hashlib.sha256(b).hexdigest() for n, b in files.items() if n != "adapterkit.json"}


def test_pull_refuses_forged_weights_even_with_matching_hashes(hub, books, pushed, other_base,
                                                               tmp_path):
    """Hashes prove integrity, not authorship: whoever writes the repo writes the hashes."""
    from adapterkit.library.hub import pull

    files = dict(pushed, **{WEIGHTS: _foreign_weights(other_base, tmp_path).read_bytes()})
    meta = json.loads(files["adapterkit.json"])
    meta["files"] = _hashes(files)
    files["adapterkit.json"] = json.dumps(meta).encode()
    hub.add_repo("alice/forged", "alice", files)
    with pytest.raises(BaseMismatch, match="alice/forged does not fit base.*in_features=64"):
        pull(books, "alice/forged")
    assert sorted(s.name for s in books.list()) == ["pe", "pe2"]


@pytest.mark.parametrize("text,says", [
    (b"[1, 2]", "is not a JSON object"),
    (b"{nope", "is not valid JSON"),
    (b'{"name": "pe", "version": 1, "base": "tiny"}', "is not pocket-book metadata"),
])
def test_pull_refuses_an_unreadable_adapterkit_json_in_one_line(hub, books, pushed, home,
                                                                adapterkit_cli, text, says):
    hub.add_repo("alice/odd", "alice", dict(pushed, **{"adapterkit.json": text}))
    before = files_of(home / "library")
    one_line_error(adapterkit_cli("pull", "alice/odd"), "alice/odd", says, "nothing was imported")
    assert files_of(home / "library") == before


def test_pull_says_which_files_no_hash_covers(hub, books, pushed):
    from adapterkit.library.hub import HubWarning, pull

    meta = json.loads(pushed["adapterkit.json"])
    del meta["files"]
    hub.add_repo("alice/unhashed", "alice", dict(pushed, **{"adapterkit.json":
                                                            json.dumps(meta).encode()}))
    with pytest.warns(HubWarning, match="records no SHA-256 for adapter_config.json, "
                                        "adapter_model.safetensors, README.md"):
        book = pull(books, "alice/unhashed", name="unhashed")
    assert (book.path / WEIGHTS).read_bytes() == pushed[WEIGHTS]


def test_push_refuses_a_damaged_book(hub, books):
    from adapterkit.library.hub import push

    (books.get("pe").path / WEIGHTS).write_bytes(b"")
    with pytest.raises(InvalidAdapter, match="pe@1: .*adapter_model.safetensors"):
        push(books, "pe", "alice/pe")
    assert "alice/pe" not in hub.repos


# -- defect 10: import and save_folder copy the folder's own regular files only ----------------

def test_import_refuses_a_link_that_leaves_the_folder(peft_adapter, tiny_base, tmp_path, home,
                                                      adapterkit_cli):
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0\n")
    folder = tmp_path / "linked"
    shutil.copytree(peft_adapter, folder)
    (folder / "README.md").unlink(missing_ok=True)
    (folder / "README.md").symlink_to(secret)
    out = adapterkit_cli("import", folder, "--name", "linked", "--base", tiny_base)
    one_line_error(out, "README.md is a link to", "outside")
    assert not (home / "library").exists() or not any((home / "library").iterdir())


def test_import_copies_the_file_a_link_inside_the_folder_points_at(library, peft_adapter,
                                                                   tiny_base, tmp_path):
    """Links that stay inside the folder are followed (a checkpoint layout); what joins the
    library is the file's content, never a link."""
    folder = tmp_path / "ckpt"
    (folder / "checkpoint-10").mkdir(parents=True)
    shutil.copy(peft_adapter / CONFIG, folder)
    shutil.copy(peft_adapter / WEIGHTS, folder / "checkpoint-10" / WEIGHTS)
    (folder / WEIGHTS).symlink_to(Path("checkpoint-10") / WEIGHTS)
    book = library.import_peft(folder, "ckpt", base=str(tiny_base))
    assert not (book.path / WEIGHTS).is_symlink()
    assert (book.path / WEIGHTS).read_bytes() == (peft_adapter / WEIGHTS).read_bytes()


def test_save_folder_refuses_links(library, books, tmp_path):
    folder = tmp_path / "with-link"
    shutil.copytree(books.get("pe").path, folder)
    (folder / "README.md").unlink(missing_ok=True)
    (folder / "README.md").symlink_to("/etc/hostname")
    meta = books.get("pe").meta
    with pytest.raises(InvalidAdapter, match="README.md is a link"):
        library.save_folder(folder, meta, name="copy")
    assert not library.exists("copy")


# -- defect 7 (part): --trust-pickle of a pickle that cannot be loaded safely -----------------

class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.mark.parametrize("kind", ["code", "garbage"])
def test_trust_pickle_refuses_a_pickle_that_cannot_be_loaded_safely(peft_adapter, tiny_base,
                                                                    tmp_path, home, kind,
                                                                    adapterkit_cli):
    marker = tmp_path / "payload-ran"
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(peft_adapter / CONFIG, folder)
    (folder / "adapter_model.bin").write_bytes(
        pickle.dumps({"w": _Payload(marker)}, protocol=2) if kind == "code" else b"not a pickle at all")
    with pytest.raises(UnsafeWeights, match="refused: the pickle could not be loaded safely"):
        from adapterkit import Library

        Library(home).import_peft(folder, "p", base=str(tiny_base), trust_pickle=True)
    out = adapterkit_cli("import", folder, "--name", "p", "--base", tiny_base, "--trust-pickle")
    one_line_error(out, "adapter_model.bin refused: the pickle could not be loaded safely")
    assert not marker.exists()
    assert not (home / "library").exists() or not any((home / "library").iterdir())
