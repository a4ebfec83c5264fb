"""``adapterkit serve --engine vllm``: what can be checked without vLLM or a GPU.

vLLM is not installed here and cannot run on CPU, so a stand-in package is written into
``tmp_path`` with the interfaces the resolver meets, copied in shape from vLLM's source:
``vllm/lora/request.py`` (``LoRARequest``: fields, keyword construction, ``lora_int_id > 0``,
a non-empty ``lora_path``) and ``vllm/lora/resolver.py`` (the ``LoRAResolver`` ABC with its
async ``resolve_lora(base_model_name, lora_name)``, ``LoRAResolverRegistry``). Serving itself is
checked only on GPUs.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from adapterkit.errors import BaseMismatch, ConfigError, InvalidAdapter, MissingDependency
from adapterkit.library.metadata import WEIGHTS_FILE
from adapterkit.library.store import Library
from adapterkit.lora.combine import stack
from adapterkit.plugin_api.testing import make_peft_adapter
from adapterkit.serving import vllm
from adapterkit.serving.vllm import AdapterkitResolver, Refresher, ServedBase

ROOT = Path(__file__).resolve().parents[1]

FAKE_REQUEST = '''
    """Stand-in for vllm/lora/request.py (a msgspec Struct there; the same fields and checks)."""
    from dataclasses import dataclass


    @dataclass
    class LoRARequest:
        lora_name: str
        lora_int_id: int
        lora_path: str = ""
        base_model_name: str | None = None
        tensorizer_config_dict: dict | None = None
        load_inplace: bool = False

        def __post_init__(self):
            if self.lora_int_id < 1:
                raise ValueError(f"id must be > 0, got {self.lora_int_id}")
            assert self.lora_path, "lora_path cannot be empty"
'''
FAKE_RESOLVER = '''
    """Stand-in for vllm/lora/resolver.py: the ABC and the registry, same signatures."""
    from abc import ABC, abstractmethod
    from collections.abc import Set
    from dataclasses import dataclass, field

    from vllm.lora.request import LoRARequest


    class LoRAResolver(ABC):
        @abstractmethod
        async def resolve_lora(self, base_model_name: str,
                               lora_name: str) -> LoRARequest | None:
            pass


    @dataclass
    class _LoRAResolverRegistry:
        resolvers: dict[str, LoRAResolver] = field(default_factory=dict)

        def get_supported_resolvers(self) -> Set[str]:
            return self.resolvers.keys()

        def register_resolver(self, resolver_name: str, resolver: LoRAResolver) -> None:
            self.resolvers[resolver_name] = resolver

        def get_resolver(self, resolver_name: str) -> LoRAResolver:
            if resolver_name not in self.resolvers:
                raise KeyError(f"LoRA resolver '{resolver_name}' not found.")
            return self.resolvers[resolver_name]


    LoRAResolverRegistry = _LoRAResolverRegistry()
'''


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch):
    """A ``vllm`` package with vLLM's LoRA resolver interface, importable for this test only."""
    root = tmp_path / "site"
    (root / "vllm" / "lora").mkdir(parents=True)
    (root / "vllm" / "__init__.py").write_text("")
    (root / "vllm" / "lora" / "__init__.py").write_text("")
    (root / "vllm" / "lora" / "request.py").write_text(textwrap.dedent(FAKE_REQUEST))
    (root / "vllm" / "lora" / "resolver.py").write_text(textwrap.dedent(FAKE_RESOLVER))
    monkeypatch.syspath_prepend(str(root))
    yield sys.modules
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def adapters(tiny_base, other_base, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vllm-adapters")
    return {
        "law": make_peft_adapter(tiny_base, root / "law", seed=1, r=4),
        "law2": make_peft_adapter(tiny_base, root / "law2", seed=7, r=4),
        "code": make_peft_adapter(tiny_base, root / "code", seed=2, r=8,
                                  target_modules="all-linear"),
        # one alpha per layer: vLLM's PEFTHelper would read only lora_alpha
        "wide": make_peft_adapter(tiny_base, root / "wide", seed=3, r=4,
                                  alpha_pattern={"q_proj": 2}),
        "alien": make_peft_adapter(other_base, root / "alien", seed=4, r=4),
    }


def new_library(home: Path, tiny_base: Path, adapters: dict[str, Path], *names: str) -> Library:
    library = Library(home)
    for name in names:
        library.import_peft(adapters[name], name, base=str(tiny_base))
    return library


@pytest.fixture(scope="module")
def lib(tiny_base, other_base, adapters, tmp_path_factory) -> Library:
    library = new_library(tmp_path_factory.mktemp("vllm-lib") / "home", tiny_base, adapters,
                          "law", "code", "wide")
    library.import_peft(adapters["alien"], "alien", base=str(other_base))
    stack(library, ["law", "code"], [1.0, 0.5], name="mix")
    return library


@pytest.fixture(scope="module")
def served(tiny_base, lib) -> ServedBase:
    return ServedBase.of(str(tiny_base), lib.home)


def resolver_of(library: Library, base: ServedBase, **kwargs) -> AdapterkitResolver:
    return AdapterkitResolver(library, base, **kwargs)


# -- names → folders ---------------------------------------------------------------------------

def test_names_resolve_to_the_library_folders(lib, served):
    resolver = resolver_of(lib, served)
    law = resolver.resolve("law")
    assert law is not None and law.path == lib.get("law@1").path and law.rank == 4
    assert law.name.startswith("law@1#") and len(law.name.split("#")[1]) == vllm.DIGITS
    assert resolver.resolve("law@1") == law
    code = resolver.resolve("code")
    assert code is not None and code.path == lib.get("code").path and code.rank == 8
    assert code.lora_int_id != law.lora_int_id and 1 <= code.lora_int_id < 2**31
    # the name vLLM lists (KEY#CONTENT) resolves to the same adapter
    assert resolver.resolve(law.name) == law


def test_unknown_names_are_none_as_vllm_expects(lib, served):
    resolver = resolver_of(lib, served)
    for model in ("nope", "gpt-4o", "org/model", "law@9", "", "#", served.name,
                  "law@1#000000000000"):
        assert resolver.resolve(model) is None, model


def test_another_bases_pocket_book_is_refused_naming_both_fingerprints(lib, served):
    resolver = resolver_of(lib, served)
    with pytest.raises(BaseMismatch) as refused:
        resolver.resolve("alien")
    other = lib.get("alien").meta.base_fingerprint
    assert served.fingerprint[:12] in str(refused.value) and other[:12] in str(refused.value)
    with pytest.raises(BaseMismatch):
        resolver.resolve("law+alien")


def test_a_pocket_book_trained_on_a_4bit_base_is_refused(tiny_base, adapters, served,
                                                           tmp_path):
    """vLLM serves the full-precision base: a qlora book answered there otherwise than
    `adapterkit generate`, which loads the 4-bit base it was trained on."""
    library = new_library(tmp_path / "home", tiny_base, adapters, "law", "code")
    library.update_meta("code", lambda meta: setattr(meta, "method", "qlora"))
    resolver = resolver_of(library, served)
    assert resolver.resolve("law") is not None
    for model in ("code", "law+code"):
        with pytest.raises(InvalidAdapter, match=r"code@1 was trained on a 4bit base and vLLM "
                                                 r"\(here\) holds a full-precision one.*adapterkit "
                                                 r"serve --preload"):
            resolver.resolve(model)


def test_stacks_and_per_layer_alphas_are_flattened_into_one_adapter(lib, served):
    resolver = resolver_of(lib, served)
    inline = resolver.resolve("law+code*0.5")
    assert inline is not None and inline.name.startswith("law@1*1+code@1*0.5#")
    cache = lib.home / "serving" / "vllm"
    assert inline.path.parent == cache and inline.rank == 4 + 8  # ranks add up where shared
    config = json.loads((inline.path / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 12 and not config["alpha_pattern"]
    saved = resolver.resolve("mix")
    assert saved is not None and saved.path.parent == cache and saved.rank == 12
    wide = resolver.resolve("wide")  # vLLM would read lora_alpha alone: scales baked into B
    assert wide is not None and wide.path.parent == cache and wide.path != lib.get("wide").path
    # kept under its content hash, reused; a damaged copy is rebuilt, never served
    stamp = (inline.path / WEIGHTS_FILE).stat().st_mtime_ns
    assert resolver.resolve("law+code*0.5") == inline
    assert (inline.path / WEIGHTS_FILE).stat().st_mtime_ns == stamp
    (inline.path / WEIGHTS_FILE).write_bytes(b"damaged")
    assert resolver.resolve("law+code*0.5") == inline
    assert (inline.path / WEIGHTS_FILE).read_bytes()[:7] != b"damaged"
    assert (inline.path / WEIGHTS_FILE).stat().st_size > 100


def test_a_rank_above_the_servers_is_refused_with_the_flag_to_use(lib, served):
    resolver = resolver_of(lib, served, max_rank=8)
    assert resolver.resolve("code") is not None
    with pytest.raises(ConfigError, match="--max-lora-rank 16"):
        resolver.resolve("law+code")


def test_the_launch_rank_holds_every_book_and_saved_stack(lib, served, tiny_base, adapters,
                                                          tmp_path):
    assert [vllm.vllm_rank(r) for r in (1, 4, 8, 12, 17, 320, 600)] == [1, 8, 8, 16, 32, 320,
                                                                         512]
    assert vllm.library_rank(resolver_of(lib, served)) == 16  # mix: law 4 + code 8
    only_law = new_library(tmp_path / "home", tiny_base, adapters, "law")
    assert vllm.library_rank(resolver_of(only_law, served)) == 8
    assert vllm.library_rank(resolver_of(Library(tmp_path / "empty"), served)) == 16


# -- a retrained NAME is never served from a stale cache -----------------------------------------

def test_a_retrained_name_gets_a_new_name_and_id(tiny_base, adapters, served, tmp_path):
    library = new_library(tmp_path / "home", tiny_base, adapters, "law")
    resolver = resolver_of(library, served)
    first = resolver.resolve("law")
    library.import_peft(adapters["law2"], "law@2", base=str(tiny_base))
    second = resolver.resolve("law")
    assert first is not None and second is not None
    assert second.path == library.get("law@2").path and second.name.startswith("law@2#")
    assert second.lora_int_id != first.lora_int_id
    assert second.name.split("#")[1] != first.name.split("#")[1]
    assert resolver.resolve("law@1") == first
    assert resolver.resolve(first.name) == first  # pinned by version: still there
    assert resolver.resolve("law@2" + "#" + first.name.split("#")[1]) is None


def test_the_refresher_unloads_names_that_now_mean_other_content(tiny_base, adapters, served,
                                                                 tmp_path):
    library = new_library(tmp_path / "home", tiny_base, adapters, "law", "code")
    resolver = resolver_of(library, served, state=tmp_path / "names.json")
    for model in ("law", "law@1", "code"):
        found = resolver.resolve(model)
        assert found is not None
        resolver.remember(model, found.name)
    posts: list[tuple[str, dict, str | None]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            posts.append((self.path, body, self.headers.get("Authorization")))
            self.send_response(200 if body["lora_name"] == "law" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        refresher = Refresher(resolver, f"http://127.0.0.1:{server.server_port}", api_key="k")
        assert refresher.stale() == {} and refresher.step() == []
        library.import_peft(adapters["law2"], "law@2", base=str(tiny_base))
        assert list(refresher.stale()) == ["law"]  # law@1 is pinned: still the same content
        assert refresher.step() == ["law"]
        assert posts == [("/v1/unload_lora_adapter", {"lora_name": "law"}, "Bearer k")]
        assert refresher.step() == [] and len(posts) == 1  # unloaded once
        library.remove("code", all_versions=True)  # gone: vLLM must stop answering with it
        assert refresher.step() == ["code"]  # 404: vLLM no longer had it, also fine
    finally:
        server.shutdown()
    unreachable = Refresher(resolver, "http://127.0.0.1:9", api_key=None)
    assert unreachable.stale() and unreachable.step() == []  # not up yet: tried again next time, never raised


def test_a_damaged_pocket_book_is_refused(tiny_base, adapters, served, tmp_path):
    library = new_library(tmp_path / "home", tiny_base, adapters, "law")
    (library.get("law").path / WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(InvalidAdapter, match="SHA-256"):
        resolver_of(library, served).resolve("law")


# -- vLLM's hook, through the stand-in vLLM ---------------------------------------------------

def test_resolve_lora_answers_with_vllms_lora_request(fake_vllm, lib, served):
    from vllm.lora.request import LoRARequest

    resolver = resolver_of(lib, served)
    folder = str(served.source.folder)
    request = asyncio.run(resolver.resolve_lora(folder, "law"))
    assert isinstance(request, LoRARequest)
    found = resolver.resolve("law")
    assert found is not None
    assert (request.lora_name, request.lora_int_id, request.lora_path, request.base_model_name) \
        == (found.name, found.lora_int_id, str(lib.get("law").path), folder)
    assert asyncio.run(resolver.resolve_lora(folder, "nope")) is None
    with pytest.raises(ValueError, match=served.fingerprint[:12]):
        asyncio.run(resolver.resolve_lora(folder, "alien"))
    assert asyncio.run(resolver.resolve_lora("/some/other/model", "law")) is None


def test_register_adds_the_resolver_only_when_adapterkit_launched_vllm(fake_vllm, lib, served,
                                                                       monkeypatch):
    from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

    for key in (vllm.ENV_FOLDER, vllm.ENV_BASE_ID, vllm.ENV_MAX_RANK, vllm.ENV_STATE):
        monkeypatch.delenv(key, raising=False)
    vllm.register()
    assert list(LoRAResolverRegistry.get_supported_resolvers()) == []
    _, env = vllm.vllm_command(served, home=lib.home, max_lora_rank=8, environ={})
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    vllm.register()
    plugin = LoRAResolverRegistry.get_resolver("adapterkit")
    assert isinstance(plugin, LoRAResolver) and plugin.max_rank == 8
    request = asyncio.run(plugin.resolve_lora(str(served.source.folder), "code@1"))
    assert request is not None and request.lora_path == str(lib.get("code").path)


def test_without_vllm_the_hook_says_how_to_install_it(lib, served):
    with pytest.raises(MissingDependency, match=r"pip install 'adapterkit\[vllm\]'"):
        asyncio.run(resolver_of(lib, served).resolve_lora(str(served.source.folder), "law"))


def test_the_entry_point_and_extra_are_declared():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["vllm.general_plugins"] == {
        "adapterkit": "adapterkit.serving.vllm:register"}
    assert any(r.startswith("vllm>=0.10") for r in project["optional-dependencies"]["vllm"])


# -- the launch --------------------------------------------------------------------------------

def test_the_vllm_serve_command_line_and_environment(served, lib, tmp_path):
    argv, env = vllm.vllm_command(
        served, home=lib.home, host="0.0.0.0", port=8123, max_loras=4, max_lora_rank=16,
        max_num_seqs=32, preload={"law": Path("/lib/law/1")}, api_key="sekrit",
        state=tmp_path / "names.json",
        environ={"VLLM_PLUGINS": "other", "VLLM_API_KEY": "old", "PATH": "/bin"})
    assert argv == ["vllm", "serve", str(served.source.folder), "--served-model-name",
                    served.name, "--host", "0.0.0.0", "--port", "8123", "--enable-lora",
                    "--max-loras", "4", "--max-lora-rank", "16", "--max-num-seqs", "32",
                    "--lora-modules", "law=/lib/law/1"]
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "1"
    assert env["VLLM_PLUGINS"] == "other,adapterkit" and env["PATH"] == "/bin"
    assert env["VLLM_API_KEY"] == "sekrit" and "sekrit" not in " ".join(argv)
    assert env["ADAPTERKIT_HOME"] == str(lib.home.resolve())
    assert env[vllm.ENV_FOLDER] == str(served.source.folder)
    assert env[vllm.ENV_BASE_ID] == served.name and env[vllm.ENV_MAX_RANK] == "16"
    assert env[vllm.ENV_STATE] == str(tmp_path / "names.json")
    argv, env = vllm.vllm_command(served, home=lib.home, environ={"VLLM_API_KEY": "old"})
    assert "VLLM_API_KEY" not in env and env["VLLM_PLUGINS"] == "adapterkit"
    assert "--lora-modules" not in argv and "--max-num-seqs" not in argv
    with pytest.raises(ConfigError, match="320"):
        vllm.vllm_command(served, home=lib.home, max_lora_rank=24)


def test_cli_without_vllm_says_how_to_install_it(adapterkit_cli, tiny_base):
    result = adapterkit_cli("serve", "--engine", "vllm", "--base", tiny_base)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "pip install 'adapterkit[vllm]' on a machine with a GPU" in result.output


def test_cli_without_a_gpu_refuses_in_one_line(fake_vllm, adapterkit_cli, tiny_base,
                                               monkeypatch):
    monkeypatch.setattr(vllm, "gpu_available", lambda: False)
    result = adapterkit_cli("serve", "--engine", "vllm", "--base", tiny_base)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "needs a CUDA GPU" in result.output and "--engine adapterkit" in result.output


def test_cli_refuses_what_does_not_apply(adapterkit_cli, tiny_base):
    result = adapterkit_cli("serve", "--engine", "vllm", "--base", tiny_base, "--max-queue", 9)
    assert result.exit_code == 1 and "--max-queue does not apply" in result.output
    result = adapterkit_cli("serve", "--base", tiny_base, "--max-lora-rank", 16)
    assert result.exit_code == 1 and "only to --engine vllm" in result.output
    result = adapterkit_cli("serve", "--engine", "vllm", "--base", tiny_base, "--host",
                            "0.0.0.0")
    assert result.exit_code == 1 and "--api-key" in result.output


@pytest.fixture
def launched(fake_vllm, monkeypatch):
    """Run the CLI up to the launch: vLLM's command is captured, not run."""
    calls: list[tuple[list[str], dict[str, str], Refresher | None]] = []

    def run(argv, env, *, refresher=None):
        calls.append((argv, env, refresher))
        return 0

    monkeypatch.setattr(vllm, "gpu_available", lambda: True)
    monkeypatch.setattr(vllm, "program", lambda: "vllm")
    monkeypatch.setattr(vllm, "run", run)
    return calls


def test_cli_launches_vllm_with_checked_preloads(launched, adapterkit_cli, adapterkit_library,
                                                 tiny_base, adapters):
    adapterkit_library.import_peft(adapters["law"], "law", base=str(tiny_base))
    adapterkit_library.import_peft(adapters["code"], "code", base=str(tiny_base))
    result = adapterkit_cli("serve", "--engine", "vllm", "--base", tiny_base, "--preload",
                            "law,law+code", "--api-key", "sekrit", "--max-batch", 12)
    assert result.exit_code == 0, result.output
    [(argv, env, refresher)] = launched
    modules = argv[argv.index("--lora-modules") + 1:]
    assert modules[0] == f"law={adapterkit_library.get('law').path}"
    assert modules[1].startswith("law+code=") and "serving/vllm/" in modules[1]
    assert argv[argv.index("--max-lora-rank") + 1] == "16"  # law 4 + code 8, as vLLM takes it
    assert argv[argv.index("--max-num-seqs") + 1] == "12"
    assert env["VLLM_API_KEY"] == "sekrit" and "sekrit" not in result.output
    assert refresher is not None and refresher.api_key == "sekrit"
    pinned = vllm.read_state(Path(env[vllm.ENV_STATE]))
    assert set(pinned) == {"law", "law+code"} and pinned["law"].startswith("law@1#")


def test_cli_refuses_preloads_it_cannot_serve(launched, adapterkit_cli, adapterkit_library,
                                              tiny_base, other_base, adapters):
    adapterkit_library.import_peft(adapters["alien"], "alien", base=str(other_base))
    result = adapterkit_cli("serve", "--engine", "vllm", "--base", tiny_base, "--preload", "nope")
    assert result.exit_code == 1 and "--preload nope" in result.output
    result = adapterkit_cli("serve", "--engine", "vllm", "--base", tiny_base, "--preload", "alien")
    assert result.exit_code == 1 and "fingerprint" in result.output
    assert "Traceback" not in result.output and launched == []


def test_the_base_name_spaced_is_the_base_and_a_replaced_stack_member_is_refused(
        tiny_base, adapters, served, tmp_path):
    """vLLM serves the plain base itself for its own name, with spaces around it too (before,
    "BASE " resolved to a pocket book named like the base, whose rank `library_rank` skipped);
    a saved stack whose member was replaced under its name is refused, not flattened with
    the namesake's weights."""
    library = new_library(tmp_path / "home", tiny_base, adapters, "law", "code")
    wide = make_peft_adapter(tiny_base, tmp_path / "wide", seed=5, r=32)
    library.import_peft(wide, served.name, base=str(tiny_base))
    stack(library, ["law", "code"], [1.0, 0.5], name="mix")
    resolver = resolver_of(library, served)
    for model in (served.name, f"{served.name} ", f" {served.name}"):
        assert resolver.members(model) is None, model
    assert resolver.members(f"{served.name}@1") is not None
    assert vllm.library_rank(resolver) == 32  # the book named like the base counts
    library.remove("law", force=True)
    library.import_peft(adapters["law2"], "law@1", base=str(tiny_base))
    with pytest.raises(ConfigError, match=r"^mix@1 is a stack of law@1 with weights "):
        resolver.resolve("mix")
    assert resolver.current_name("mix") is None
