"""MiCoTA's chain: a teacher's long CoT fine-tunes the TA's own parent into the long-CoT side, which the
TA then merges with that parent, all from one pipeline file; and merges over one side itself."""

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
from micota_merge.core.errors import UserError
from micota_merge.merge.recipe import load_recipe, parse_recipe

REPO = Path(__file__).resolve().parents[1]
WORLD = REPO / "micota_merge" / "assets" / "microworld"
CHAIN = REPO / "micota_merge" / "recipes" / "pipeline" / "demo-chain.yaml"

pytestmark = pytest.mark.usefixtures("one_thread")


def _invoke(*args) -> tuple[int, str]:
    r = CliRunner().invoke(cli, [str(a) for a in args])
    return r.exit_code, r.output


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


# ---------------------------------------------------------------- the recipe


def _pipeline(**chain) -> dict:
    return {"workdir": "w", "student": "s", "chain": {"teacher": "t", **chain}}


def test_long_cot_is_named_or_made_never_both_nor_neither():
    with pytest.raises(UserError, match="models.long_cot: required field is missing .*pipeline.chain"):
        parse_recipe({"models": {"short_cot": "s", "base": "b"}, "output": "o"})
    with pytest.raises(UserError, match="models.long_cot: pipeline.chain makes the long-CoT side"):
        parse_recipe(
            {"models": {"long_cot": "l", "short_cot": "s", "base": "b"}, "output": "o", "pipeline": _pipeline()}
        )
    with pytest.raises(UserError, match="pipeline.chain: distill.student is set by the pipeline"):
        parse_recipe(
            {"models": {"short_cot": "s", "base": "b"}, "output": "o", "pipeline": _pipeline(distill={"student": "x"})}
        )
    with pytest.raises(UserError, match="baseline teacher: the teacher's data comes from pipeline.chain"):
        parse_recipe(
            {
                "models": {"long_cot": "l", "short_cot": "s", "base": "b"},
                "output": "o",
                "pipeline": {"workdir": "w", "student": "s", "baselines": ["teacher"]},
            }
        )
    made = parse_recipe({"models": {"short_cot": "s", "base": "short_cot"}, "output": "o", "pipeline": _pipeline()})
    assert made.made_long_cot and made.model_specs(made=True) == {"short_cot": "s", "base": "s"}
    with pytest.raises(UserError, match="made by pipeline.chain: `micota-merge run RECIPE` makes it"):
        made.model_specs()
    assert made.with_long_cot("/x/lc").model_specs()["long_cot"] == "/x/lc"


def test_build_and_sweep_alone_refuse_a_recipe_whose_long_cot_is_made(tmp_path):
    for command in ("build", "sweep"):
        code, out = _invoke(command, CHAIN)
        assert code == 2 and "models.long_cot is made by pipeline.chain" in out, out
        assert "Traceback" not in out


def test_mergekit_config_over_the_parent_leaves_the_parent_out():
    r = parse_recipe(
        {"models": {"long_cot": "l", "short_cot": "s", "base": "short_cot"}, "merge": {"ratio": 0.3}, "output": "o"}
    )
    mk = r.to_mergekit()
    assert mk["base_model"] == "s" and [m["model"] for m in mk["models"]] == ["l"]
    assert mk["models"][0]["parameters"]["weight"] == 0.3
    r.merge.ratio = 0.0  # the parent alone: mergekit needs one model, the base itself
    assert [m["model"] for m in r.to_mergekit()["models"]] == ["s"]


# ---------------------------------------------------------------- a zero task vector


def _recipe(tmp_path: Path, family: dict, method: str, base: str, **merge) -> Path:
    data = {
        "models": {"long_cot": str(family["long_cot"]), "short_cot": str(family["short_cot"]), "base": base},
        "merge": {"method": method, "ratio": 0.3, "dtype": "float32", **merge},
        "output": str(tmp_path / f"ta-{method}"),
    }
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    "method,merge,cancels",
    [
        ("task_arithmetic", {}, False),
        ("dare_ties", {"density": 1.0}, False),  # mergekit's dare_ties does not normalize by default
        ("ties", {"density": 1.0}, True),  # ties does: the ratio cancels
        ("dare_ties", {"density": 1.0, "normalize": True}, True),
    ],
)
def test_merge_over_the_parent_equals_the_formula_the_preflight_states(
    tmp_path, tiny_family_f32, method, merge, cancels
):
    """TA = short_cot + ratio x (long_cot - short_cot), or long_cot itself where normalize cancels the ratio;
    density 1 keeps every entry, so DARE's drop leaves the formula exact."""
    recipe = _recipe(tmp_path, tiny_family_f32, method, "short_cot", **merge)
    code, out = _invoke("build", recipe)
    assert code == 0, out
    assert "zero task vector: short_cot has the base's content" in out
    assert ("the ratio cancels" in out) == cancels
    ta = _weights(tmp_path / f"ta-{method}")
    short, long = _weights(tiny_family_f32["short_cot"]), _weights(tiny_family_f32["long_cot"])
    for name in ta:
        expected = long[name] if cancels else short[name] + 0.3 * (long[name] - short[name])
        torch.testing.assert_close(ta[name], expected, rtol=0, atol=1e-6)
    assert not torch.equal(ta[name], short[name])


def test_a_copy_of_the_parent_is_a_zero_task_vector_too(tmp_path, tiny_family_f32):
    """Same content decides, not the path: a copy of short_cot as base is the same merge."""
    copy = tmp_path / "parent-copy"
    shutil.copytree(tiny_family_f32["short_cot"], copy)
    recipe = _recipe(tmp_path, tiny_family_f32, "ties", str(copy), density=1.0)
    code, out = _invoke("build", recipe, "--dry-run")
    assert code == 0 and "zero task vector: short_cot has the base's content" in out and "ratio cancels" in out


def test_a_sweep_whose_ratio_cancels_is_refused_before_anything_runs(tmp_path, tiny_family_f32):
    recipe = _recipe(tmp_path, tiny_family_f32, "ties", "short_cot", density=1.0)
    data = yaml.safe_load(recipe.read_text())
    data["sweep"] = {"ratios": [0.3, 0.7], "probe": {"questions": str(WORLD / "train.jsonl"), "limit": 4}}
    recipe.write_text(yaml.safe_dump(data))
    code, out = _invoke("sweep", recipe)
    assert code == 2 and "sweep.ratios: zero task vector" in out and "Set merge.normalize: false" in out, out
    assert not (tmp_path / "ta-ties").exists() and not (tmp_path / "ta-ties.sweep").exists()
    del data["sweep"]["ratios"]  # the adaptive search (the default without ratios) has nothing to search for
    recipe.write_text(yaml.safe_dump(data))
    code, out = _invoke("sweep", recipe)
    assert code == 2 and "there is no length to search for" in out and "Set merge.normalize: false" in out, out
    assert not (tmp_path / "ta-ties.sweep").exists()


# ---------------------------------------------------------------- the chain on the micro world


def _small_chain(tmp_path: Path) -> Path:
    """demo-chain.yaml, shrunk: every stage of the chain runs for real."""
    data = yaml.safe_load(CHAIN.read_text())
    data["models"]["short_cot"] = str(WORLD / "short_cot")
    data["output"] = str(tmp_path / "w" / "ta")
    data["sweep"]["ratios"] = [0.3, 0.9]
    data["sweep"]["probe"].update(limit=8, questions=str(WORLD / "train.jsonl"))
    p = data["pipeline"]
    p["chain"]["teacher"] = str(WORLD / "long_cot")
    p.update(
        workdir=str(tmp_path / "w"),
        student=str(WORLD / "student"),
        questions=str(WORLD / "train.jsonl"),
        question_limit=24,
        baselines=["teacher"],
        distill_seeds=[0],
    )
    p["chain"].update(question_limit=192, distill={"epochs": 3})
    p["distill"].update(epochs=1)
    p["eval"].update(limit=8)
    pipeline = tmp_path / "chain.yaml"
    pipeline.write_text(yaml.safe_dump(data))
    return pipeline


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_the_chain_runs_from_one_pipeline_file(tmp_path):
    pipeline = _small_chain(tmp_path)
    w = tmp_path / "w"
    code, plan = _invoke("run", pipeline, "--dry-run")
    assert code == 0, plan
    for stage in (
        "chain: teacher's long-CoT data",
        "chain: long_cot = short_cot fine-tuned on the teacher's data",
        "build: teacher assistant (sweep)",
        "generate: ta data",
        "distill: student on teacher data",
        "eval: teacher:teacher",
        "eval: teacher:long_cot",
    ):
        assert f"[plan] {stage}: would run" in plan, plan
    assert "pre-flight: zero task vector: short_cot has the base's content" in plan
    assert not w.exists()

    code, out = _invoke("run", pipeline)
    assert code == 0, out
    made = w / "chain" / "long_cot" / "model"
    manifest = json.loads((made / "micota.json").read_text())
    assert manifest["stage"] == "distill"
    # the fine-tuned model is the parent trained on the teacher's verified answers, and nothing else
    teacher_data = w / "chain" / "teacher" / "data.correct.jsonl"
    assert len(_records(teacher_data)) > 0 and all(r["correct"] for r in _records(teacher_data))
    assert Path(manifest["options"]["student"]) == WORLD / "short_cot"
    assert [Path(d) for d in manifest["options"]["data"]] == [teacher_data]
    parent, tuned = _weights(WORLD / "short_cot"), _weights(made)
    assert any(not torch.equal(parent[k], tuned[k]) for k in parent)
    # the TA merged the made long_cot with its parent, by content
    ta = json.loads((w / "ta" / "micota.json").read_text())
    from micota_merge.core.fingerprint import content_id

    assert ta["inputs"]["long_cot"]["content"] == content_id(made)
    assert ta["inputs"]["short_cot"]["content"] == ta["inputs"]["base"]["content"] == content_id(WORLD / "short_cot")
    # the fine-tune learned the teacher's habit: its probe answers are longer than its parent's
    sweep = json.loads((w / "ta" / "sweep" / "sweep.json").read_text())
    assert sweep["endpoints"]["long_cot"]["mean_tokens"] > 1.5 * sweep["endpoints"]["short_cot"]["mean_tokens"]
    report = (w / "report.md").read_text()
    assert "## The chain: long_cot made by the pipeline" in report
    for row in ("| teacher:teacher |", "| teacher:long_cot |", "| student+teacher |", "| teacher |"):
        assert row in report, row

    code, again = _invoke("run", pipeline)
    assert code == 0 and "nothing to run" in again and "[done] chain: teacher's long-CoT data" in again

    # another fine-tune: the teacher's data stays, the made long_cot and everything after it rerun
    data = yaml.safe_load(pipeline.read_text())
    data["pipeline"]["chain"]["distill"]["lr"] = 0.0005
    pipeline.write_text(yaml.safe_dump(data))
    code, plan = _invoke("run", pipeline, "--dry-run")
    assert code == 0, plan
    assert "[done] chain: teacher's long-CoT data" in plan
    assert "[plan] chain: long_cot = short_cot fine-tuned on the teacher's data: would start over" in plan
    assert "[plan] build: teacher assistant (sweep): would start over" in plan
    assert "[done] distill: student on teacher data" in plan  # the teacher's data did not change
    assert "[plan] distill: student on ta data: would start over" in plan


def test_until_chain_stops_after_the_chain(tmp_path):
    pipeline = _small_chain(tmp_path)
    code, out = _invoke("run", pipeline, "--until", "chain", "--dry-run")
    assert code == 0, out
    assert "[plan] chain: long_cot = short_cot fine-tuned on the teacher's data: would run" in out
    assert "build: teacher assistant" not in out


def test_the_shipped_chain_recipes_validate():
    from micota_merge.pipeline.check import validate_pipeline

    recipe = load_recipe(CHAIN)
    validate_pipeline(recipe, recipe.pipeline, REPO)  # the shipped micro-world chain, paths beside the repo
    for name in ("r1-micota-chain-7b", "r1-micota-chain-3b"):
        r = load_recipe(REPO / "micota_merge" / "recipes" / "pipeline" / f"{name}.yaml")
        assert r.made_long_cot and r.pipeline.chain.teacher == "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B"
        assert r.models.short_cot == "Qwen/Qwen2.5-14B-Instruct" and r.pipeline.questions.startswith("hf:")
        assert r.pipeline.eval["tasks"] == "all" and r.sweep.probe.questions is None  # held-out training slice
    a, b = (load_recipe(REPO / "micota_merge" / "recipes" / "pipeline" / f"r1-micota-chain-{s}b.yaml") for s in (7, 3))
    # one chain and one TA for both students: everything before the students is the same
    assert a.model_dump(exclude={"pipeline"}) == b.model_dump(exclude={"pipeline"})
    assert a.pipeline.chain == b.pipeline.chain and a.pipeline.student != b.pipeline.student
