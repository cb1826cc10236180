"""AIM (merge.aim): the base's channel importances by hand, the relaxed tensors by the formula, one pass
equal to builds, the importances computed once and cached by content, bad calibration refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from micota_merge.cli import cli
from micota_merge.merge import aim
from micota_merge.merge.recipe import parse_recipe

TEXTS = [
    "Lily has 14 coins. She loses 5. How many coins does she have now?",
    "A train travels 60 km in 1.5 hours; its mean speed is 40 km/h.",
    "The answer is \\boxed{9}.",
]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MICOTA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "aim"


def _recipe(family, tmp_path, omega=0.4, method="ties", **calibration) -> tuple[Path, dict]:
    data = {
        "models": {k: str(v) for k, v in family.items()},
        "merge": {"method": method, "ratio": 0.6, "density": 0.5, "dtype": "float32"},
        "output": str(tmp_path / "ta"),
    }
    if omega is not None:
        data["merge"]["aim"] = {"omega": omega, "calibration": {"size": 8, "block_size": 32, **calibration}}
    path = tmp_path / f"r-{omega}-{method}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, data


def test_importance_equals_a_hand_computation(tiny_family_f32):
    """Layer 0's attention projections read RMSNorm(embeddings); its input norm reads the embeddings:
    per channel, the sum over blocks of the mean |input| over the block's tokens, over its maximum."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tiny_family_f32["base"]
    imp, stats = aim.channel_importance(base, base, TEXTS, block_size=16)
    tok = AutoTokenizer.from_pretrained(str(base))
    chunks = aim.blocks(tok, TEXTS, 16)
    assert stats["blocks"] == len(chunks) > 1 and all(len(c) == 16 for c in chunks)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    emb_w = model.model.embed_tokens.weight.detach()
    ln = model.model.layers[0].input_layernorm
    eps = model.config.rms_norm_eps
    raw, normed = 0, 0
    for ids in chunks:
        e = emb_w[torch.tensor(ids)].double()
        h = e * torch.rsqrt(e.pow(2).mean(-1, keepdim=True) + eps) * ln.weight.detach().double()
        raw = raw + e.abs().mean(0)
        normed = normed + h.abs().mean(0)
    for name, want in (
        ("model.layers.0.input_layernorm.weight", raw / raw.max()),
        ("model.layers.0.self_attn.q_proj.weight", normed / normed.max()),
        ("model.layers.0.self_attn.v_proj.weight", normed / normed.max()),
    ):
        assert torch.allclose(imp[name].double(), want, atol=1e-5), name
    assert "model.embed_tokens.weight" not in imp  # the authors leave the embeddings as merged
    assert all(float(v.max()) == pytest.approx(1.0) for v in imp.values())
    # every linear of every layer is covered, at its input width
    assert {n for n in imp if n.startswith("model.layers.1.")} >= {
        f"model.layers.1.{m}.weight"
        for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj", "post_attention_layernorm")
    }
    assert imp["model.layers.1.mlp.down_proj.weight"].numel() == model.config.intermediate_size


def test_aim_build_is_the_formula_over_the_merge(tiny_family_f32, tmp_path, cache):
    plain_path, _ = _recipe(tiny_family_f32, tmp_path, omega=None)
    aim_path, _ = _recipe(tiny_family_f32, tmp_path, omega=0.4)
    runner = CliRunner()
    r = runner.invoke(cli, ["build", str(plain_path), "-o", str(tmp_path / "plain")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["build", str(aim_path), "-o", str(tmp_path / "aim")])
    assert r.exit_code == 0, r.output
    merged, relaxed, base = _weights(tmp_path / "plain"), _weights(tmp_path / "aim"), _weights(tiny_family_f32["base"])
    imp = load_file(tmp_path / "aim" / "aim" / "channel_importance.safetensors")
    # the stored importances are the base's on the recipe's calibration texts
    plan = aim.plan(parse_recipe(yaml.safe_load(aim_path.read_text())), dict(tiny_family_f32), tmp_path)
    again, _ = aim.channel_importance(plan.base, plan.tokenizer, plan.texts, plan.block_size)
    assert set(imp) == set(again) and all(torch.equal(imp[n], again[n]) for n in imp)
    assert set(relaxed) == set(merged)
    changed = 0
    for name, m in merged.items():
        if name in imp:
            factor = 1 - imp[name].double() * (1 - 0.4)
            want = base[name].double() + (m.double() - base[name].double()) * factor
            assert torch.allclose(relaxed[name].double(), want, atol=1e-6), name
            changed += not torch.equal(relaxed[name], m)
        else:
            assert torch.equal(relaxed[name], m), name  # embeddings: as merged
    assert changed > 10
    manifest = json.loads((tmp_path / "aim" / "micota.json").read_text())
    entry = manifest["aim"]
    assert entry["omega"] == 0.4 and entry["texts"] == 8 and entry["block_size"] == 32
    assert entry["importance"]["tensors"] == len(imp) and entry["from_cache"] is False
    card = (tmp_path / "aim" / "README.md").read_text()
    assert (
        "then AIM (arXiv 2502.02421), omega 0.4" in card
        and "then AIM" not in (tmp_path / "plain" / "README.md").read_text()
    )
    # the TA loads and vLLM's *.safetensors glob sees only its weights: the importances sit in a subfolder
    assert sorted(p.name for p in (tmp_path / "aim").glob("*.safetensors")) == sorted(
        p.name for p in (tmp_path / "plain").glob("*.safetensors")
    )


def test_omega_one_is_the_plain_merge(tiny_family_f32, tmp_path, cache):
    plain_path, _ = _recipe(tiny_family_f32, tmp_path, omega=None)
    one_path, _ = _recipe(tiny_family_f32, tmp_path, omega=1.0)
    for path, out in ((plain_path, "plain"), (one_path, "one")):
        r = CliRunner().invoke(cli, ["build", str(path), "-o", str(tmp_path / out)])
        assert r.exit_code == 0, r.output
    a, b = _weights(tmp_path / "plain"), _weights(tmp_path / "one")
    assert all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)


def test_one_pass_equals_builds_and_computes_the_importances_once(tiny_family_f32, tmp_path, cache, monkeypatch):
    from micota_merge.merge.onepass.engine import build_points

    path, data = _recipe(tiny_family_f32, tmp_path, omega=0.4)
    recipe = parse_recipe(data)
    calls = []
    real = aim.channel_importance
    monkeypatch.setattr(aim, "channel_importance", lambda *a, **k: calls.append(1) or real(*a, **k))
    points = {(r, 0.5): tmp_path / f"one-{r}" for r in (0.3, 0.7)}
    build_points(path, recipe, points, echo=lambda *_: None)
    assert len(calls) == 1
    for (r, _), folder in points.items():
        out = tmp_path / f"sep-{r}"
        res = CliRunner().invoke(cli, ["build", str(path), "--ratio", str(r), "-o", str(out)])
        assert res.exit_code == 0, res.output
        a, b = _weights(folder), _weights(out)
        assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a), r
        ma, mb = (json.loads((f / "micota.json").read_text())["aim"] for f in (folder, out))
        assert ma["importance"]["sha256"] == mb["importance"]["sha256"] and mb["from_cache"] is True
    assert len(calls) == 1  # the separate builds read the cache: same base, tokenizer and texts
    assert len(list(cache.glob("*.safetensors"))) == 1


def test_other_calibration_texts_are_another_ta(tiny_family_f32, tmp_path, cache):
    path, data = _recipe(tiny_family_f32, tmp_path, omega=0.4)
    r = CliRunner().invoke(cli, ["build", str(path), "-o", str(tmp_path / "ta")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["build", str(path), "-o", str(tmp_path / "ta")])
    assert r.exit_code == 0 and "already built" in r.output
    data["merge"]["aim"]["calibration"]["seed"] = 1  # another draw of texts, every other setting equal
    path.write_text(yaml.safe_dump(data))
    r = CliRunner().invoke(cli, ["build", str(path), "-o", str(tmp_path / "ta")])
    assert r.exit_code == 2 and "another recipe or other inputs" in r.output


def test_calibration_on_a_generate_output(tiny_family_f32, tmp_path, cache):
    records = tmp_path / "records.jsonl"
    rows = [{"id": str(i), "prompt": f"Q{i}: 2+{i}?", "completion": f" The answer is {2 + i}."} for i in range(5)]
    records.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, data = _recipe(tiny_family_f32, tmp_path, omega=0.4, records=str(records), size=3)
    plan = aim.plan(parse_recipe(data), dict(tiny_family_f32), tmp_path)
    assert len(plan.texts) == 3 and all(t in [r["prompt"] + r["completion"] for r in rows] for t in plan.texts)
    records.write_text('{"id": "1", "question": "no completion"}\n')
    path, _ = _recipe(tiny_family_f32, tmp_path, omega=0.4, records=str(records))
    r = CliRunner().invoke(cli, ["build", str(path), "--dry-run"])
    assert r.exit_code == 2 and "merge.aim.calibration.records" in r.output and "line 1" in r.output
    assert "Traceback" not in r.output


def test_aim_needs_a_base_and_prints_with_its_mergekit_config(tiny_family_f32, tmp_path):
    path, data = _recipe(tiny_family_f32, tmp_path, omega=0.4, method="linear")
    del data["merge"]["density"]
    path.write_text(yaml.safe_dump(data))
    r = CliRunner().invoke(cli, ["build", str(path), "--dry-run"])
    assert r.exit_code == 2 and "merge.aim" in r.output and "no base" in r.output
    path, _ = _recipe(tiny_family_f32, tmp_path, omega=0.4)
    r = CliRunner().invoke(cli, ["build", str(path), "--print-mergekit"])
    assert r.exit_code == 0, r.output
    cfg = yaml.safe_load(r.output)  # the AIM note is a YAML comment: mergekit reads the rest as before
    assert cfg["merge_method"] == "ties" and "then AIM" in r.output
    r = CliRunner().invoke(cli, ["build", str(path), "--dry-run"])
    assert r.exit_code == 0 and "aim: omega 0.4" in r.output


def test_a_sweep_relaxes_every_point_and_rebuilds_them_for_other_calibration_texts(tmp_path, cache):
    """On the micro world: every swept TA carries the relaxation, computed once; an edited calibration
    file (same path, same settings) is other texts, so the points are rebuilt, never reused."""
    from conftest import WORLD as world
    from conftest import world_sweep_recipe

    from micota_merge.merge.sweep import run as sweep_run

    rows = [json.loads(x) for x in (world / "train.jsonl").read_text().splitlines()[:12]]
    records = tmp_path / "calibration.jsonl"
    records.write_text("".join(json.dumps({"prompt": r["question"], "completion": r["answer"]}) + "\n" for r in rows))
    aim_settings = {"omega": 0.4, "calibration": {"records": str(records), "size": 8}}
    path = world_sweep_recipe(tmp_path, limit=8, merge={"aim": aim_settings}, ratios=[0.65, 0.7])

    def swept() -> dict[float, dict]:
        sweep_run.sweep(sweep_run.SweepOptions(recipe=str(path), keep_all=True, force=True), echo=lambda m: None)
        folders = {0.65: tmp_path / "ta.sweep" / "ratio-0.65", 0.7: tmp_path / "ta.sweep" / "ratio-0.7"}
        return {r: json.loads((f / "micota.json").read_text()) for r, f in folders.items() if f.is_dir()}

    first = swept()
    assert first and all(m["aim"]["omega"] == 0.4 and m["one_pass"] for m in first.values())
    assert len(list(cache.glob("*.safetensors"))) == 1
    records.write_text(records.read_text().replace('"completion": "', '"completion": "The answer is '))
    second = swept()
    assert len(list(cache.glob("*.safetensors"))) == 2
    for r in second:
        assert second[r]["aim"]["texts_digest"] != first[r]["aim"]["texts_digest"]
        assert second[r]["finished"] != first[r]["finished"]  # built again


@pytest.mark.slow  # two TIES merges of a 135M model and a calibration pass over it
def test_aim_on_a_real_pretrained_model(smollm2_dir, tmp_path, cache):
    """SmolLM2-135M-Instruct (Llama, tied embeddings) as the base, two fine-tunes of it: the hooks find
    every linear and norm of the real architecture, the relaxed tensors equal the formula, and the TA
    loads in transformers and answers."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_w = _weights(smollm2_dir)
    family = {"base": smollm2_dir}
    for i, role in enumerate(("long_cot", "short_cot")):
        folder = tmp_path / role
        folder.mkdir()
        gen = torch.Generator().manual_seed(i)
        state = {
            n: (w.float() + 0.02 * w.float().std() * torch.randn(w.shape, generator=gen)).to(torch.bfloat16)
            for n, w in base_w.items()
        }
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        for f in smollm2_dir.iterdir():
            if f.suffix in (".json", ".jinja", ".txt") and f.is_file():
                (folder / f.name).write_bytes(f.read_bytes())
        family[role] = folder
    data = {
        "models": {k: str(v) for k, v in family.items()},
        "merge": {"method": "ties", "ratio": 0.5, "density": 0.2, "lambda": 1.0, "dtype": "bfloat16"},
        "output": str(tmp_path / "ta"),
    }
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(data))
    data["merge"]["aim"] = {"omega": 0.4, "calibration": {"size": 8, "block_size": 128}}
    relaxed_recipe = tmp_path / "aim.yaml"
    relaxed_recipe.write_text(yaml.safe_dump(data))
    for path, out in ((plain, "plain"), (relaxed_recipe, "aim")):
        r = CliRunner().invoke(cli, ["build", str(path), "-o", str(tmp_path / out)])
        assert r.exit_code == 0, r.output
    imp = load_file(tmp_path / "aim" / "aim" / "channel_importance.safetensors")
    layers = AutoModelForCausalLM.from_pretrained(str(smollm2_dir)).config.num_hidden_layers
    per_layer = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    want = {f"model.layers.{i}.self_attn.{m}.weight" for i in range(layers) for m in per_layer[:4]}
    want |= {f"model.layers.{i}.mlp.{m}.weight" for i in range(layers) for m in per_layer[4:]}
    want |= {
        f"model.layers.{i}.{n}.weight" for i in range(layers) for n in ("input_layernorm", "post_attention_layernorm")
    }
    assert set(imp) == want | {"model.norm.weight"}  # tied head: no lm_head.weight to relax
    merged, relaxed = _weights(tmp_path / "plain"), _weights(tmp_path / "aim")
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.5.mlp.down_proj.weight", "model.norm.weight"):
        b, m = base_w[name].to(torch.bfloat16).float(), merged[name].float()
        expect = (b + (m - b) * (1 - imp[name] * 0.6)).to(torch.bfloat16)
        assert torch.equal(relaxed[name], expect), name
    assert torch.equal(relaxed["model.embed_tokens.weight"], merged["model.embed_tokens.weight"])
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "aim"))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "aim"))
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(text, add_special_tokens=False)["input_ids"]
    out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    assert out.shape[1] > len(ids)
