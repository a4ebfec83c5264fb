"""push → pull round trips with the real huggingface_hub client against a loopback Hub."""

import hashlib
import json
import os
import subprocess
import sys

import pytest

from adapterkit import InvalidAdapter, InvalidName, UnsafeWeights
from adapterkit.library.hub import HubError, HubWarning, pull, push
from tests.hub_server import FakeHub, point_client_at


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with FakeHub({"tok-alice": "alice", "tok-bob": "bob"}) as server:
        point_client_at(server, monkeypatch, str(tmp_path / "hub-cache"))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        yield server


@pytest.fixture
def book(library, tiny_base, tmp_path):
    """A ~10 MB pocket book (rank 1250 on all linear layers of the tiny base)."""
    from adapterkit.plugin_api.testing import make_peft_adapter

    adapter = make_peft_adapter(tiny_base, tmp_path / "big", target_modules="all-linear", r=1250)
    assert 8_000_000 < (adapter / "adapter_model.safetensors").stat().st_size < 14_000_000
    return library.import_peft(adapter, "big", base=str(tiny_base))


def test_push_pull_round_trip_is_byte_identical(hub, library, book, home):
    from huggingface_hub import ModelCard

    result = push(library, "big", "alice/big-lora", message="first")
    assert result.repo_id == "alice/big-lora" and "/commit/" in result.commit_url
    stored = hub.repos["alice/big-lora"].commits[hub.repos["alice/big-lora"].branches["main"]]
    assert {"adapter_config.json", "adapter_model.safetensors", "adapterkit.json",
            "README.md"} <= set(stored)
    assert stored["adapter_model.safetensors"] == (book.path / "adapter_model.safetensors").read_bytes()

    card = ModelCard(stored["README.md"].decode())
    assert card.data.library_name == "peft"
    assert {"adapterkit", "lora"} <= set(card.data.tags)
    assert "adapterkit fingerprint" in card.text and book.meta.base_fingerprint in card.text

    pulled = pull(library, "alice/big-lora", name="big-copy")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (pulled.path / name).read_bytes() == (book.path / name).read_bytes()
    assert pulled.meta.base_fingerprint == book.meta.base_fingerprint
    assert pulled.meta.source["repo_id"] == "alice/big-lora"
    assert pulled.meta.source["commit"] == hub.repos["alice/big-lora"].branches["main"]


def test_private_repo_and_branch(hub, library, book):
    push(library, "big", "alice/private", private=True, revision="experiment")
    repo = hub.repos["alice/private"]
    assert repo.private and set(repo.branches) == {"main", "experiment"}
    assert "adapter_model.safetensors" not in repo.commits[repo.branches["main"]]
    pulled = pull(library, "alice/private@experiment", name="exp")
    assert pulled.meta.source["revision"] == "experiment"


def test_pull_plain_peft_repo_checks_the_base(hub, library, tiny_base, other_base, peft_adapter):
    files = {p.name: p.read_bytes() for p in peft_adapter.iterdir() if p.is_file()}
    files["README.md"] = b"---\nbase_model: someone/original-base\nlibrary_name: peft\n---\nhi\n"
    hub.add_repo("carol/plain", "carol", files)
    with pytest.warns(HubWarning, match="names someone/original-base as the base"):
        book = pull(library, "carol/plain", base=str(tiny_base))
    assert book.meta.source["kind"] == "hub" and book.name == "plain"
    from adapterkit import BaseMismatch

    with pytest.raises(BaseMismatch, match="does not fit"):
        pull(library, "carol/plain", name="wrong", base=str(other_base))


def test_pull_warns_when_named_base_differs(hub, library, book, other_base):
    push(library, "big", "alice/big-lora")
    with pytest.warns(HubWarning, match="refused when attached"):
        pull(library, "alice/big-lora", name="other", base=str(other_base))


@pytest.mark.parametrize("token,repo,error,match", [
    (None, "alice/x", HubError, "not logged in to the Hub"),
    ("wrong-token", "alice/x", HubError, "refused your credentials"),
    ("tok-alice", "bob/theirs", HubError, "belongs to another user.*rights to write"),
    ("tok-alice", "not a repo", InvalidName, "invalid Hub repo id"),
    ("tok-alice", "alice/x@main", InvalidName, "give the branch with --revision"),
])
def test_push_errors(hub, library, book, monkeypatch, token, repo, error, match):
    hub.add_repo("bob/theirs", "bob", {"README.md": b"bob's"})
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    else:
        monkeypatch.delenv("HF_TOKEN")
        monkeypatch.setenv("HF_HOME", str(library.home / "no-hf-home"))
    with pytest.raises(error, match=match):
        push(library, "big", repo)
    assert hub.repos["bob/theirs"].commits[hub.repos["bob/theirs"].branches["main"]] == {
        "README.md": b"bob's"}


def test_pull_errors_import_nothing(hub, library, monkeypatch):
    hub.add_repo("carol/not-lora", "carol", {"config.json": b"{}", "README.md": b"hi"})
    hub.add_repo("carol/pickled", "carol", {
        "adapter_config.json": json.dumps({"peft_type": "LORA"}).encode(),
        "adapter_model.bin": b"not really a pickle"})
    with pytest.raises(InvalidAdapter, match="no adapter_config.json"):
        pull(library, "carol/not-lora")
    with pytest.raises(UnsafeWeights, match="--trust-pickle"):
        pull(library, "carol/pickled")
    with pytest.raises(HubError, match="revision 'nope' does not exist"):
        pull(library, "carol/not-lora@nope")
    with pytest.raises(HubError, match="repo carol/missing does not exist"):
        pull(library, "carol/missing")
    assert library.list() == []


def test_network_error_is_readable(library, monkeypatch, tmp_path):
    import socket

    import huggingface_hub.constants as constants

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    with pytest.raises(HubError, match="cannot reach the Hub .*retry"):
        pull(library, "alice/anything")
    assert library.list() == []


@pytest.mark.slow
def test_cli_round_trip_through_hf_endpoint(home, tiny_base, peft_adapter, tmp_path):
    """The real user path: HF_ENDPOINT and HF_TOKEN in the environment, two processes."""
    with FakeHub({"tok-alice": "alice"}) as server:
        env = dict(os.environ, HF_ENDPOINT=server.endpoint, HF_TOKEN="tok-alice",
                   HF_HUB_CACHE=str(tmp_path / "cache"), ADAPTERKIT_HOME=str(home))
        env.pop("HF_HUB_OFFLINE", None)

        def cli(*args):
            return subprocess.run([sys.executable, "-m", "adapterkit", *map(str, args)],
                                  env=env, capture_output=True, text=True)

        assert cli("import", peft_adapter, "--name", "pe", "--base", tiny_base).returncode == 0
        out = cli("push", "pe", "--repo", "alice/pe", "--license", "apache-2.0")
        assert out.returncode == 0, out.stderr
        assert "tok-alice" not in out.stdout + out.stderr
        assert "license: apache-2.0" in server.repos["alice/pe"].commits[
            server.repos["alice/pe"].branches["main"]]["README.md"].decode()
        out = cli("pull", "alice/pe", "--name", "pe2")
        assert out.returncode == 0 and "Pulled alice/pe as pe2@1" in out.stdout, out.stderr
        out = cli("pull", "alice/nope")
        assert out.returncode == 1
        assert out.stderr.strip().splitlines()[-1].startswith("Error: repo alice/nope")


def test_stacked_book_warns_on_push_and_on_pull_without_its_underlay(
        hub, library, home, tiny_base, tmp_path, adapterkit_data):
    from adapterkit import Library, TrainOptions, train
    from adapterkit.plugin_api.manager import get_plugin_manager

    pm = get_plugin_manager(env=False)
    options = TrainOptions(max_steps=1, batch_size=4, r=2, alpha=4)
    data = str(adapterkit_data["prompt_completion"])
    train("sft", base=str(tiny_base), data=data, name="under", home=home, plugins=pm,
          options=options)
    train("sft", base=str(tiny_base), data=data, name="top", home=home, plugins=pm,
          options=options, on="under")
    with pytest.warns(HubWarning, match="trained on top of under@1: push those too"):
        push(library, "top", "alice/top")
    elsewhere = Library(tmp_path / "elsewhere")
    with pytest.warns(HubWarning, match="trained on top of under@1, which this library does "
                                        "not have"):
        pulled = pull(elsewhere, "alice/top")
    assert pulled.meta.stacked_on == ["under@1"]
    assert pulled.meta.stacked_on_sha256 == library.get("top").meta.stacked_on_sha256 != {}

    # a library whose under@1 is another pocket book: the pull says so, and loading refuses
    from adapterkit.errors import InvalidAdapter
    from adapterkit.runtime.peft_model import members_of

    third = Library(tmp_path / "third")
    train("sft", base=str(tiny_base), data=data, name="under", home=third.home, plugins=pm,
          options=TrainOptions(max_steps=2, batch_size=4, r=2, alpha=4))
    with pytest.warns(HubWarning, match="this library's under@1 hold other weights"):
        stranger = pull(third, "alice/top")
    with pytest.raises(InvalidAdapter, match="trained on top of under@1 with weights"):
        members_of(third, stranger)


# -- push --private, card headers, pickles, error wording (audit fixes) -----------------------

def _uploads(hub, repo_id):
    return [r for r in hub.requests if r[0] == "POST" and r[1].startswith(f"/api/models/{repo_id}/")
            and r[1].split("/")[5] in ("preupload", "commit")]


def test_push_private_refuses_an_existing_public_repo_before_uploading(hub, library, book):
    """Before: the Hub ignores ``private`` for a repo that exists, so --private uploaded the
    pocket book into a public repo."""
    hub.add_repo("alice/open", "alice", {"README.md": b"public"})
    with pytest.raises(HubError, match="alice/open already exists and is public.*make it "
                                       "private in its settings on the Hub.*push without "
                                       "--private"):
        push(library, "big", "alice/open", private=True)
    repo = hub.repos["alice/open"]
    assert not repo.private and repo.commits[repo.branches["main"]] == {"README.md": b"public"}
    assert _uploads(hub, "alice/open") == []
    hub.add_repo("alice/closed", "alice", {"README.md": b"private"}, private=True)
    push(library, "big", "alice/closed", private=True)  # already private: pushed
    assert "adapter_model.safetensors" in hub.repos["alice/closed"].commits[
        hub.repos["alice/closed"].branches["main"]]


def test_push_without_private_leaves_the_visibility_to_the_owner(hub, library, book):
    """Before: ``private=False`` was sent, asking for a public repo even where the owner's
    (an organization's) default is private."""
    push(library, "big", "alice/default")
    assert hub.created and all("private" not in body and "visibility" not in body
                               for body in hub.created)
    push(library, "big", "alice/secret", private=True)
    assert hub.repos["alice/secret"].private


@pytest.mark.parametrize("header", [
    b"---\nbase_model: [unclosed\n---\nhi\n",  # yaml ParserError
    b"---\n- a\n- b\n---\nhi\n",  # a list, not a mapping: ValueError
    b"\xff\xfe---\nbase_model: x\n---\n",  # not UTF-8: UnicodeDecodeError
])
def test_pull_with_an_unreadable_card_header_warns_and_goes_on(hub, library, tiny_base,
                                                              other_base, peft_adapter, header):
    """Before: a malformed card header ended ``pull --base`` with a traceback."""
    files = {p.name: p.read_bytes() for p in peft_adapter.iterdir() if p.is_file()}
    files["README.md"] = header
    hub.add_repo("carol/badcard", "carol", files)
    with pytest.warns(HubWarning, match="model card's YAML header cannot be read .*so the base "
                                        "it names was not compared with"):
        book = pull(library, "carol/badcard", base=str(tiny_base))
    assert book.meta.base_fingerprint and book.name == "badcard"
    from adapterkit import BaseMismatch

    with pytest.warns(HubWarning, match="YAML header cannot be read"), \
            pytest.raises(BaseMismatch, match="does not fit"):  # the other checks still run
        pull(library, "carol/badcard", name="wrong", base=str(other_base))


def _fetched(hub, repo_id, filename):
    return [r for r in hub.requests if r[1].startswith(f"/{repo_id}/resolve/")
            and r[1].endswith(f"/{filename}")]


def test_pull_downloads_pickled_weights_only_when_trusted(hub, library, peft_adapter):
    """Before: adapter_model.bin was downloaded by every pull, trusted or not."""
    files = {p.name: p.read_bytes() for p in peft_adapter.iterdir() if p.is_file()}
    hub.add_repo("carol/both", "carol", {**files, "adapter_model.bin": b"not really a pickle"})
    book = pull(library, "carol/both")
    assert _fetched(hub, "carol/both", "adapter_model.safetensors")
    assert _fetched(hub, "carol/both", "adapter_model.bin") == []
    assert not (book.path / "adapter_model.bin").exists()

    hub.add_repo("carol/pickled", "carol", {
        "adapter_config.json": json.dumps({"peft_type": "LORA"}).encode(),
        "adapter_model.bin": b"not really a pickle"})
    with pytest.raises(UnsafeWeights, match="holds only pickled weights .*not downloaded.*pull "
                                            "again with --trust-pickle"):
        pull(library, "carol/pickled")
    assert _fetched(hub, "carol/pickled", "adapter_model.bin") == []
    with pytest.raises(UnsafeWeights, match="could not be loaded safely"):
        pull(library, "carol/pickled", trust_pickle=True)  # trusted: fetched, then unpickled
    assert _fetched(hub, "carol/pickled", "adapter_model.bin")


def _http_error(status, message):
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    response = httpx2.Response(status, request=httpx2.Request("GET", "http://hub.test/x"))
    return HfHubHTTPError(f"{status} Client Error\n\nline two\nRequest ID: abc", response=response,
                          server_message=message)


def test_hub_errors_say_what_is_true(hub, library, book, monkeypatch):
    """Before: a network error during push said "nothing was changed" after the repo was
    created, and a 403 while pulling said "no permission to write"."""
    import httpx2
    from huggingface_hub import HfApi

    def cut(*args, **kwargs):
        raise httpx2.ConnectError("connection reset")

    monkeypatch.setattr(HfApi, "upload_folder", cut)
    with pytest.raises(HubError) as caught:
        push(library, "big", "alice/cut")
    message = str(caught.value)
    assert "alice/cut" in hub.repos and "nothing was changed" not in message
    assert "cannot reach the Hub" in message and "alice/cut exists but the upload did not " \
                                                  "complete" in message

    def forbidden(*args, **kwargs):
        raise _http_error(403, "Access to this repo is restricted")

    monkeypatch.setattr(HfApi, "repo_info", forbidden)  # a pull's first question to the Hub
    with pytest.raises(HubError) as caught:
        pull(library, "carol/locked")
    message = str(caught.value)
    assert message.startswith("no permission to read carol/locked (server said: Access to this "
                              "repo is restricted)") and "write" not in message
    assert len(message.splitlines()) == 1 and [b.name for b in library.list()] == ["big"]


def test_hub_base_errors_are_one_line_that_says_what_to_do(hub, home, tmp_path, monkeypatch):
    """Before: ``cannot download base ...: RepositoryNotFoundError: 404 Client Error...`` over
    several lines, and nothing said that ``models/my-base`` was looked for as a folder too."""
    from adapterkit import BaseNotFound
    from adapterkit.base.resolve import resolve_base

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(BaseNotFound) as caught:
        resolve_base("models/my-base", home)
    message = str(caught.value)
    assert len(message.splitlines()) == 1, message
    assert message.startswith(f"no local folder models/my-base (relative to {tmp_path}): check "
                              "the path; as a Hub id: repo models/my-base does not exist")
    assert "hf auth login" in message

    hub.add_repo("alice/base", "alice", {"config.json": b"{}"})
    with pytest.raises(BaseNotFound) as caught:
        resolve_base("alice/base@nope", home)
    assert str(caught.value) == ("cannot download base 'alice/base': revision 'nope' does not "
                                 "exist in alice/base")


# -- stale caches, local base paths, endpoint passwords, edited cards, subfolders -------------

@pytest.fixture
def small(library, tiny_base, peft_adapter):
    """A pocket book of plain PEFT's adapter (rank 4 on q_proj, v_proj) on the tiny base."""
    return library.import_peft(peft_adapter, "small", base=str(tiny_base))


def _head(hub, repo_id):
    return hub.repos[repo_id].commits[hub.repos[repo_id].branches["main"]]


def _unreachable(monkeypatch, userinfo=""):
    """Point the client at a loopback port nothing listens on (the cache stays where it is)."""
    import socket

    import huggingface_hub.constants as constants

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://{userinfo}127.0.0.1:{port}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")


def test_pull_from_an_unreachable_hub_never_imports_the_cache_silently(
        hub, library, small, tiny_base, tmp_path, monkeypatch):
    """Before: with the Hub down, ``snapshot_download`` answered from the Hub cache (what an
    earlier pull left there, whatever has been pushed since) and the pull said nothing."""
    import huggingface_hub.constants as constants

    from adapterkit.plugin_api.testing import make_peft_adapter

    push(library, "small", "alice/x")
    first = hub.repos["alice/x"].branches["main"]
    pull(library, "alice/x", name="seen")  # fills the cache with the first commit
    newer = make_peft_adapter(tiny_base, tmp_path / "newer", seed=7)
    library.import_peft(newer, "newer", base=str(tiny_base))
    push(library, "newer", "alice/x")
    second = hub.repos["alice/x"].branches["main"]
    assert second != first

    _unreachable(monkeypatch)
    with pytest.raises(HubError, match="cannot reach the Hub .*nothing was imported .*"
                                       "HF_HUB_OFFLINE=1") as caught:
        pull(library, "alice/x", name="y")
    assert len(str(caught.value).splitlines()) == 1 and not library.exists("y")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # asked for: the cache, said so
    with pytest.warns(HubWarning, match=f"HF_HUB_OFFLINE is set, so the Hub was not asked: "
                                        f"alice/x \\(main\\) is imported as the Hub cache holds "
                                        f"it, commit {first}"):
        offline = pull(library, "alice/x", name="y")
    assert offline.meta.source["commit"] == first
    assert (offline.path / "adapter_model.safetensors").read_bytes() == (
        small.path / "adapter_model.safetensors").read_bytes()
    with pytest.raises(HubError, match="HF_HUB_OFFLINE is set and the Hub cache holds no "
                                       "complete copy of alice/never"):
        pull(library, "alice/never")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # a full commit id names files that never change: the cache's copy of it is that commit
    with pytest.warns(HubWarning, match=f"cannot reach the Hub at http://127.0.0.1:\\d+: "
                                        f"alice/x at commit {first} is imported from the Hub "
                                        "cache"):
        pinned = pull(library, f"alice/x@{first}", name="pinned")
    assert pinned.meta.source["commit"] == first
    assert (pinned.path / "adapter_model.safetensors").read_bytes() == (
        small.path / "adapter_model.safetensors").read_bytes()
    with pytest.raises(HubError, match=f"cannot reach the Hub at .* and the Hub cache holds no "
                                       f"complete copy of alice/x at commit {second}; check the "
                                       "connection and retry — nothing was imported") as caught:
        pull(library, f"alice/x@{second}", name="never")  # pushed, never pulled: not cached
    assert len(str(caught.value).splitlines()) == 1 and not library.exists("never")

    point_client_at(hub, monkeypatch, constants.HF_HUB_CACHE)  # back online: the new commit
    online = pull(library, "alice/x", name="z")
    assert online.meta.source["commit"] == second
    assert (online.path / "adapter_model.safetensors").read_bytes() == (
        library.get("newer").path / "adapter_model.safetensors").read_bytes()


def test_a_pushed_config_never_names_a_local_path(hub, library, small, tiny_base):
    """Before: an imported pocket book kept the absolute path its adapter was saved on as
    ``base_model_name_or_path``, and the card's snippet loaded ``from_pretrained("tiny")``."""
    from huggingface_hub import ModelCard

    # as a pocket book imported before the fix holds it: PEFT's absolute path
    config = json.loads((small.path / "adapter_config.json").read_text())
    (small.path / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": str(tiny_base)}, indent=2))
    library.update_meta("small", lambda meta: setattr(meta, "files", {}))  # no hashes to break
    push(library, "small", "alice/local-base")
    stored = _head(hub, "alice/local-base")
    pushed = json.loads(stored["adapter_config.json"])["base_model_name_or_path"]
    assert pushed == tiny_base.name and not os.path.isabs(pushed)
    card = ModelCard(stored["README.md"].decode())
    assert card.data.base_model is None  # no Hub id known: none claimed
    assert f'from_pretrained("{tiny_base.name}")' not in card.text
    assert (f"Its base is a local model folder (`{tiny_base.name}`), not a model on the Hub"
            in card.text and small.meta.base_fingerprint in card.text)
    meta = json.loads(stored["adapterkit.json"])  # the hash is of the file pushed
    assert meta["files"]["adapter_config.json"] == hashlib.sha256(
        stored["adapter_config.json"]).hexdigest()


def test_an_endpoint_password_is_never_printed(hub, library, small, monkeypatch, adapterkit_cli):
    """Before: ``HF_ENDPOINT=http://user:SECRET@host`` was printed as is in Hub errors."""
    import huggingface_hub.constants as constants

    with_password = hub.endpoint.replace("http://", "http://user:SECRET@")
    monkeypatch.setattr(constants, "ENDPOINT", with_password)  # httpx sends it as Basic auth
    result = adapterkit_cli("push", "small", "--repo", "alice/pw")  # refused: not our token
    assert result.exit_code == 1 and "refused your credentials" in result.stderr, result.output
    assert "SECRET" not in result.output and f"the Hub at {hub.endpoint} " in result.stderr

    _unreachable(monkeypatch, userinfo="user:SECRET@")
    result = adapterkit_cli("pull", "alice/pw")
    assert result.exit_code == 1 and "cannot reach the Hub at http://127.0.0.1:" in result.stderr
    assert "SECRET" not in result.output


def test_a_card_edited_on_the_hub_is_said_and_changed_weights_are_refused(hub, library, small):
    """Before: a card edited on the Hub (routine: it changes no weights) made the repo
    unpullable, with the advice "pull again", which could never succeed."""
    push(library, "small", "alice/edited")
    files = dict(_head(hub, "alice/edited"))
    files["README.md"] = files["README.md"] + b"\nEdited on the Hub.\n"
    hub.add_repo("alice/edited", "alice", files)
    with pytest.warns(HubWarning, match="alice/edited: README.md changed since it was pushed"):
        book = pull(library, "alice/edited", name="edited")
    assert (book.path / "README.md").read_bytes().endswith(b"Edited on the Hub.\n")
    assert (book.path / "adapter_model.safetensors").read_bytes() == (
        small.path / "adapter_model.safetensors").read_bytes()

    config = json.loads(files["adapter_config.json"])
    files["adapter_config.json"] = json.dumps({**config, "lora_alpha": 64}).encode()
    hub.add_repo("alice/edited", "alice", files)
    with pytest.raises(InvalidAdapter) as caught:
        pull(library, "alice/edited", name="changed")
    assert str(caught.value) == (
        "alice/edited: adapter_config.json differs from what was pushed (the SHA-256 its "
        "adapterkit.json records): it was changed on the Hub since, or the download is "
        "corrupt; nothing was imported")
    assert not library.exists("changed")


def test_an_adapter_in_a_subfolder_is_named_and_pulled_with_subfolder(hub, library, tiny_base,
                                                                       peft_adapter,
                                                                       adapterkit_cli):
    """Before: a repo holding an adapter saved under a non-default name (``myname/...``) was
    refused as ``<cache path> is not a PEFT adapter``, naming neither the subfolder nor a way."""
    files = {f"myname/{p.name}": p.read_bytes() for p in peft_adapter.iterdir() if p.is_file()}
    hub.add_repo("carol/named", "carol", {**files, "README.md": b"hi"})
    with pytest.raises(InvalidAdapter) as caught:
        pull(library, "carol/named")
    assert str(caught.value) == (
        "carol/named (main) has no adapter_config.json at its top: its adapter is in the "
        "subfolder myname; pull it with --subfolder myname; nothing was imported")
    with pytest.raises(InvalidAdapter, match="no adapter_config.json in its folder other: its "
                                             "adapter is in the subfolder myname"):
        pull(library, "carol/named", subfolder="other")
    book = pull(library, "carol/named", subfolder="myname", base=str(tiny_base))
    top = {p.name: p.read_bytes() for p in peft_adapter.iterdir() if p.is_file()}
    hub.add_repo("carol/top", "carol", top)
    with pytest.raises(InvalidAdapter, match="carol/top \\(main\\) has no adapter_config.json in "
                                             "its folder myname: its adapter is at its top; "
                                             "pull it without --subfolder"):
        pull(library, "carol/top", subfolder="myname")
    assert book.meta.source["subfolder"] == "myname" and book.name == "named"
    assert (book.path / "adapter_model.safetensors").read_bytes() == (
        peft_adapter / "adapter_model.safetensors").read_bytes()
    result = adapterkit_cli("pull", "carol/named", "--subfolder", "myname", "--base",
                            tiny_base, "--name", "named-cli")  # as the refusal says
    assert result.exit_code == 0, result.output
    assert library.get("named-cli").meta.source["subfolder"] == "myname"


def test_pull_of_a_repo_with_no_files_says_so(hub, library):
    """Before: huggingface_hub's "No files matched allow_patterns", then ``<cache>/snapshots/
    <sha> is not a folder``."""
    hub.add_repo("alice/empty", "alice", {".gitattributes": b"*.safetensors filter=lfs\n"})
    with pytest.raises(InvalidAdapter) as caught:
        pull(library, "alice/empty")
    assert str(caught.value) == ("alice/empty: main has no files (nothing has been pushed to "
                                 "it); nothing was imported")


def test_a_card_naming_the_base_by_its_absolute_path_is_the_same_base(
        hub, library, tiny_base, peft_adapter, monkeypatch, recwarn):
    """Before: ``pull --base bases/tiny`` warned that the card names ``/abs/.../bases/tiny``,
    "not bases/tiny"."""
    files = {p.name: p.read_bytes() for p in peft_adapter.iterdir() if p.is_file()}
    files["README.md"] = f"---\nbase_model: {tiny_base}\nlibrary_name: peft\n---\nhi\n".encode()
    hub.add_repo("carol/abs", "carol", files)
    monkeypatch.chdir(tiny_base.parent)
    pull(library, "carol/abs", base=tiny_base.name)
    assert not [w for w in recwarn if "names" in str(w.message)], [str(w.message) for w in recwarn]
