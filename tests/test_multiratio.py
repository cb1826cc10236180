"""The sweep's one-pass merge writes exactly what separate builds write."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from micota_merge.cli import cli
from micota_merge.merge.onepass.engine import build_points, supports_one_pass
from micota_merge.merge.recipe import parse_recipe

RATIOS = [0.0, 0.3, 0.5, 1.0]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize(
    "method,dtype", [("linear", "bfloat16"), ("task_arithmetic", "bfloat16"), ("task_arithmetic", "float32")]
)
def test_one_pass_equals_separate_builds(tiny_family, tmp_path, method, dtype):
    data = {
        "models": {k: str(v) for k, v in tiny_family.items()},
        "merge": {"method": method, "ratio": 0.5, "dtype": dtype},
        "output": str(tmp_path / "ta"),
    }
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(yaml.safe_dump(data))
    recipe = parse_recipe(data)
    assert supports_one_pass(recipe)
    d = recipe.merge.density
    done = build_points(recipe_path, recipe, {(r, d): tmp_path / f"one-{r}" for r in RATIOS}, echo=lambda *_: None)
    outs = {p[0]: out for p, out in done.items()}
    for r in RATIOS:
        separate = tmp_path / f"sep-{r}"
        result = CliRunner().invoke(cli, ["build", str(recipe_path), "--ratio", str(r), "--output", str(separate)])
        assert result.exit_code == 0, result.output
        a, b = _weights(outs[r]), _weights(separate)
        assert set(a) == set(b)
        for name in a:
            assert a[name].dtype == b[name].dtype
            assert torch.equal(a[name], b[name]), (r, name)
        cfg_a = json.loads((outs[r] / "config.json").read_text())
        cfg_b = json.loads((separate / "config.json").read_text())
        assert cfg_a == cfg_b
        manifest = json.loads((outs[r] / "micota.json").read_text())
        assert manifest["recipe"]["merge"]["ratio"] == r and manifest["one_pass"] is True
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(outs[r])  # loads as a normal checkpoint


def test_slerp_is_refused(tiny_family):  # no fixed combination, no task vectors
    data = {"models": {k: str(v) for k, v in tiny_family.items()}, "merge": {"method": "slerp"}, "output": "x"}
    assert not supports_one_pass(parse_recipe(data))


@pytest.fixture(scope="module")
def small_vocab_families(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """The tiny family with a 1024-token vocabulary, so that sorting the embedding's deltas (TIES,
    breadcrumbs, DELLA) takes milliseconds: the merge code paths are those of any size."""
    from micota_merge.demo.family import make_family

    root = tmp_path_factory.mktemp("small_vocab")
    return {
        dtype: make_family(
            root / dtype, seed=3, dtype=dtype, vocab_size=1024, bos_token_id=0, eos_token_id=1, pad_token_id=0
        )
        for dtype in ("bfloat16", "float32")
    }


# (ratio, density) points: both endpoints (a side left out of mergekit's config, so a random
# stream of its own), an interior ratio at two densities, all from one read.
POINTS = [(0.0, 0.5), (0.3, 0.5), (1.0, 0.5), (0.3, 0.8)]


def _separate_build(recipe_path: Path, data: dict, point, out: Path) -> Path:
    point_data = json.loads(json.dumps(data))
    point_data["merge"].update(ratio=point[0], density=point[1])
    p = recipe_path.with_name(f"point-{point[0]}-{point[1]}.yaml")
    p.write_text(yaml.safe_dump(point_data))
    result = CliRunner().invoke(cli, ["build", str(p), "--output", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize(
    "method,dtype,extra",
    [
        ("ties", "bfloat16", {}),
        ("dare_ties", "bfloat16", {}),
        ("dare_linear", "bfloat16", {}),
        ("breadcrumbs", "bfloat16", {}),
        ("breadcrumbs_ties", "bfloat16", {}),
        ("della", "bfloat16", {}),
        ("della_linear", "bfloat16", {}),
        ("dare_ties", "float32", {"rescale": False, "int8_mask": True, "lambda": 0.9}),
        ("della", "float32", {"epsilon": 0.1, "normalize": False}),
        ("breadcrumbs_ties", "float32", {"gamma": 0.05}),
        ("task_arithmetic", "bfloat16", {"lambda": 0.8}),
    ],
)
def test_task_vector_family_one_pass_equals_separate_builds(
    small_vocab_families, tmp_path, monkeypatch, method, dtype, extra
):
    """Every ratio x density point of one read is bit-for-bit what `build` writes at that point."""
    import safetensors

    family = small_vocab_families[dtype]
    data = {
        "models": {k: str(v) for k, v in family.items()},
        "merge": {"method": method, "ratio": 0.5, "density": 0.5, "dtype": dtype, "seed": 7, **extra},
        "output": str(tmp_path / "ta"),
    }
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(yaml.safe_dump(data))
    recipe = parse_recipe(data)
    assert supports_one_pass(recipe)
    points = POINTS if method != "task_arithmetic" else [p for p in POINTS if p[1] == 0.5]  # no density to sweep

    reads = []
    real_open = safetensors.safe_open

    class CountingOpen:  # every tensor the one pass reads, by file and name
        def __init__(self, f, *a, **kw):
            self.f, self.h = str(f), real_open(f, *a, **kw)

        def __enter__(self):
            self.h.__enter__()
            return self

        def __exit__(self, *exc):
            return self.h.__exit__(*exc)

        def keys(self):
            return self.h.keys()

        def get_tensor(self, name):
            reads.append((self.f, name))
            return self.h.get_tensor(name)

    monkeypatch.setattr(safetensors, "safe_open", CountingOpen)
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    outs = build_points(recipe_path, recipe, {p: tmp_path / f"one-{p[0]}-{p[1]}" for p in points}, echo=lambda *_: None)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's generator is left alone
    monkeypatch.setattr(safetensors, "safe_open", real_open)
    n_tensors = len(_weights(family["base"]))
    assert len(reads) == len(set(reads)) == 3 * n_tensors  # each input tensor read once, for all points

    for p in points:
        separate = _separate_build(recipe_path, data, p, tmp_path / f"sep-{p[0]}-{p[1]}")
        a, b = _weights(outs[p]), _weights(separate)
        assert set(a) == set(b)
        for name in a:
            assert a[name].dtype == b[name].dtype
            assert torch.equal(a[name], b[name]), (p, name)
        manifest = json.loads((outs[p] / "micota.json").read_text())
        assert (manifest["recipe"]["merge"]["ratio"], manifest["recipe"]["merge"]["density"]) == p
        assert manifest["one_pass"] is True
    # the points differ: the ratio and the density both reach the weights
    w = {p: _weights(outs[p]) for p in points}
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(w[(0.0, 0.5)][name], w[(0.3, 0.5)][name])
    if method != "task_arithmetic":
        assert not torch.equal(w[(0.3, 0.5)][name], w[(0.3, 0.8)][name])


def test_one_pass_refuses_non_finite_merges_without_writing(tiny_family_f32, tmp_path):
    from safetensors.torch import save_file

    from micota_merge.core.errors import StageFailed

    bad = tmp_path / "long_cot_nan"
    shutil.copytree(tiny_family_f32["long_cot"], bad)
    weights = _weights(bad)
    weights["model.norm.weight"][0] = float("inf")
    save_file(weights, str(bad / "model.safetensors"), metadata={"format": "pt"})
    data = {
        "models": {**{k: str(v) for k, v in tiny_family_f32.items()}, "long_cot": str(bad)},
        "merge": {"method": "dare_ties", "density": 0.5, "dtype": "float32"},
        "output": str(tmp_path / "ta"),
    }
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(yaml.safe_dump(data))
    outs = {(r, 0.5): tmp_path / f"one-{r}" for r in (0.0, 0.5)}
    with pytest.raises(StageFailed, match="model.norm.weight at ratio 0.5, density 0.5 has NaN/Inf"):
        build_points(recipe_path, parse_recipe(data), outs, echo=lambda *_: None)
    assert not any(p.exists() for p in outs.values())
    assert not list(tmp_path.glob(".one-*"))  # no staging folder left behind


def test_all_finite_catches_every_non_finite_and_survives_overflowing_sums():
    from micota_merge.merge.onepass.engine import all_finite

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        t = torch.randn(64, 33).to(dtype)
        assert all_finite(t)
        for bad in (float("nan"), float("inf"), float("-inf")):
            u = t.clone()
            u[5, 7] = bad
            assert not all_finite(u), (dtype, bad)
        big = torch.full((8,), torch.finfo(dtype).max, dtype=dtype)  # finite, but the sum overflows
        assert not torch.isfinite(big.sum()) and all_finite(big)


def test_task_vector_one_pass_steps_aside_when_builds_would_run_on_a_gpu(tiny_family, tmp_path, monkeypatch):
    from micota_merge.merge.onepass.replay import Unsupported

    data = {
        "models": {k: str(v) for k, v in tiny_family.items()},
        "merge": {"method": "dare_ties", "density": 0.5},
        "output": str(tmp_path / "ta"),
    }
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(yaml.safe_dump(data))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(Unsupported, match="GPU"):
        build_points(recipe_path, parse_recipe(data), {(0.5, 0.5): tmp_path / "one"}, echo=lambda *_: None)
    assert not (tmp_path / "one").exists()


def test_an_unverified_mergekit_builds_point_by_point(tiny_family, tmp_path, monkeypatch):
    """The replay of mergekit's internals is trusted only on the releases it was checked against;
    on another the sweep's points are built by mergekit itself, with a note, and equal the same."""
    from importlib import metadata

    import yaml

    from micota_merge.merge.onepass import replay
    from micota_merge.merge.onepass.engine import build_points
    from micota_merge.merge.recipe import load_recipe

    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(
        yaml.safe_dump(
            {
                "models": {r: str(p) for r, p in tiny_family.items()},
                "output": str(tmp_path / "ta"),
                "merge": {"method": "dare_ties", "ratio": 0.5, "density": 0.5, "dtype": "float32"},
            }
        )
    )
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "9.9.9" if name == "mergekit" else real(name))
    with pytest.raises(replay.Unsupported, match="mergekit 9.9.9 is not a release"):
        build_points(recipe_path, load_recipe(recipe_path), {(0.5, 0.5): tmp_path / "p"})
    assert not (tmp_path / "p").exists()
    monkeypatch.setattr(metadata, "version", real)
    replay.check_mergekit_version()  # the installed one is verified (CI runs the equality tests on it)
