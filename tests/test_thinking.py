"""The thinking switch (`chat_template_kwargs`, e.g. Qwen3's `enable_thinking`) in every stage that applies
a chat template, with Qwen3-8B's real hybrid template (model_meta, verbatim): generate, the sweep's
probe (test_options), eval, distill and align. With thinking off the template ends the prompt with an
empty think block: part of the prompt, never graded, never trained on, like R1's `<think>\\n` prefill."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from micota_merge.cli import cli
from micota_merge.demo.standin import MODEL_META

QWEN3_8B = MODEL_META / "Qwen__Qwen3-8B"
OFF = {"enable_thinking": False}
EMPTY_THINK = "<think>\n\n</think>\n\n"

pytestmark = pytest.mark.usefixtures("one_thread")


def _invoke(*args) -> tuple[int, str]:
    r = CliRunner().invoke(cli, [str(a) for a in args])
    return r.exit_code, r.output


def _read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory) -> Path:
    """A bigram model that answers "\\boxed{18}" after Qwen3-8B's non-thinking prompt, with Qwen3-8B's real
    tokenizer_config.json (its hybrid chat template and added tokens) over the Qwen2 BPE it shares."""
    from conftest import chain_model
    from transformers import AutoTokenizer

    from micota_merge.demo.family import QWEN2_TOKENIZER, tiny_config

    out = tmp_path_factory.mktemp("hybrid") / "model"
    out.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(Path(QWEN2_TOKENIZER) / name, out / name)
    shutil.copyfile(QWEN3_8B / "tokenizer_config.json", out / "tokenizer_config.json")
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_ids_to_tokens([151667, 151668]) == ["<think>", "</think>"]
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True, **OFF
    )
    assert prompt.endswith("<|im_start|>assistant\n" + EMPTY_THINK)
    last = tok(prompt, add_special_tokens=False)["input_ids"][-1]
    chain = (
        [last] + tok("\\boxed{18}", add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
    )
    # Qwen3-8B's vocabulary size: its added tokens (<think> 151667) lie past Qwen2.5's
    model = chain_model(tiny_config("qwen2", tie_word_embeddings=False, vocab_size=151936), chain)
    model.save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").write_text((QWEN3_8B / "generation_config.json").read_text())
    return out


# two of GSM8K's questions, answered greedily by the tiny model
ASK = "--questions gsm8k --decontaminate off --limit 2 --max-tokens 10 --backend transformers".split()


def _generate(model: Path, out: Path, *extra) -> tuple[int, str]:
    return _invoke("generate", "--model", model, *ASK, "--out", out, *extra)


def test_generate_with_thinking_off_keeps_the_empty_think_block_as_prompt(hybrid, tmp_path):
    out = tmp_path / "off.jsonl"
    code, text = _generate(hybrid, out, "--chat-template-kwargs", json.dumps(OFF))
    assert code == 0, text
    recs = _read(out)
    r = next(x for x in recs if x["id"] == "gsm8k-test-0")  # Janet's ducks: gold 18
    # the record keeps the whole assistant turn (the template's empty block first), graded after </think>,
    # and counts only what the model generated: \ boxed { 1 8 } <|im_end|>
    assert r["messages"][1]["content"] == EMPTY_THINK + "\\boxed{18}"
    assert (r["pred"], r["correct"], r["num_tokens"], r["thinking_tokens"]) == ("18", True, 7, 0)
    assert r["chat_template_kwargs"] == OFF
    # the switch is part of what the file was written with: resuming it without the switch is refused
    code, text = _generate(hybrid, out)
    assert code == 2 and "chat template switches" in text, text
    code, text = _generate(hybrid, out, "--chat-template-kwargs", "enable_thinking=false")
    assert code == 2 and "is not a JSON object" in text


def test_distill_and_align_never_train_on_the_empty_think_block(hybrid):
    """The completion mask starts after the block with the switch, and at it without (thinking on, the
    template does not write it, so the record's block is the answer's own text)."""
    from transformers import AutoTokenizer

    from micota_merge.training.distill import ChatRecord, encode_records

    tok = AutoTokenizer.from_pretrained(hybrid)
    rec = ChatRecord(
        file="-",
        line=1,
        prompt=[{"role": "user", "content": "What is 9 + 9?"}],
        completion={"role": "assistant", "content": EMPTY_THINK + "\\boxed{18}"},
    )

    def learnt(**kw) -> str:
        ((ids, mask),) = encode_records(tok, [rec], **kw)
        return tok.decode([i for i, m in zip(ids, mask) if m])

    assert learnt(template_kwargs=OFF) == "\\boxed{18}<|im_end|>\n"
    assert learnt().startswith("<think>")


def test_align_scores_with_the_switch(hybrid, tmp_path):
    data = tmp_path / "d.jsonl"
    row = {
        "messages": [
            {"role": "user", "content": "What is 9 + 9?"},
            {"role": "assistant", "content": EMPTY_THINK + "\\boxed{18}"},
        ]
    }
    data.write_text(json.dumps(row) + "\n")
    tokens = {}
    for label, extra in (("off", ["--chat-template-kwargs", json.dumps(OFF)]), ("on", [])):
        code, text = _invoke("align", "--model", hybrid, "--data", data, "--out", tmp_path / label, *extra)
        assert code == 0, text
        (row,) = json.loads((tmp_path / label / "align.json").read_text())["rows"].values()
        tokens[label] = row["tokens"]
    # with the switch the block is prompt: only \boxed{18}<|im_end|>\n is scored
    assert tokens["on"] - tokens["off"] == 4 and tokens["off"] == 8  # <think> \n\n </think> \n\n


def test_eval_hands_the_switch_to_lm_eval_and_to_servers():
    from micota_merge.generation.backends import EvalJob
    from micota_merge.generation.backends.openai import server_model_args, server_payload
    from micota_merge.generation.backends.transformers import Transformers
    from micota_merge.generation.backends.vllm import lm_eval_args
    from micota_merge.generation.options import GenerateOptions

    job = EvalJob(model_path=Path("m"), gpu_memory_utilization=0.9, chat_template_kwargs=OFF)
    assert Transformers().lm_eval(job)[1]["chat_template_args"] == OFF  # lm-eval's hf model renders with it
    assert lm_eval_args(job)["chat_template_args"] == OFF
    args = server_model_args(
        ["http://x/v1"],
        "m",
        max_tokens=5,
        concurrency=1,
        retries=0,
        timeout=1,
        api_key_env=None,
        chat_template_kwargs=OFF,
    )
    assert args["chat_template_kwargs"] == OFF
    opts = GenerateOptions(model="m", questions="gsm8k", out="o.jsonl", chat_template_kwargs=OFF)
    assert server_payload(opts, "q", "u", 0, [])["chat_template_kwargs"] == OFF
    plain = GenerateOptions(model="m", questions="gsm8k", out="o.jsonl")
    assert "chat_template_kwargs" not in server_payload(plain, "q", "u", 0, [])


def test_lm_eval_chat_model_sends_the_switch_with_every_request():
    import lm_eval.api.registry as registry

    from micota_merge.generation.servers.client import register_lm_eval_model

    cls = registry.get_model(register_lm_eval_model())
    lm = cls(base_urls=["http://127.0.0.1:9/v1/chat/completions"], model="m", chat_template_kwargs=OFF)
    payload = lm._create_payload([{"role": "user", "content": "hi"}], generate=True, gen_kwargs={"until": ["x"]})
    assert payload["chat_template_kwargs"] == OFF
    plain = cls(base_urls=["http://127.0.0.1:9/v1/chat/completions"], model="m")
    assert "chat_template_kwargs" not in plain._create_payload([{"role": "user", "content": "hi"}], generate=True)


def test_eval_prompts_through_the_switch(hybrid, tmp_path):
    """lm-eval's hf model renders the benchmark prompt with the switch: the empty block is prompt, and the
    answer after it is graded."""
    switch = ["--chat-template-kwargs", json.dumps(OFF)]
    eval_args = ["--tasks", "gsm8k", "--limit", "2", "--max-tokens", "10", "--backend", "transformers", *switch]
    code, text = _invoke("eval", "--model", hybrid, *eval_args, "--output", tmp_path / "run")
    assert code == 0, text
    samples = [p for p in (tmp_path / "run").rglob("samples_*.jsonl")]
    assert samples, list((tmp_path / "run").rglob("*"))
    logged = _read(samples[0])
    prompt = logged[0]["arguments"]["gen_args_0"]["arg_0"]
    assert prompt.endswith(EMPTY_THINK)


def test_records_re_render_as_they_were_generated_and_stop_on_both_ids(hybrid, tmp_path):
    """The record's prompt and answer, rendered for training with the same switch, are the generation
    prompt followed by exactly the generated text; generation stops on <|im_end|> and <|endoftext|>."""
    from transformers import AutoTokenizer

    from micota_merge.core.templates import render_completion, render_with_tokenizer
    from micota_merge.generation.generate import stop_token_ids

    out = tmp_path / "off.jsonl"
    code, text = _generate(hybrid, out, "--chat-template-kwargs", json.dumps(OFF))
    assert code == 0, text
    tok = AutoTokenizer.from_pretrained(hybrid)
    assert {151645, 151643} <= set(stop_token_ids(tok, hybrid))  # Qwen3's generation_config: [151645, 151643]
    for r in _read(out):
        prompt, full = render_completion(
            render_with_tokenizer(tok, OFF), r["messages"][:1], r["messages"][1]["content"]
        )
        assert prompt == tok.apply_chat_template(r["messages"][:1], tokenize=False, add_generation_prompt=True, **OFF)
        assert full == prompt + r["messages"][1]["content"].removeprefix(EMPTY_THINK) + "<|im_end|>\n"


@pytest.mark.parametrize(
    "folder,prefill,off",
    [
        ("Qwen__Qwen3-4B-Thinking-2507", "<think>\n", "<think>\n"),  # thinking only: the switch changes nothing
        ("Qwen__Qwen3-4B-Instruct-2507", "", ""),  # never thinks
        ("Qwen__Qwen3-8B", "", EMPTY_THINK),  # hybrid
        ("deepseek-ai__DeepSeek-R1-Distill-Llama-8B", "<think>\n", "<think>\n"),
        ("Qwen__Qwen3-30B-A3B-Instruct-2507", "", ""),
    ],
)
def test_the_real_templates_prefill_what_the_switch_says(folder, prefill, off):
    from micota_merge.core.templates import render_with_template, template_facts

    cfg = json.loads((MODEL_META / folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    eos = cfg["eos_token"]["content"] if isinstance(cfg["eos_token"], dict) else cfg["eos_token"]
    facts = template_facts(render_with_template(cfg["chat_template"], "", eos))
    assert facts.prefill == prefill
    assert template_facts(render_with_template(cfg["chat_template"], "", eos, OFF)).prefill == off


def test_the_preflight_says_which_template_and_thinking_tokens_the_ta_keeps(tmp_path):
    """A tiny Thinking-2507 / Instruct-2507 pair with the real tokenizer configs: the build says which
    template the TA keeps and how each side thinks, and its generation_config stops on both turn ends."""
    from micota_merge.demo.family import make_family

    fam = make_family(tmp_path / "fam", seed=3)
    for role, meta in (
        ("long_cot", "Qwen__Qwen3-4B-Thinking-2507"),
        ("short_cot", "Qwen__Qwen3-4B-Instruct-2507"),
        ("base", "Qwen__Qwen3-4B-Instruct-2507"),
    ):
        shutil.copyfile(MODEL_META / meta / "tokenizer_config.json", fam[role] / "tokenizer_config.json")
        shutil.copyfile(
            MODEL_META / "Qwen__Qwen3-4B-Instruct-2507" / "generation_config.json", fam[role] / "generation_config.json"
        )
        (fam[role] / "chat_template.jinja").unlink(missing_ok=True)
    recipe = tmp_path / "r.yaml"
    data = {
        "models": {r: str(p) for r, p in fam.items()},
        "merge": {"method": "dare_ties", "ratio": 0.5, "density": 0.5},
        "tokenizer": "long_cot",
        "output": str(tmp_path / "ta"),
    }
    recipe.write_text(json.dumps(data))
    code, text = _invoke("build", recipe)
    assert code == 0, text
    line = next(x for x in text.splitlines() if "template: the TA keeps" in x)
    assert "long_cot's chat template (always thinks: its generation prompt prefills '<think>\\n')" in line
    assert "short_cot's no thinking prefill" in line
    assert "<think> 151667 (not special: kept in decoded text), </think> 151668" in line
    gc = json.loads((tmp_path / "ta" / "generation_config.json").read_text())
    assert set(gc["eos_token_id"]) >= {151643, 151645}


def test_a_pipeline_gives_each_model_its_switches_in_every_stage(tmp_path):
    """pipeline.chat_template_kwargs by model: the short side's data, the student's training and every
    eval of the student and of that side get its switches; the sweep's probes too. Nothing else changes."""
    from micota_merge.merge.recipe import parse_recipe
    from micota_merge.merge.sweep.run import SweepOptions, _settings
    from micota_merge.pipeline import run as pipeline_run

    data = {
        "models": {"long_cot": "l", "short_cot": "s", "base": "b"},
        "output": "o",
        "pipeline": {
            "workdir": "w",
            "student": "st",
            "chat_template_kwargs": {"short_cot": OFF, "student": OFF, "ta": {"enable_thinking": True}},
        },
    }
    recipe = parse_recipe(data)
    settings = recipe.pipeline
    assert (
        pipeline_run._generate_options(settings, Path("m"), Path("o.jsonl"), "short_cot")["chat_template_kwargs"] == OFF
    )
    assert "chat_template_kwargs" not in pipeline_run._generate_options(
        settings, Path("m"), Path("o.jsonl"), "long_cot"
    )
    assert pipeline_run._switches(settings, "student") == {"chat_template_kwargs": OFF}
    probe = _settings(recipe, SweepOptions(recipe="r.yaml")).probe
    assert probe.chat_template_kwargs_by_side == {"short_cot": OFF, "ta": {"enable_thinking": True}}
    data["pipeline"]["eval"] = {"chat_template_kwargs": OFF}
    with pytest.raises(Exception, match="both set switches"):
        parse_recipe(data)
