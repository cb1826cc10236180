"""Recipes: every bad recipe fails before any weight is read, with exit 2, one line, no output."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from micota_merge.cli import cli
from micota_merge.core.errors import UserError
from micota_merge.merge.recipe import Recipe, parse_recipe


def _recipe(family, tmp_path, **merge) -> dict:
    return {
        "models": {k: str(v) for k, v in family.items()},
        "merge": {"method": "dare_ties", "ratio": 0.5, "density": 0.5, "seed": 0, "dtype": "float32", **merge},
        "output": str(tmp_path / "ta"),
    }


def _write(tmp_path: Path, data, name="recipe.yaml") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def _build(*args):
    return CliRunner().invoke(cli, ["build", *map(str, args)])


def _assert_clean_failure(result, tmp_path, *needles):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    out = result.output.lower()
    for n in needles:
        assert n.lower() in out, f"{n!r} not in {result.output!r}"
    assert not (tmp_path / "ta").exists()
    assert not list(tmp_path.glob(".ta.partial-*"))


def test_unknown_key_is_named_with_suggestion(tiny_family, tmp_path):
    r = _recipe(tiny_family, tmp_path)
    r["merge"]["ratoi"] = r["merge"].pop("ratio")
    _assert_clean_failure(_build(_write(tmp_path, r)), tmp_path, "ratoi", "did you mean 'ratio'")


def test_unknown_top_level_key(tiny_family, tmp_path):
    r = _recipe(tiny_family, tmp_path)
    r["tokeniser"] = "short_cot"
    _assert_clean_failure(_build(_write(tmp_path, r)), tmp_path, "tokeniser", "did you mean 'tokenizer'")


def test_unknown_model_role(tiny_family, tmp_path):
    r = _recipe(tiny_family, tmp_path)
    r["models"]["long"] = r["models"].pop("long_cot")
    _assert_clean_failure(_build(_write(tmp_path, r)), tmp_path, "models.long", "long_cot")


@pytest.mark.parametrize("ratio", [-0.1, 1.5])
def test_ratio_out_of_range(tiny_family, tmp_path, ratio):
    _assert_clean_failure(
        _build(_write(tmp_path, _recipe(tiny_family, tmp_path, ratio=ratio))),
        tmp_path,
        "merge.ratio",
        "between 0 and 1",
    )


def test_ratio_override_out_of_range(tiny_family, tmp_path):
    _assert_clean_failure(
        _build(_write(tmp_path, _recipe(tiny_family, tmp_path)), "--ratio", "2"), tmp_path, "ratio", "between 0 and 1"
    )


@pytest.mark.parametrize("density", [0, 1.2, -0.5])
def test_density_out_of_range(tiny_family, tmp_path, density):
    _assert_clean_failure(
        _build(_write(tmp_path, _recipe(tiny_family, tmp_path, density=density))), tmp_path, "merge.density", "(0, 1]"
    )


def test_unknown_method_lists_valid_ones(tiny_family, tmp_path):
    _assert_clean_failure(
        _build(_write(tmp_path, _recipe(tiny_family, tmp_path, method="dare_tie"))),
        tmp_path,
        "unknown method 'dare_tie'",
        "did you mean 'dare_ties'",
        "task_arithmetic",
    )


def test_unknown_method_parameter(tiny_family, tmp_path):
    _assert_clean_failure(
        _build(_write(tmp_path, _recipe(tiny_family, tmp_path, gama=0.1, method="breadcrumbs"))),
        tmp_path,
        "gama",
        "did you mean 'gamma'",
    )


def test_task_vector_method_needs_base(tiny_family, tmp_path):
    r = _recipe(tiny_family, tmp_path)
    del r["models"]["base"]
    _assert_clean_failure(_build(_write(tmp_path, r)), tmp_path, "needs models.base")


def test_linear_needs_no_base(tiny_family, tmp_path):
    r = _recipe(tiny_family, tmp_path, method="linear")
    del r["models"]["base"]
    del r["merge"]["density"]
    parse_recipe(r)  # no error


def test_missing_model_path_is_named(tiny_family, tmp_path):
    r = _recipe(tiny_family, tmp_path)
    r["models"]["short_cot"] = str(tmp_path / "nowhere" / "short")
    _assert_clean_failure(_build(_write(tmp_path, r)), tmp_path, "models.short_cot", "nowhere/short", "does not exist")


def test_hub_id_offline_says_so(tiny_family, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    r = _recipe(tiny_family, tmp_path)
    r["models"]["long_cot"] = "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"
    _assert_clean_failure(
        _build(_write(tmp_path, r)), tmp_path, "models.long_cot", "HF_HUB_OFFLINE=1", "huggingface-cli download"
    )


def test_invalid_yaml_says_where(tmp_path):
    p = _write(tmp_path, "models:\n  long_cot: a\n  short_cot: [b\nmerge: {}\n")
    result = _build(p)
    _assert_clean_failure(result, tmp_path, "invalid yaml", "line")


def test_recipe_file_missing(tmp_path):
    _assert_clean_failure(_build(tmp_path / "nope.yaml"), tmp_path, "nope.yaml", "does not exist")


def test_debug_shows_traceback(tmp_path):
    result = CliRunner().invoke(cli, ["--debug", "build", str(tmp_path / "nope.yaml")])
    assert isinstance(result.exception, UserError)


def test_architecture_mismatch_names_field(tiny_family, tiny_llama_family, tmp_path):
    r = _recipe(tiny_family, tmp_path)
    r["models"]["short_cot"] = str(tiny_llama_family["short_cot"])
    _assert_clean_failure(_build(_write(tmp_path, r)), tmp_path, "model_type", "qwen2", "llama")


def test_shape_mismatch_names_tensor(tiny_family, tmp_path):
    """Same config fields but a different vocabulary size: the embedding's shape differs."""
    from micota_merge.demo.family import make_family

    other = make_family(tmp_path / "other", vocab_size=151936)
    r = _recipe(tiny_family, tmp_path)
    r["models"]["short_cot"] = str(other["short_cot"])
    _assert_clean_failure(_build(_write(tmp_path, r)), tmp_path, "model.embed_tokens.weight", "151646", "151936")


def test_print_mergekit_round_trips(tiny_family, tmp_path):
    p = _write(tmp_path, _recipe(tiny_family, tmp_path, ratio=0.3))
    result = _build(p, "--print-mergekit")
    assert result.exit_code == 0, result.output
    cfg = yaml.safe_load(result.output)
    assert cfg["merge_method"] == "dare_ties"
    assert cfg["base_model"] == str(tiny_family["base"])
    weights = {m["model"]: m["parameters"]["weight"] for m in cfg["models"]}
    assert weights == {str(tiny_family["long_cot"]): 0.3, str(tiny_family["short_cot"]): pytest.approx(0.7)}
    assert all(m["parameters"]["density"] == 0.5 for m in cfg["models"])
    from mergekit.config import MergeConfiguration

    MergeConfiguration.model_validate(cfg)  # mergekit accepts what we print


def test_ratio_semantics_per_method(tiny_family, tmp_path):
    base = _recipe(tiny_family, tmp_path)
    slerp = Recipe.model_validate({**base, "merge": {"method": "slerp", "ratio": 0.25}}).to_mergekit()
    assert slerp["parameters"]["t"] == 0.25 and slerp["base_model"] == str(tiny_family["short_cot"])
    endpoint = Recipe.model_validate({**base, "merge": {"method": "ties", "ratio": 1.0}}).to_mergekit()
    assert [m["model"] for m in endpoint["models"]] == [str(tiny_family["long_cot"])]


def test_sweep_section_validated(tiny_family, tmp_path):
    r = _recipe(tiny_family, tmp_path)
    r["sweep"] = {"ratios": [0.2, 1.4]}
    _assert_clean_failure(_build(_write(tmp_path, r)), tmp_path, "sweep.ratios", "between 0 and 1")
    r["sweep"] = {"ratios": [0.5, 0.2, 0.5], "target_tokens": 300, "probe": {"questions": "gsm8k-train", "limit": 4}}
    assert parse_recipe(r).sweep.ratios == [0.2, 0.5]


def test_shipped_recipes_parse():
    root = Path(__file__).resolve().parents[1] / "micota_merge" / "recipes"
    recipes = [p for kind in ("merge", "pipeline") for p in (root / kind).glob("*.yaml")]
    assert recipes, "no recipes shipped"
    for p in recipes:
        data = yaml.safe_load(p.read_text())
        if "merge_method" in data or "stages" in data or "pipeline" in data:
            continue
        parse_recipe(data, str(p))


@pytest.fixture
def toy_method(monkeypatch):
    """A mergekit method not in the shipped table, added as one table entry (removed afterwards)."""
    from micota_merge.merge import methods

    monkeypatch.setattr(methods, "_TABLE", dict(methods._TABLE))
    return methods.register_method("multislerp", base=False, params={"normalize_weights"})


def test_a_new_method_is_one_table_entry(toy_method, tiny_family, tmp_path):
    """Adding a method = one entry in merge/methods.py: the recipe takes it (its parameters too),
    build prints and plans its mergekit config, and the sweep knows to build it point by point."""
    from micota_merge.merge.onepass.engine import supports_one_pass

    r = _recipe(tiny_family, tmp_path, method="multislerp", ratio=0.3, normalize_weights=True)
    del r["merge"]["density"]
    recipe = parse_recipe(r)
    assert recipe.model_specs().keys() == {"long_cot", "short_cot"}  # no base: it interpolates
    assert not supports_one_pass(recipe)
    p = _write(tmp_path, r)
    result = _build(p, "--print-mergekit")
    assert result.exit_code == 0, result.output
    cfg = yaml.safe_load(result.output)
    assert cfg["merge_method"] == "multislerp" and "base_model" not in cfg
    assert {m["model"]: m["parameters"] for m in cfg["models"]} == {
        str(tiny_family["long_cot"]): {"weight": 0.3},
        str(tiny_family["short_cot"]): {"weight": pytest.approx(0.7)},
    }
    assert cfg["parameters"] == {"normalize_weights": True}
    result = _build(p, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "merge_method: multislerp" in result.output and "GiB" in result.output
    assert not (tmp_path / "ta").exists()
    # only the entry's parameters pass through
    r["merge"]["gamma"] = 0.1
    with pytest.raises(UserError, match="unknown key 'gamma' for method multislerp"):
        parse_recipe(r)


def test_without_its_entry_the_method_is_unknown(tiny_family, tmp_path):
    r = _recipe(tiny_family, tmp_path, method="multislerp")
    with pytest.raises(UserError, match="unknown method 'multislerp'"):
        parse_recipe(r)
