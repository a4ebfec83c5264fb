"""push → pull round trips with the real huggingface_hub client against a loopback Hub."""

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
