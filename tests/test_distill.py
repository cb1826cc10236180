"""`micota-merge distill`: assistant-only loss, training on a tiny student, LoRA, resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from micota_merge.cli import cli
from micota_merge.core.artifacts import sha256_file
from micota_merge.core.errors import UserError
from micota_merge.core.options import resolve
from micota_merge.training.distill import (
    DistillConfig,
    build_trainer,
    encode_records,
    prepare_examples,
    read_chat_records,
)

REPO = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def chat(user: str, assistant: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}], **extra}


def losses(out: Path) -> list[float]:
    return [h["loss"] for h in json.loads((out / "train_log.json").read_text()) if "loss" in h]


# ---------------------------------------------------------------- masking


def test_prompt_tokens_carry_no_loss(tiny_family, tmp_path):
    """On a known record, labels are -100 exactly on the rendered prompt (system + user + the
    assistant header) and equal the tokens of the answer and its end-of-turn, and they match what
    TRL itself builds from the same conversation in prompt/completion form."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    student = tiny_family["short_cot"]
    tok = AutoTokenizer.from_pretrained(student)
    rec = chat("What is 2 + 3?", "2 + 3 = 5. The answer is \\boxed{5}.")
    data = write_jsonl(tmp_path / "one.jsonl", [rec])
    [(ids, mask)] = encode_records(tok, read_chat_records(data))

    prompt_text = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    )
    n_prompt = len(tok(prompt_text, add_special_tokens=False)["input_ids"])
    assert mask == [0] * n_prompt + [1] * (len(ids) - n_prompt)
    assert tok.decode(ids[:n_prompt]) == prompt_text
    assert tok.decode(ids[n_prompt:]) == "2 + 3 = 5. The answer is \\boxed{5}.<|im_end|>\n"
    assert tok.convert_tokens_to_ids("<|im_end|>") in ids[n_prompt:]  # the model learns to stop

    # The labels the trainer really uses (TRL builds them from our completion_mask).
    cfg = DistillConfig(student=str(student), data=[str(data)], out=str(tmp_path / "o"), max_steps=1)
    trainer = build_trainer(cfg, student, tok, [(ids, mask)], tmp_path / "ck")
    labels = trainer.train_dataset[0]["labels"]
    assert labels[:n_prompt] == [-100] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    batch = trainer.data_collator([trainer.train_dataset[0]])
    assert (batch["labels"][0, :n_prompt] == -100).all() and (batch["labels"][0, n_prompt:] >= 0).all()

    # TRL's own tokenization of the conversational prompt/completion pair gives the same thing.
    raw = Dataset.from_list([{"prompt": rec["messages"][:1], "completion": rec["messages"][1:]}])
    ref = SFTTrainer(
        model=trainer.model,
        processing_class=tok,
        train_dataset=raw,
        args=SFTConfig(output_dir=str(tmp_path / "ref"), bf16=False, report_to="none", max_length=None),
    )
    assert ref.train_dataset[0]["input_ids"] == ids
    assert ref.train_dataset[0]["labels"] == labels


def test_overlong_records_dropped_or_truncated_and_counted(tiny_family, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_family["base"])
    recs = [
        chat("1+1?", "2"),
        chat("Count.", " ".join(str(i) for i in range(200))),
        chat("2+2?", "4", correct=False),
        chat("3+3?", "6", correct=True),
        chat("4+4?", "Let me see, 4", correct=True, finish_reason="length"),
    ]
    data = write_jsonl(tmp_path / "d.jsonl", recs)
    ex, rep = prepare_examples(tok, [str(data)], max_length=64, overlong="drop")
    assert (
        rep.records_read,
        rep.dropped_incorrect,
        rep.dropped_cut_off,
        rep.dropped_overlong,
        rep.truncated,
        rep.kept,
    ) == (5, 1, 1, 1, 0, 2)
    ex, rep = prepare_examples(tok, [str(data)], max_length=64, overlong="truncate", keep_incorrect=True)
    assert (rep.dropped_incorrect, rep.dropped_overlong, rep.truncated, rep.kept) == (0, 0, 1, 5)
    assert max(len(ids) for ids, _ in ex) == 64 == rep.max_tokens
    assert rep.files[0]["sha256"] == sha256_file(data)
    # A prompt that alone fills max_length leaves nothing to learn: dropped even with truncate.
    ex, rep = prepare_examples(tok, [str(data)], max_length=20, overlong="truncate")
    assert rep.dropped_overlong >= 1 and all(any(m) for _, m in ex)


# ---------------------------------------------------------------- errors and options


def run_cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_clear_errors(tiny_family, tmp_path):
    student = tiny_family["short_cot"]
    good = write_jsonl(tmp_path / "good.jsonl", [chat("1+1?", "2")])
    no_asst = write_jsonl(
        tmp_path / "noasst.jsonl", [chat("1+1?", "2"), {"messages": [{"role": "user", "content": "hi"}]}]
    )
    all_wrong = write_jsonl(tmp_path / "wrong.jsonl", [chat("1+1?", "3", correct=False)])

    r = run_cli("distill", "--student", student, "--data", tmp_path / "missing.jsonl", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "missing.jsonl does not exist" in r.output
    r = run_cli("distill", "--student", tmp_path / "nostudent", "--data", good, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "--student" in r.output and "nostudent" in r.output
    r = run_cli("distill", "--student", student, "--data", f"{good},{no_asst}", "--out", tmp_path / "o")
    assert r.exit_code == 2 and f"{no_asst}:2" in r.output and "no assistant message" in r.output
    r = run_cli("distill", "--student", student, "--data", all_wrong, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "nothing left to train on" in r.output and "dropped incorrect: 1" in r.output
    r = run_cli("distill", "--data", good, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "--student is required" in r.output
    r = run_cli("distill", "--student", student, "--data", good, "--out", tmp_path / "o", "--lr", "-1")
    assert r.exit_code == 2 and "lr" in r.output
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.work").exists()


def test_config_file_and_flags(tmp_path):
    cfg_file = tmp_path / "r.yaml"
    cfg_file.write_text(
        yaml.safe_dump(
            {"student": "Qwen/Qwen2.5-7B-Instruct", "lr": 1e-5, "max-length": 16384, "packing": True, "epochs": 2}
        )
    )
    cfg = resolve(
        DistillConfig, {"data": ("a.jsonl,b.jsonl",), "out": "o", "lr": 2e-5, "packing": False}, str(cfg_file)
    )
    assert (cfg.student, cfg.lr, cfg.max_length, cfg.packing, cfg.epochs) == (
        "Qwen/Qwen2.5-7B-Instruct",
        2e-5,
        16384,
        False,
        2.0,
    )
    assert cfg.data == ["a.jsonl", "b.jsonl"]
    cfg_file.write_text(yaml.safe_dump({"student": "x", "learning_rate": 1e-5}))
    with pytest.raises(UserError, match="unknown key 'learning_rate'"):
        resolve(DistillConfig, {"data": ("a",), "out": "o"}, str(cfg_file))
    # Every shipped distill recipe parses.
    for recipe in sorted((REPO / "micota_merge" / "recipes" / "distill").glob("*.yaml")):
        cfg = resolve(DistillConfig, {"data": ("d.jsonl",), "out": "o"}, str(recipe))
        assert cfg.lr == 1e-5 and cfg.epochs == 2 and cfg.max_length == 16384 and cfg.lr_scheduler == "cosine"


# ---------------------------------------------------------------- training


def test_loss_falls_and_output_is_a_model(distilled_tiny, chat_data, tiny_family):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = distilled_tiny
    ls = losses(out)
    assert len(ls) == 6 and all(map(torch.isfinite, torch.tensor(ls)))
    assert sum(ls[-2:]) / 2 < ls[0] - 1.0, ls  # from ~ln(vocab) = 11.9 nats down by more than a nat
    man = json.loads((out / "micota.json").read_text())
    assert man["stage"] == "distill" and man["results"]["global_step"] == 6
    assert man["results"]["final_loss"] == pytest.approx(ls[-1])
    assert man["inputs"]["data"][0]["sha256"] == sha256_file(chat_data["train"])
    assert man["data"]["kept"] == 16 and man["data"]["dropped_overlong"] == 0
    assert man["results"]["tokens_per_second"] > 0 and "trl" in man["versions"]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    # titled with what was learnt and the seed, not "1 file(s)"
    assert Image.open(out / "loss.png").text["Title"] == f"short_cot on {Path(chat_data['train']).name}, seed 42"
    assert not Path(f"{out}.work").exists()  # checkpoints cleaned after success
    # A Hugging Face folder: loads, keeps the student's chat template and stop token, and changed.
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == AutoTokenizer.from_pretrained(tiny_family["short_cot"]).chat_template
    assert model.config.eos_token_id == 151645  # <|im_end|>, the student's own
    before = AutoModelForCausalLM.from_pretrained(tiny_family["short_cot"], dtype=torch.float32)
    w0 = before.get_input_embeddings().weight
    assert not torch.allclose(model.get_input_embeddings().weight.float(), w0)


def test_lora_saves_merged_full_model(tiny_family, chat_data, tmp_path):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    r = run_cli(
        "distill",
        "--student",
        tiny_family["short_cot"],
        "--data",
        chat_data["train"],
        "--out",
        out,
        "--lora",
        "--lora-r",
        "8",
        "--lora-alpha",
        "16",
        "--save-adapter",
        "--lr",
        "5e-2",
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--logging-steps",
        "1",
        "--warmup-ratio",
        "0",
    )
    assert r.exit_code == 0, r.output
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any("lora" in k for k in keys)
    assert (out / "adapter" / "adapter_config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_family["short_cot"], dtype=torch.float32)
    name = "model.layers.0.self_attn.q_proj.weight"
    w, w0 = dict(model.named_parameters())[name], dict(base.named_parameters())[name]
    assert w.shape == w0.shape and not torch.allclose(w.float(), w0.float())  # the adapter was merged in
    # LoRA leaves the embedding alone.
    assert torch.equal(model.get_input_embeddings().weight.float(), base.get_input_embeddings().weight.float())


def test_resume_after_interruption(tiny_family, chat_data, tmp_path, monkeypatch):
    """A run stopped after its first checkpoint leaves no output; --resume refuses changed options,
    then finishes the same schedule from the checkpoint instead of step 0."""
    import micota_merge.training.distill as d

    real_counter = d._step_counter_class()

    class Crash(real_counter):
        def on_step_end(self, args, state, control, **kwargs):
            super().on_step_end(args, state, control, **kwargs)
            if state.global_step == 3:  # checkpoint-2 is on disk; step 3 never gets saved
                raise KeyboardInterrupt

    out = tmp_path / "student"
    cfg = DistillConfig(
        student=str(tiny_family["short_cot"]),
        data=[str(chat_data["train"])],
        out=str(out),
        max_steps=4,
        save_steps=2,
        batch_size=2,
        logging_steps=1,
        lr=1e-2,
    )
    monkeypatch.setattr(d, "_step_counter_class", lambda: Crash)
    with pytest.raises(KeyboardInterrupt):
        d.distill(cfg, echo=lambda s: None)
    monkeypatch.undo()
    assert not out.exists()
    assert d.last_complete_checkpoint(Path(f"{out}.work") / "checkpoints").name == "checkpoint-2"
    with pytest.raises(UserError, match="checkpoints of an earlier run"):
        d.distill(cfg, echo=lambda s: None)
    with pytest.raises(UserError, match="different options lr"):
        d.distill(cfg.model_copy(update={"resume": True, "lr": 2e-2}), echo=lambda s: None)

    d.distill(cfg.model_copy(update={"resume": True}), echo=lambda s: None)
    man = json.loads((out / "micota.json").read_text())
    assert man["results"]["global_step"] == 4
    assert man["results"]["resumed_from"].endswith("checkpoint-2")
    assert man["results"]["steps_this_run"] == 2  # it did not restart from step 0


@pytest.mark.slow
def test_resume_after_kill(tiny_family, chat_data, tmp_path):
    """SIGKILL a real training process after its first checkpoint; --resume then finishes the same
    schedule from that checkpoint instead of step 0."""
    from micota_merge.training.distill import last_complete_checkpoint

    out = tmp_path / "student"
    args = [
        "--student",
        str(tiny_family["short_cot"]),
        "--data",
        str(chat_data["train"]),
        "--out",
        str(out),
        "--max-steps",
        "6",
        "--save-steps",
        "2",
        "--batch-size",
        "2",
        "--logging-steps",
        "1",
        "--lr",
        "1e-2",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "micota_merge.cli", "distill", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    ckpts = Path(f"{out}.work") / "checkpoints"
    deadline = time.time() + 300
    try:
        while last_complete_checkpoint(ckpts) is None:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "no checkpoint within 300 s"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()  # a killed run leaves no output
    saved = int(last_complete_checkpoint(ckpts).name.split("-")[1])
    assert 2 <= saved < 6

    r = run_cli("distill", *args, "--resume")
    assert r.exit_code == 0, r.output
    man = json.loads((out / "micota.json").read_text())
    assert man["results"]["global_step"] == 6
    assert man["results"]["resumed_from"].endswith(f"checkpoint-{saved}")
    assert man["results"]["steps_this_run"] == 6 - saved  # it did not restart from step 0
    assert len(losses(out)) >= 6  # the log history spans both processes


def test_accelerate_configs_are_valid():
    """Each shipped accelerate config loads, and every FSDP / DeepSpeed key is one `accelerate launch` knows."""
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    known = {a.dest for a in launch_command_parser()._actions}
    configs = sorted((REPO / "micota_merge" / "recipes" / "accelerate").glob("*.yaml"))
    assert {c.stem for c in configs} >= {"single_gpu", "fsdp", "zero3"}
    for path in configs:
        cfg = ClusterConfig.from_yaml_file(str(path))
        for key in list(cfg.fsdp_config or {}) + list(cfg.deepspeed_config or {}):
            assert key in known, f"{path.name}: unknown key {key}"
    assert (
        ClusterConfig.from_yaml_file(str(REPO / "micota_merge/recipes/accelerate/fsdp.yaml")).fsdp_config[
            "fsdp_state_dict_type"
        ]
        == "FULL_STATE_DICT"
    )  # the final save must be one ordinary HF folder


@pytest.mark.slow
def test_two_processes_data_parallel(tiny_family, chat_data, tmp_path):
    """Two ranks (torchrun, DDP over gloo on CPU; `accelerate launch` sets up the same env on
    GPUs): they share the work dir, only the main rank writes, the result is one complete model."""
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
        "-m",
        "micota_merge.cli",
        "distill",
        "--student",
        str(tiny_family["short_cot"]),
        "--data",
        str(chat_data["train"]),
        "--out",
        str(out),
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--logging-steps",
        "1",
        "--lr",
        "1e-2",
        "--save-steps",
        "1",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    man = json.loads((out / "micota.json").read_text())
    assert man["results"]["world_size"] == 2 and man["results"]["global_step"] == 2
    assert (out / "model.safetensors").is_file() and not Path(f"{out}.work").exists()


def test_loss_title_names_data_and_seed():
    from micota_merge.training.distill import loss_title

    # the pipeline's layout: data/<name>/data.correct.jsonl (generate) or data/<name>/data.jsonl (mix)
    assert (
        loss_title("micota_merge/assets/microworld/student", ["outputs/w/data/ta/data.correct.jsonl"], 1)
        == "student on ta data, seed 1"
    )
    assert (
        loss_title("Qwen/Qwen2.5-3B-Instruct", ["w/data/mix_long/data.jsonl"], 42)
        == "Qwen2.5-3B-Instruct on mix_long data, seed 42"
    )
    # a file with a name of its own keeps it; several are joined
    assert (
        loss_title("s", ["a/gsm8k_ta.jsonl", "b/data/long_cot/data.correct.jsonl"], 0)
        == "s on gsm8k_ta.jsonl + long_cot data, seed 0"
    )
    assert loss_title("s", [f"f{i}.jsonl" for i in range(5)], 3) == "s on 5 data files (f0.jsonl, …), seed 3"


def test_loss_plot_has_whole_step_ticks(tmp_path, monkeypatch):
    """Three optimizer steps: matplotlib's default ticks would read 1.25, 1.5, ...; steps are whole."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from micota_merge.training.distill import plot_loss

    figs = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figs.append(fig))
    plot_loss([{"step": s, "loss": 3.0 - 0.3 * s} for s in (1, 2, 3)], tmp_path / "loss.png", "t")
    ticks = [t for t in figs[0].axes[0].get_xticks() if 1 <= t <= 3]
    assert ticks and all(float(t).is_integer() for t in ticks)
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert figs[0].axes[0].get_title() == "t"
