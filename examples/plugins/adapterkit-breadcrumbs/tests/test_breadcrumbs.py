"""The worked example's own tests, using adapterkit's pytest fixtures."""

import json

import pytest
import torch


@pytest.fixture
def two_books(adapterkit_library, adapterkit_tiny_base, tmp_path):
    from adapterkit.plugin_api.testing import make_peft_adapter

    for name, seed in (("a", 1), ("b", 2)):
        path = make_peft_adapter(adapterkit_tiny_base, tmp_path / name, seed=seed, r=4)
        adapterkit_library.import_peft(path, name, base=str(adapterkit_tiny_base))
    return adapterkit_library


def test_installed_like_any_plugin(adapterkit_cli):
    result = adapterkit_cli("plugins", "--json")
    plugins = {p["name"]: p for p in json.loads(result.output)}
    assert plugins["breadcrumbs"]["registers"] == {"merge strategy": ["breadcrumbs"]}
    assert plugins["breadcrumbs"]["hook_version"] == 1


def test_merge_from_the_cli_loads_in_peft(adapterkit_cli, two_books, adapterkit_tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = adapterkit_cli("merge", "a", "b", "--method", "breadcrumbs", "--density", "0.8",
                            "--rank", "4", "--weights", "1,0.5", "--name", "ab")
    assert result.exit_code == 0, result.output
    book = two_books.get("ab")
    assert book.meta.parents == ["a@1", "b@1"] and book.meta.source["method"] == "breadcrumbs"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(adapterkit_tiny_base),
                                      book.path)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[3, 4, 5]])).logits).all()


def test_density_is_required(adapterkit_cli, two_books):
    result = adapterkit_cli("merge", "a", "b", "--method", "breadcrumbs", "--name", "x")
    assert result.exit_code == 1 and "needs --density" in result.output


def test_band_drops_outliers_and_small_entries():
    from adapterkit_breadcrumbs import _band

    delta = torch.arange(1, 101, dtype=torch.float32).reshape(10, 10)
    kept = _band(delta, density=0.5)
    assert kept.flatten()[-1] == 0 and kept.flatten()[0] == 0  # largest and smallest dropped
    assert 45 <= int((kept != 0).sum()) <= 52
