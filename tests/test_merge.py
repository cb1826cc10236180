"""build: merged tensors equal the formula, match mergekit run directly, and outputs are atomic."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from micota_merge.cli import cli
from micota_merge.merge.recipe import METHODS

torch.set_num_threads(1)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _recipe(family, out: Path, **merge) -> dict:
    merge = {"method": "linear", "ratio": 0.5, "seed": 0, "dtype": "float32", **merge}
    return {"models": {k: str(v) for k, v in family.items()}, "merge": merge, "output": str(out)}


def _build(tmp_path, family, *extra, name="ta", **merge) -> Path:
    out = tmp_path / name
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(family, out, **merge)))
    result = CliRunner().invoke(cli, ["build", str(recipe), *extra])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_linear_equals_formula(tiny_family_f32, tmp_path, ratio):
    ta = _weights(_build(tmp_path, tiny_family_f32, method="linear", ratio=ratio))
    long_cot, short_cot = _weights(tiny_family_f32["long_cot"]), _weights(tiny_family_f32["short_cot"])
    assert set(ta) == set(long_cot)
    for name, t in ta.items():
        expected = ratio * long_cot[name] + (1 - ratio) * short_cot[name]
        torch.testing.assert_close(t, expected, rtol=1e-6, atol=1e-6, msg=name)


def test_task_arithmetic_equals_formula(tiny_family_f32, tmp_path):
    lam = 0.7
    ta = _weights(_build(tmp_path, tiny_family_f32, method="task_arithmetic", ratio=lam))
    base, lc, sc = (_weights(tiny_family_f32[r]) for r in ("base", "long_cot", "short_cot"))
    for name, t in ta.items():
        expected = base[name] + lam * (lc[name] - base[name]) + (1 - lam) * (sc[name] - base[name])
        torch.testing.assert_close(t, expected, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("ratio,endpoint", [(0.0, "short_cot"), (1.0, "long_cot")])
def test_linear_endpoints(tiny_family_f32, tmp_path, ratio, endpoint):
    ta = _weights(_build(tmp_path, tiny_family_f32, method="linear", ratio=ratio))
    ref = _weights(tiny_family_f32[endpoint])
    for name, t in ta.items():
        assert torch.equal(t, ref[name]), name


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_matches_mergekit_run_directly(tiny_family_f32, tmp_path, method):
    """Our build equals mergekit's own CLI on the config `--print-mergekit` prints."""
    ours = _build(tmp_path, tiny_family_f32, method=method, ratio=0.6, density=0.5, seed=3)
    recipe = tmp_path / "ta.yaml"
    printed = CliRunner().invoke(cli, ["build", str(recipe), "--print-mergekit"])
    assert printed.exit_code == 0
    mk_yaml = tmp_path / "mergekit.yaml"
    mk_yaml.write_text(printed.output)
    direct = tmp_path / "direct"
    mergekit_yaml = Path(sys.executable).parent / "mergekit-yaml"
    subprocess.run(
        [str(mergekit_yaml), str(mk_yaml), str(direct), "--random-seed", "3", "--lazy-unpickle", "--quiet"],
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    a, b = _weights(ours), _weights(direct)
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # and the merge really did something: neither endpoint
    lc = _weights(tiny_family_f32["long_cot"])
    assert any(not torch.equal(a[n], lc[n]) for n in a)


def test_dare_is_bit_for_bit_reproducible(tiny_family, tmp_path):
    first = _weights(_build(tmp_path, tiny_family, name="a", method="dare_ties", density=0.3, seed=7, dtype="bfloat16"))
    again = _weights(_build(tmp_path, tiny_family, name="b", method="dare_ties", density=0.3, seed=7, dtype="bfloat16"))
    other = _weights(_build(tmp_path, tiny_family, name="c", method="dare_ties", density=0.3, seed=8, dtype="bfloat16"))
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert any(not torch.equal(first[n], other[n]) for n in first), "a different seed should drop other entries"


@pytest.mark.parametrize("method", METHODS)
def test_every_method_builds_a_finite_ta(tiny_family, tmp_path, method):
    extra = {"density": 0.5} if method not in ("linear", "slerp", "task_arithmetic") else {}
    out = _build(tmp_path, tiny_family, method=method, ratio=0.4, dtype="bfloat16", **extra)
    w = _weights(out)
    assert w and all(torch.isfinite(t.float()).all() for t in w.values())
    manifest = json.loads((out / "micota.json").read_text())
    assert manifest["mergekit_config"]["merge_method"] == method


def test_ta_folder_is_complete_and_generates(tiny_family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = _build(tmp_path, tiny_family, method="dare_ties", density=0.5, dtype="bfloat16")
    manifest = json.loads((out / "micota.json").read_text())
    assert manifest["stage"] == "build"
    assert manifest["recipe"]["merge"]["method"] == "dare_ties"
    assert manifest["seed"] == 0
    assert set(manifest["inputs"]) == {"base", "long_cot", "short_cot"}
    for role, fp in manifest["inputs"].items():
        assert len(fp["config_sha256"]) == 64 and fp["weights_header_sha256"]
    assert {"torch", "mergekit", "transformers"} <= set(manifest["versions"])
    assert manifest["started"] <= manifest["finished"]
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "1+1?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    gen = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 4
    assert not [p for p in out.iterdir() if p.is_file() and not os.access(p, os.R_OK)]


def test_ta_keeps_the_chosen_sides_chat_template(tiny_family, tmp_path):
    """A differing chat template is warned about, and the TA keeps the recipe's `tokenizer` side's."""
    import shutil

    long_cot = tmp_path / "long_cot_r1"
    shutil.copytree(tiny_family["long_cot"], long_cot)
    cfg = json.loads((long_cot / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}<think>{{ m['content'] }}{% endfor %}"
    (long_cot / "tokenizer_config.json").write_text(json.dumps(cfg))
    fam = dict(tiny_family, long_cot=long_cot)
    recipe = _recipe(fam, tmp_path / "ta", method="linear")
    for side, marker in (("long_cot", "<think>"), ("short_cot", "<|im_start|>")):
        recipe["tokenizer"] = side
        p = tmp_path / f"{side}.yaml"
        p.write_text(yaml.safe_dump(recipe))
        result = CliRunner().invoke(cli, ["build", str(p), "--force"])
        assert result.exit_code == 0, result.output
        assert "different chat templates" in result.output and f"keeps {side}" in result.output
        kept = json.loads((tmp_path / "ta" / "tokenizer_config.json").read_text())["chat_template"]
        assert marker in kept


def test_behaviour_config_difference_warns_and_keeps_identity_config(tiny_family, tmp_path):
    from micota_merge.demo.family import make_family

    other = make_family(tmp_path / "rope", rope_theta=1e6)
    fam = dict(tiny_family, short_cot=other["short_cot"])
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({**_recipe(fam, tmp_path / "ta", method="linear"), "config_from": "short_cot"}))
    result = CliRunner().invoke(cli, ["build", str(p)])
    assert result.exit_code == 0, result.output
    assert "rope_theta" in result.output and "warning" in result.output
    from micota_merge.core.checkpoints import config_value

    assert config_value(json.loads((tmp_path / "ta" / "config.json").read_text()), "rope_theta") == 1e6


def test_existing_output_refused_without_force(tiny_family, tmp_path):
    out = _build(tmp_path, tiny_family)
    marker = out / "keep.txt"
    marker.write_text("user data")
    # the same recipe and inputs: already built, said so, exit 0, nothing touched
    result = CliRunner().invoke(cli, ["build", str(tmp_path / "ta.yaml")])
    assert result.exit_code == 0 and "already built" in result.output
    assert marker.read_text() == "user data"
    # --force replaces only what build wrote: a file the user put into the TA stops it, untouched
    result = CliRunner().invoke(cli, ["build", str(tmp_path / "ta.yaml"), "--force"])
    assert result.exit_code == 2 and "keep.txt" in result.output and "did not write" in result.output
    assert marker.read_text() == "user data"
    marker.unlink()
    before = (out / "micota.json").stat().st_ino
    result = CliRunner().invoke(cli, ["build", str(tmp_path / "ta.yaml"), "--force"])
    assert result.exit_code == 0 and (out / "micota.json").stat().st_ino != before  # written anew
    # another ratio is another TA: refused without --force
    result = CliRunner().invoke(cli, ["build", str(tmp_path / "ta.yaml"), "--ratio", "0.25"])
    assert result.exit_code == 2 and "--force" in result.output


def test_dry_run_reads_no_weights_and_writes_nothing(tiny_family, tmp_path, monkeypatch):
    import safetensors.torch

    def forbidden(*a, **k):
        raise AssertionError("a weight was read during --dry-run")

    monkeypatch.setattr(safetensors.torch, "load_file", forbidden)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(tiny_family, tmp_path / "ta", method="dare_ties", density=0.5)))
    result = CliRunner().invoke(cli, ["build", str(recipe), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "merge_method: dare_ties" in result.output and "GiB" in result.output
    assert not (tmp_path / "ta").exists()


def test_not_enough_disk(tiny_family, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6, 1000))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(tiny_family, tmp_path / "ta")))
    result = CliRunner().invoke(cli, ["build", str(recipe)])
    assert result.exit_code == 2 and "not enough disk space" in result.output
    assert not (tmp_path / "ta").exists()


def test_nan_in_merge_fails_and_writes_nothing(tiny_family_f32, tmp_path):
    import shutil

    bad = tmp_path / "bad_long"
    shutil.copytree(tiny_family_f32["long_cot"], bad)
    w = load_file(bad / "model.safetensors")
    w["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(w, bad / "model.safetensors", metadata={"format": "pt"})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(dict(tiny_family_f32, long_cot=bad), tmp_path / "ta")))
    result = CliRunner().invoke(cli, ["build", str(recipe)])
    assert result.exit_code == 1
    assert "model.layers.0.mlp.up_proj.weight" in result.output and "NaN" in result.output
    assert not (tmp_path / "ta").exists() and not list(tmp_path.glob(".ta.*"))


def test_plain_mergekit_yaml_is_a_recipe(tiny_family_f32, tmp_path):
    cfg = {
        "merge_method": "linear",
        "dtype": "float32",
        "models": [
            {"model": str(tiny_family_f32["long_cot"]), "parameters": {"weight": 0.25}},
            {"model": str(tiny_family_f32["short_cot"]), "parameters": {"weight": 0.75}},
        ],
    }
    p = tmp_path / "mk.yaml"
    p.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(cli, ["build", str(p)])
    assert result.exit_code == 2 and "--output" in result.output
    result = CliRunner().invoke(cli, ["build", str(p), "--output", str(tmp_path / "ta")])
    assert result.exit_code == 0, result.output
    ta = _weights(tmp_path / "ta")
    lc, sc = _weights(tiny_family_f32["long_cot"]), _weights(tiny_family_f32["short_cot"])
    n = "model.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(ta[n], 0.25 * lc[n] + 0.75 * sc[n])


def test_killed_build_leaves_nothing_and_next_run_succeeds(tiny_family, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(_recipe(tiny_family, tmp_path / "ta", method="dare_ties", density=0.5, dtype="float32"))
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "micota_merge.cli", "build", str(recipe)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".ta.partial-*")):
        time.sleep(0.005)
    assert list(tmp_path.glob(".ta.partial-*")), "the build never started staging"
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "ta").exists()
    result = CliRunner().invoke(cli, ["build", str(recipe)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ta" / "micota.json").is_file()
    assert not list(tmp_path.glob(".ta.partial-*")), "stale staging folder from the killed run was not cleaned"
