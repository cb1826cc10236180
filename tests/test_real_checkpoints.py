"""Real checkpoints, real traps: the paper-scale pairs checked against their real metadata.

Stand-ins (micota_merge/standin.py) are built from the real config/tokenizer/generation files in
micota_merge/assets/model_meta (sources: its SOURCES.md); tiny models with those tokenizers show
that a TA merged across the token-id collision stops, that a tie mismatch merges untied, and that
R1's and Qwen2.5's real chat templates go through generate and distill intact.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from safetensors.torch import (  # bound here: tests below guard the module attribute
    load_file,
    save_file,
)

from micota_merge.cli import cli
from micota_merge.core.errors import UserError
from micota_merge.demo.standin import (
    MODEL_META,
    make_standin,
    meta_folder_name,
    recipe_checkpoints,
    recipe_standins,
)

REPO = Path(__file__).resolve().parents[1]
R1_32B = MODEL_META / "deepseek-ai__DeepSeek-R1-Distill-Qwen-32B"
QWEN_15B_INSTRUCT = MODEL_META / "Qwen__Qwen2.5-1.5B-Instruct"
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Which checkpoints of each paper-scale recipe have no real config.json in model_meta (SOURCES.md,
# "Not found"). A recipe with a missing checkpoint is refused by `demo standin --recipe` (nothing is
# guessed); when someone adds the metadata, this table fails and the full dry-run takes over.
PAPER_RECIPES = {
    "r1-qwen7b-ta": [],
    "r1-qwen7b-ta-scale": [],  # the same pair, every generation stage on vLLM data parallelism
    "r1-qwen1.5b-ta": ["Qwen/Qwen2.5-1.5B"],
    "r1-qwen7b-math-ta": ["Qwen/Qwen2.5-Math-7B-Instruct", "Qwen/Qwen2.5-Math-7B"],
    "r1-qwen14b-ta": ["deepseek-ai/DeepSeek-R1-Distill-Qwen-14B"],
    # MiCoTA's chain (teacher R1-32B, mid-size 14B-Instruct over Qwen2.5-14B, students 7B / 3B)
    "r1-micota-chain-7b": [],
    "r1-micota-chain-3b": [],
    # today's pairs (issue 23): what model_meta/SOURCES.md did not find is named
    "qwen3-4b-2507-ta": ["Qwen/Qwen3-4B-Base"],
    "qwen3-30b-a3b-2507-ta": ["Qwen/Qwen3-30B-A3B-Base"],
    "r1-0528-qwen3-8b-ta": [],
    "r1-llama8b-ta": ["deepseek-ai/DeepSeek-R1-Distill-Llama-8B"],
    "r1-qwen32b-ta": ["Qwen/Qwen2.5-32B-Instruct"],
}


# tiny models on a shared 2-core machine: one torch thread (conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def no_weight_reads(monkeypatch):
    """safetensors.torch.load_file fails the test while it runs. Disarmed afterwards rather than only
    restored: a module first imported during the test keeps its own reference to the guard."""
    import safetensors.torch

    real, armed = safetensors.torch.load_file, [True]

    def guard(*a, **k):
        if armed[0]:
            pytest.fail("a weight was read")
        return real(*a, **k)

    monkeypatch.setattr(safetensors.torch, "load_file", guard)
    yield
    armed[0] = False


def run_cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output


def standin_dry_run(recipe: str, tmp_path: Path) -> str:
    """`demo standin --recipe` for a shipped merge recipe, then `build --dry-run` on the stand-ins: its output."""
    code, text = run_cli(
        "demo",
        "standin",
        "--recipe",
        REPO / "micota_merge" / "recipes" / "merge" / f"{recipe}.yaml",
        "--out",
        tmp_path / "s",
    )
    assert code == 0, text
    code, text = run_cli("build", tmp_path / "s" / "recipe.yaml", "--dry-run")
    assert code == 0, text
    return text


# ---------------------------------------------------------------- stand-ins


@pytest.mark.parametrize(
    "folder,params",
    [
        # the HF API's parameter counts (model_meta/SOURCES.md); tied heads are counted once
        ("Qwen__Qwen2.5-1.5B-Instruct", 1_543_714_304),
        ("Qwen__Qwen2.5-3B-Instruct", 3_085_938_688),
        ("Qwen__Qwen2.5-7B-Instruct", 7_615_616_512),
        ("deepseek-ai__DeepSeek-R1-Distill-Qwen-32B", 32_763_876_352),
    ],
)
def test_standin_headers_carry_the_real_sizes_and_cost_no_disk(tmp_path, folder, params):
    from safetensors import safe_open

    from micota_merge.core.checkpoints import read_checkpoint

    out = make_standin(MODEL_META / folder, tmp_path / folder)
    meta = read_checkpoint(out)
    assert sum(t.numel for t in meta.tensors.values()) == params
    assert {t.dtype for t in meta.tensors.values()} == {"BF16"}
    assert meta.n_bytes() == 2 * params
    f = out / "model.safetensors"
    assert f.stat().st_size > 2 * params
    assert f.stat().st_blocks * 512 < 1 << 20  # a hole, not gigabytes of zeros
    if params < 10**10:  # (safetensors maps the whole file: 65 GB exceeds this machine's address-space limit)
        with safe_open(f, framework="pt") as st:  # a valid file: safetensors reads it, the data are zeros
            assert st.get_tensor("model.norm.weight").abs().sum() == 0
    tied = json.loads((MODEL_META / folder / "config.json").read_text())["tie_word_embeddings"]
    assert ("lm_head.weight" in meta.tensors) == (not tied)
    assert json.loads((out / "config.json").read_bytes()) == json.loads(
        (MODEL_META / folder / "config.json").read_bytes()
    )


def test_standin_shards_with_an_index(tmp_path):
    from micota_merge.core.checkpoints import read_checkpoint

    whole = read_checkpoint(make_standin(QWEN_15B_INSTRUCT, tmp_path / "one"))
    code, text = run_cli(
        "demo", "standin", "--meta", QWEN_15B_INSTRUCT, "--out", tmp_path / "sharded", "--shard-size", "1GB"
    )
    assert code == 0, text
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 4  # 3.09 GB in <= 1 GB shards
    sharded = read_checkpoint(tmp_path / "sharded")
    assert {n: (t.dtype, t.shape) for n, t in sharded.tensors.items()} == {
        n: (t.dtype, t.shape) for n, t in whole.tensors.items()
    }
    assert index["metadata"]["total_size"] == whole.n_bytes()


def test_standin_tokenizers_read_the_collision_as_each_family_does(tmp_path):
    from transformers import AutoTokenizer

    r1 = AutoTokenizer.from_pretrained(make_standin(R1_32B, tmp_path / "r1"))
    qwen = AutoTokenizer.from_pretrained(make_standin(QWEN_15B_INSTRUCT, tmp_path / "qwen"))
    # The re-saved R1-Distill tokenizer's own example (SOURCES.md, "Token-id evidence").
    ids = r1("<｜begin▁of▁sentence｜><｜User｜>Hello, world!<｜Assistant｜>", add_special_tokens=False)["input_ids"]
    assert ids == [151646, 151644, 9707, 11, 1879, 0, 151645]
    assert qwen("<|im_start|>user\nHello, world!<|im_end|>", add_special_tokens=False)["input_ids"] == [
        151644,
        872,
        198,
        9707,
        11,
        1879,
        0,
        151645,
    ]
    assert (r1.eos_token_id, qwen.eos_token_id) == (151643, 151645)
    assert r1.convert_ids_to_tokens([151648, 151649]) == ["<think>", "</think>"]
    assert qwen.convert_ids_to_tokens([151648, 151649]) == ["<|box_start|>", "<|box_end|>"]


def test_standin_refuses_missing_metadata(tmp_path):
    (tmp_path / "meta").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        make_standin(tmp_path / "meta", tmp_path / "out")
    code, text = run_cli(
        "demo",
        "standin",
        "--recipe",
        REPO / "micota_merge" / "recipes" / "merge" / "r1-qwen32b-ta.yaml",
        "--out",
        tmp_path / "s",
    )
    assert code == 2 and "Qwen/Qwen2.5-32B-Instruct" in text and "nothing is guessed" in text
    assert not (tmp_path / "s").exists()


# ---------------------------------------------------------------- paper recipes


def test_every_paper_recipe_is_listed():
    recipes = REPO / "micota_merge" / "recipes"
    shipped = {p.stem for pattern in ("*/r1-*.yaml", "*/qwen3-*.yaml") for p in recipes.glob(pattern)}
    assert shipped == set(PAPER_RECIPES)


@pytest.mark.parametrize("name", sorted(PAPER_RECIPES))
def test_paper_recipe_metadata_found_or_named(name, tmp_path):
    from micota_merge.merge.recipe import load_recipe

    path = next((REPO / "micota_merge" / "recipes").glob(f"*/{name}.yaml"))
    specs = recipe_checkpoints(load_recipe(path))
    missing = [s for s in specs.values() if not (MODEL_META / meta_folder_name(s) / "config.json").is_file()]
    assert missing == PAPER_RECIPES[name]
    if missing:
        with pytest.raises(UserError) as e:
            recipe_standins(path, MODEL_META, tmp_path / "s")
        assert all(m in str(e.value) for m in missing)


def test_r1_qwen7b_dry_run_on_standins_prints_the_real_traps(tmp_path, no_weight_reads):
    """The one paper recipe whose three checkpoints all have real metadata: a full dry-run."""
    text = standin_dry_run("r1-qwen7b-ta", tmp_path)
    assert "differ in rope_theta: 1000000.0 vs 10000" in text
    assert "lineage: long_cot has rope_theta 10000 but base has 1000000.0" in text
    assert "differ in eos_token_id: 151645 vs 151643" in text
    assert "7 token ids mean different tokens to long_cot and short_cot" in text
    for row in ("151645  <｜Assistant｜>          <|im_end|>*", "151648  <think>                <|box_start|>*"):
        assert row in text
    assert "stops on every id that ends a turn for either side: 151643 = <|endoftext|>" in text
    assert "151645 = <|im_end|>" in text
    assert "tie mismatch" not in text  # 7B: neither side ties
    assert "merge_method: dare_ties" in text and "(14.19 GiB)" in text
    assert not (tmp_path / "s" / "ta").exists()


def test_long_to_short_settings_dry_run_in_our_convention(tmp_path, no_weight_reads):
    """The study's TIES (k = 0.8 trimmed, α = 1) and AIM-TIES (ω = 0.4): density 0.2, lambda 1, equal
    weights; AIM's calibration drawn and stated before any weight is read."""
    text = standin_dry_run("l2s-aim-ties-7b", tmp_path)
    cfg = yaml.safe_load(text[text.index("mergekit config:") + len("mergekit config:") :])
    assert cfg["merge_method"] == "ties" and cfg["parameters"] == {"lambda": 1.0}
    assert [m["parameters"] for m in cfg["models"]] == [{"weight": 0.5, "density": 0.2}] * 2
    assert "aim: omega 0.4, calibrated on questions gsm8k-train, 64 of 7473 (seed 0), blocks of 512" in text
    code, plain = run_cli("build", REPO / "micota_merge" / "recipes" / "merge" / "l2s-ties-7b.yaml", "--print-mergekit")
    plain_cfg = yaml.safe_load(plain)
    assert code == 0 and "then AIM" not in plain  # the same mergekit merge, without the relaxation after it
    assert [m["parameters"] for m in plain_cfg["models"]] == [m["parameters"] for m in cfg["models"]]
    assert plain_cfg["parameters"] == cfg["parameters"] and plain_cfg["merge_method"] == "ties"


def test_r1_qwen1p5b_pair_dry_run_untied_and_sized(tmp_path):
    """1.5B: the base's metadata is missing, so the pair is checked without it (a linear merge of
    the two real checkpoints): tie mismatch, lineage, collisions, and the untied TA's size."""
    from micota_merge.merge.build import plan_build
    from micota_merge.merge.recipe import load_recipe

    recipe = load_recipe(REPO / "micota_merge" / "recipes" / "merge" / "r1-qwen1.5b-ta.yaml")
    data = recipe.model_dump(mode="json", exclude_none=True)
    for role in ("long_cot", "short_cot"):
        name = meta_folder_name(data["models"][role])
        make_standin(MODEL_META / name, tmp_path / name)
        data["models"][role] = str(tmp_path / name)
    del data["models"]["base"]
    data["merge"] = {"method": "linear", "ratio": 0.5, "dtype": "bfloat16"}
    data["output"] = str(tmp_path / "ta")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    plan = plan_build(tmp_path / "r.yaml", dry_run=True)
    text = "\n".join(plan.warnings)
    assert "tie mismatch: long_cot has a separate lm_head, short_cot ties it to the embeddings" in text
    assert "differ in rope_theta: 1000000.0 vs 10000" in text
    assert "7 token ids mean different tokens" in text
    assert plan.output_bytes == 2 * (1_543_714_304 + 151_936 * 1_536)  # the TA's own lm_head counts
    assert plan.stop_ids == [151643, 151645]


# ---------------------------------------------------------------- tie mismatch, merged for real


def _untied_copy(src: Path, dst: Path, seed: int) -> Path:
    """src (ties lm_head to its embeddings) re-saved with its own lm_head = embedding + noise."""
    import torch

    shutil.copytree(src, dst)
    state = {}
    for f in sorted(dst.glob("*.safetensors")):
        state.update(load_file(f))
        f.unlink()
    g = torch.Generator().manual_seed(seed)
    emb = state["model.embed_tokens.weight"]
    state["lm_head.weight"] = emb + 0.05 * torch.randn(emb.shape, generator=g, dtype=emb.dtype)
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_tie_mismatch_merges_with_the_tied_sides_embedding_as_its_head(tiny_family_f32, tmp_path, method):
    import torch
    from transformers import AutoModelForCausalLM

    fam = dict(tiny_family_f32, long_cot=_untied_copy(tiny_family_f32["long_cot"], tmp_path / "long_untied", 5))
    assert "lm_head.weight" not in load_file(fam["short_cot"] / "model.safetensors")
    recipe = {
        "models": {k: str(v) for k, v in fam.items()},
        "output": str(tmp_path / "ta"),
        "merge": {"method": method, "ratio": 0.3, "dtype": "float32"},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    code, text = run_cli("build", tmp_path / "r.yaml")
    assert code == 0, text
    assert "tie mismatch" in text and "tie_word_embeddings set to false" in text
    ta = load_file(tmp_path / "ta" / "model.safetensors")
    w = {r: load_file(fam[r] / "model.safetensors") for r in fam}
    head = {r: w[r].get("lm_head.weight", w[r]["model.embed_tokens.weight"]) for r in fam}
    if method == "linear":
        expected = 0.3 * head["long_cot"] + 0.7 * head["short_cot"]
    else:
        expected = head["base"] + 0.3 * (head["long_cot"] - head["base"]) + 0.7 * (head["short_cot"] - head["base"])
    torch.testing.assert_close(ta["lm_head.weight"], expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ta["lm_head.weight"], ta["model.embed_tokens.weight"])
    cfg = json.loads((tmp_path / "ta" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False  # the identity side (short_cot) ties; the TA must not
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ta")
    torch.testing.assert_close(model.lm_head.weight.detach(), ta["lm_head.weight"])


def test_missing_lm_head_refused_unless_that_side_ties(tiny_family_f32):
    """Relaxing the tie check must not let a really missing tensor through."""
    from micota_merge.core.checkpoints import check_compatible, read_checkpoint

    long_cot, short_cot = read_checkpoint(tiny_family_f32["long_cot"]), read_checkpoint(tiny_family_f32["short_cot"])
    short_cot.tensors["lm_head.weight"] = short_cot.tensors["model.embed_tokens.weight"]
    check_compatible({"long_cot": long_cot, "short_cot": short_cot})  # long_cot ties: its head is its embedding
    long_cot.config = dict(long_cot.config, tie_word_embeddings=False)
    with pytest.raises(UserError, match="'lm_head.weight' is in short_cot but not in long_cot"):
        check_compatible({"long_cot": long_cot, "short_cot": short_cot})


# ---------------------------------------------------------------- stopping across the collision


def _chain_model(dst: Path, meta: Path, chain: list[int], config_eos: int, tokenizer_from: Path) -> Path:
    """A tiny untied Qwen2 (vocab 151936, as the 1.5B pair) whose next token depends only on the
    current one (attention and MLP outputs are zero): it follows `chain`, whatever side it is.
    Tokenizer, template and generation_config from a stand-in of the real metadata `meta`."""

    from micota_merge.demo.family import tiny_config

    config = tiny_config(
        "qwen2", tie_word_embeddings=False, vocab_size=151936, bos_token_id=151643, eos_token_id=config_eos
    )
    from conftest import chain_model

    model = chain_model(config, chain)
    model.save_pretrained(dst, safe_serialization=True)
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json", "generation_config.json"):
        src = tokenizer_from / f
        if src.is_file():
            shutil.copyfile(src, dst / f)
    return dst


@pytest.fixture(scope="module")
def collision_pair(tmp_path_factory) -> dict:
    """long_cot speaks R1 (its tokenizer, template, generation_config: eos 151643 only), short_cot and
    base Qwen2.5-Instruct; all three answer "ok</think>42" and then emit 151645, the end of turn in
    Qwen's habit that R1's tokenizer reads as <｜Assistant｜>."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("collision")
    r1_tok = make_standin(R1_32B, root / "r1_standin")
    qwen_tok = make_standin(QWEN_15B_INSTRUCT, root / "qwen_standin")
    tok = AutoTokenizer.from_pretrained(r1_tok)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "x"}], tokenize=True, add_generation_prompt=True, return_dict=False
    )
    body = (
        tok("ok", add_special_tokens=False)["input_ids"]
        + [151649]
        + tok("\\boxed{42}", add_special_tokens=False)["input_ids"]
    )
    chain = [prompt[-1]] + body + [151645]
    assert len(set(chain)) == len(chain)
    paths = {
        "long_cot": _chain_model(root / "long_cot", R1_32B, chain, 151643, r1_tok),
        "short_cot": _chain_model(root / "short_cot", QWEN_15B_INSTRUCT, chain, 151645, qwen_tok),
        "base": _chain_model(root / "base", QWEN_15B_INSTRUCT, chain, 151645, qwen_tok),
    }
    questions = root / "q.jsonl"
    questions.write_text(
        "".join(json.dumps({"id": f"q{i}", "question": f"{i} + 40?", "answer": "42"}) + "\n" for i in (1, 2))
    )
    return {**paths, "questions": questions, "root": root, "answer_tokens": len(body) + 1}


def _generate(model: Path, questions: Path, out: Path):
    code, text = run_cli(
        "generate",
        "--model",
        model,
        "--questions",
        questions,
        "--out",
        out,
        "--backend",
        "transformers",
        "--max-tokens",
        "10",
        "--keep",
        "all",
    )
    assert code == 0, text
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def test_ta_keeping_r1_tokens_stops_on_qwens_end_of_turn(collision_pair, tmp_path):
    from transformers import AutoTokenizer

    from micota_merge.core.templates import render_completion, render_with_tokenizer
    from micota_merge.training.distill import encode_records, read_chat_records

    p = collision_pair
    recipe = {
        "models": {r: str(p[r]) for r in ("long_cot", "short_cot", "base")},
        "tokenizer": "long_cot",
        "merge": {"method": "task_arithmetic", "ratio": 0.5, "dtype": "float32"},
        "output": str(tmp_path / "ta"),
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    code, text = run_cli("build", tmp_path / "r.yaml")
    assert code == 0, text
    assert "7 token ids mean different tokens to short_cot and long_cot" in text
    gc = json.loads((tmp_path / "ta" / "generation_config.json").read_text())
    assert gc["eos_token_id"] == [151643, 151645] and gc["bos_token_id"] == 151646  # R1's, plus Qwen's end

    # The R1 parent alone (its generation_config stops on 151643 only) never stops: the trap is real.
    alone = _generate(p["long_cot"], p["questions"], tmp_path / "alone.jsonl")
    assert {r["finish_reason"] for r in alone} == {"length"}
    recs = _generate(tmp_path / "ta", p["questions"], tmp_path / "ta.jsonl")
    assert {r["finish_reason"] for r in recs} == {"stop"}
    assert {r["num_tokens"] for r in recs} == {p["answer_tokens"]}  # the answer and one stop token
    # R1's template prefills "<think>\n": it is part of the prompt, and the record's answer is whole.
    r = recs[0]
    assert r["messages"][1]["content"] == "<think>\nok</think>\\boxed{42}" and r["pred"] == "42" and r["correct"]
    assert r["system"] is None  # R1's template injects none

    tok = AutoTokenizer.from_pretrained(tmp_path / "ta")
    render = render_with_tokenizer(tok)
    prompt_text, full = render_completion(render, r["messages"][:1], r["messages"][1]["content"])
    assert prompt_text.endswith("<｜Assistant｜><think>\n")
    assert full == prompt_text + "ok</think>\\boxed{42}<｜end▁of▁sentence｜>"  # the text the TA saw and wrote
    # R1's own template drops everything before </think> from a finished answer: distilling through it
    # would teach "42" alone. encode_records keeps the reasoning and masks the prefill as prompt.
    assert "ok</think>" not in tok.apply_chat_template(r["messages"], tokenize=False)
    [(ids, mask)] = encode_records(tok, read_chat_records(tmp_path / "ta.jsonl")[:1])
    learnt = tok.decode([i for i, m in zip(ids, mask) if m])
    assert learnt == "ok</think>\\boxed{42}<｜end▁of▁sentence｜>"
    assert tok.decode(ids[: mask.index(1)]) == prompt_text


def test_qwen_default_system_prompt_is_recorded_and_can_be_dropped(collision_pair, tmp_path):
    from transformers import AutoTokenizer

    from micota_merge.training.distill import encode_records, read_chat_records

    p = collision_pair
    recs = _generate(p["short_cot"], p["questions"], tmp_path / "short.jsonl")
    assert {r["finish_reason"] for r in recs} == {"stop"}  # Qwen's own end of turn
    assert all(r["system"] == QWEN_DEFAULT_SYSTEM for r in recs)
    assert [m["role"] for m in recs[0]["messages"]] == ["user", "assistant"]
    records = read_chat_records(tmp_path / "short.jsonl")
    qwen = AutoTokenizer.from_pretrained(p["short_cot"])
    r1 = AutoTokenizer.from_pretrained(p["long_cot"])
    # Same template: keeping the recorded system prompt re-renders exactly what the model saw.
    [(ids, mask)] = encode_records(qwen, records[:1])
    seen = qwen.apply_chat_template(recs[0]["messages"][:1], tokenize=False, add_generation_prompt=True)
    assert qwen.decode(ids[: mask.index(1)]) == seen
    # A student with R1's template: kept, the prompt carries it; dropped, the student's template decides.
    [(kept, _)] = encode_records(r1, records[:1], template_system="keep")
    [(dropped, _)] = encode_records(r1, records[:1], template_system="drop")
    assert QWEN_DEFAULT_SYSTEM in r1.decode(kept) and QWEN_DEFAULT_SYSTEM not in r1.decode(dropped)


def test_real_templates_facts():
    from micota_merge.core.checkpoints import read_chat_template
    from micota_merge.core.templates import render_with_template, template_facts

    r1 = template_facts(
        render_with_template(json.loads((R1_32B / "tokenizer_config.json").read_text())["chat_template"])
    )
    assert (r1.prefill, r1.default_system, r1.end_of_turn, r1.rewrites_answer) == (
        "<think>\n",
        None,
        "<｜end▁of▁sentence｜>",
        True,
    )
    qwen_t = json.loads((QWEN_15B_INSTRUCT / "tokenizer_config.hf_api_subset.json").read_text())["chat_template"]
    qwen = template_facts(render_with_template(qwen_t))
    assert (qwen.prefill, qwen.default_system, qwen.end_of_turn, qwen.rewrites_answer) == (
        "",
        QWEN_DEFAULT_SYSTEM,
        "<|im_end|>\n",
        False,
    )
    assert read_chat_template(R1_32B)  # the reconstructed tokenizer_config.json carries it


def test_tie_mismatch_refused_before_reading_where_mergekit_cannot_untie(
    tiny_family_f32, tmp_path, monkeypatch, no_weight_reads
):
    """Where mergekit's architecture lists no lm_head -> embedding tie, the build stops at the
    metadata, saying how to untie the checkpoint, instead of failing mid-merge."""
    from mergekit.architecture import base as arch_base

    fam = dict(tiny_family_f32, long_cot=_untied_copy(tiny_family_f32["long_cot"], tmp_path / "long_untied", 5))
    original = arch_base.ModelArchitecture.all_weights

    def without_tie(self, config):
        return [
            w.model_copy(update={"tied_names": None}) if w.name == "lm_head.weight" else w
            for w in original(self, config)
        ]

    monkeypatch.setattr(arch_base.ModelArchitecture, "all_weights", without_tie)
    recipe = {
        "models": {k: str(v) for k, v in fam.items()},
        "output": str(tmp_path / "ta"),
        "merge": {"method": "linear", "ratio": 0.5, "dtype": "float32"},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    code, text = run_cli("build", tmp_path / "r.yaml")
    assert code == 2 and "Untie it first" in text and "short_cot" in text
    assert not (tmp_path / "ta").exists()


@pytest.mark.parametrize(
    "long_cot,base,warned",
    [
        ("deepseek-ai__DeepSeek-R1-Distill-Qwen-7B", "Qwen__Qwen2.5-7B", True),  # from Qwen2.5-Math-7B
        ("deepseek-ai__DeepSeek-R1-Distill-Qwen-32B", "Qwen__Qwen2.5-32B", False),  # byte-identical configs
    ],
)
def test_lineage_from_the_real_configs(long_cot, base, warned):
    from micota_merge.core.checkpoints import CheckpointMeta
    from micota_merge.merge.preflight import lineage_warnings

    metas = {
        role: CheckpointMeta(MODEL_META / name, json.loads((MODEL_META / name / "config.json").read_text()), {})
        for role, name in (("long_cot", long_cot), ("base", base))
    }
    assert bool(lineage_warnings(metas)) == warned
    if long_cot.endswith("32B"):
        assert (MODEL_META / long_cot / "config.json").read_bytes() == (MODEL_META / base / "config.json").read_bytes()


@pytest.mark.slow  # hashes ~130 GB of stand-in holes: the run's content identity reads every weight byte
@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None and not os.environ.get("MICOTA_VLLM_PYTHON"),
    reason="the recipe's generate stages start `vllm serve`: its check needs a vLLM (MICOTA_VLLM_PYTHON)",
)
def test_micota_chain_dry_runs_on_standins(tmp_path, monkeypatch, no_weight_reads):
    """The paper's chain (R1-Distill-Qwen-32B teaches, Qwen2.5-14B-Instruct is fine-tuned and merged over
    Qwen2.5-14B, Qwen2.5-3B-Instruct learns) planned end to end on metadata stand-ins, with a pre-filled
    Hub cache standing in for hiyouga/math12k: its shape (problem, answer) and size, not its content."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    repo = cache / "datasets--hiyouga--math12k"
    snap = repo / "snapshots" / ("a" * 40)
    (snap / "data").mkdir(parents=True)
    rows = [{"problem": f"What is {i} plus {i + 1}?", "answer": str(2 * i + 1)} for i in range(12000)]
    (snap / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)

    recipe = REPO / "micota_merge" / "recipes" / "pipeline" / "r1-micota-chain-3b.yaml"
    code, text = run_cli("demo", "standin", "--recipe", recipe, "--out", tmp_path / "s")
    assert code == 0, text
    monkeypatch.chdir(tmp_path)  # the recipe's work folders are relative: nothing lands in the repository
    code, text = run_cli("run", tmp_path / "s" / "recipe.yaml", "--dry-run")
    assert code == 0, text
    for stage in (
        "chain: teacher's long-CoT data",
        "chain: long_cot = short_cot fine-tuned on the teacher's data",
        "build: teacher assistant (sweep)",
        "distill: student on ta data",
        "distill: student on teacher data",
        "eval: teacher:teacher",
        "eval: teacher:long_cot",
        "report",
    ):
        assert f"[plan] {stage}: would run" in text, text
    assert "nothing was written" in text and not (tmp_path / "outputs").exists()


def test_every_metadata_file_has_its_recorded_sha256():
    """SOURCES.md records each vendored file's sha256: a file changed by hand (or added without a source
    line) fails here."""
    import hashlib

    text = (MODEL_META / "SOURCES.md").read_text(encoding="utf-8")
    block = text.split("## sha256 of every file", 1)[1].split("```")[1]
    recorded = dict(reversed(line.split("  ", 1)) for line in block.strip().splitlines())
    files = {
        str(p.relative_to(MODEL_META))
        for p in MODEL_META.rglob("*")
        if p.is_file() and p.name not in ("SOURCES.md", "added_tokens_by_family.json")
    }
    assert set(recorded) == files
    for name, digest in recorded.items():
        assert hashlib.sha256((MODEL_META / name).read_bytes()).hexdigest() == digest, name
        assert f"| {name} | " in text, f"{name} has no row (label, source) in SOURCES.md's table"


@pytest.mark.slow  # hashes two 16 GB stand-ins (holes): the build's identity reads every weight byte
def test_r1_0528_over_qwen3_8b_dry_runs_with_the_zero_task_vector_and_the_lineage(tmp_path, no_weight_reads):
    """The Long-to-Short study's merge on stand-ins: TIES of R1-0528-Qwen3-8B over Qwen3-8B itself."""
    text = standin_dry_run("r1-0528-qwen3-8b-ta", tmp_path)
    # short_cot is the base: the TA is Qwen3-8B + 0.7 x the trimmed R1 task vector (normalize off)
    assert "zero task vector: short_cot has the base's content" in text
    assert "the TA is base + (ratio) x (long_cot - base) after its trim" in text and "cancels" not in text
    assert "max_position_embeddings" in text and "131072" in text and "40960" in text  # R1-0528's yarn context
    assert "merge_method: ties" in text and "density: 0.3" in text and "normalize: false" in text
    mk = text.split("mergekit config:", 1)[1]
    assert mk.count("- model:") == 1  # the base side is left out of mergekit's models
