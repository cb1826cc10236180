"""Bad inputs and a full disk (issue 20, item 9): one line naming the file or path and what to do, exit
code 2, no traceback, and nothing left behind (no output, no sidecar, no lock).

Every stage is run for real on the tiny checkpoints; the damaged inputs are real files (a shard cut to
half its size, a 0-byte shard, PyTorch pickles only, a config with auto_map, Latin-1 JSONL), and the
full disk is a real small tmpfs, so the errors are the ones a user meets, raised where they are raised.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from micota_merge.cli import cli
from micota_merge.core.errors import UserError

MICOTA = [sys.executable, "-m", "micota_merge.cli"]


# tiny models on a shared 2-core machine: one torch thread (conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- helpers


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def run_subprocess(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*MICOTA, *[str(a) for a in args]], check=False, capture_output=True, text=True, env=env, cwd=cwd, timeout=600
    )


def error_line(exit_code: int, stderr: str, output: str = "") -> str:
    """The one error line, after checking that the run refused cleanly."""
    assert "Traceback" not in stderr + output, stderr + output
    # the CLI's own line, and any a library logs at ERROR or CRITICAL (its own copy of the failure)
    errors = [
        line
        for line in re.split(r"[\r\n]", stderr)
        if "error: " in line or line.lstrip().startswith(("ERROR", "CRITICAL"))
    ]
    assert len(errors) == 1, stderr
    assert errors[0].startswith("error: "), errors[0]  # on a line of its own, not after a progress bar
    assert exit_code == 2, stderr + output
    return errors[0]


def refused(result, *needles: str) -> str:
    """A CliRunner result that is exactly one error line holding every needle."""
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    line = error_line(result.exit_code, result.stderr, result.stdout)
    assert [x for x in result.stderr.splitlines() if x.strip()] == [line], result.stderr
    for n in needles:
        assert n in line, (n, line)
    return line


def refused_loosely(result) -> str:
    """One error line and exit 2; other stderr (model loading, progress bars) allowed."""
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    return error_line(result.exit_code, result.stderr, result.stdout)


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def cut_in_half(f: Path) -> Path:
    with open(f, "rb+") as fh:
        fh.truncate(f.stat().st_size // 2)
    return f


def recipe_file(folder: Path, family: dict, output: Path, **overrides) -> Path:
    models = {k: str(v) for k, v in family.items()}
    models.update({k: str(v) for k, v in overrides.items()})
    recipe = {
        "models": models,
        "merge": {"method": "linear", "ratio": 0.5, "dtype": "float32"},
        "tokenizer": "short_cot",
        "output": str(output),
        "sweep": {
            "ratios": [0.5],
            "probe": {"questions": "gsm8k-train", "limit": 1, "max_tokens": 4, "backend": "transformers"},
        },
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def questions_file(path: Path, *questions: str) -> Path:
    path.write_text("".join(json.dumps({"question": q, "answer": "2"}) + "\n" for q in questions), encoding="utf-8")
    return path


def stage_args(stage: str, model: Path, family: dict, chat_data: dict, work: Path) -> list[str]:
    """A run of `stage` on `model` that would succeed with a sound checkpoint."""
    if stage in ("build", "build --dry-run", "sweep"):
        recipe = recipe_file(work, family, work / "ta", short_cot=model)
        return {
            "build": ["build", recipe],
            "build --dry-run": ["build", recipe, "--dry-run"],
            "sweep": ["sweep", recipe],
        }[stage]
    if stage == "generate":
        q = questions_file(work / "q.jsonl", "What is 1 + 1?")
        return [
            "generate",
            "--model",
            model,
            "--questions",
            q,
            "--out",
            work / "out.jsonl",
            "--backend",
            "transformers",
            "--max-tokens",
            "4",
        ]
    if stage == "distill":
        return [
            "distill",
            "--student",
            model,
            "--data",
            chat_data["train"],
            "--out",
            work / "student",
            "--max-steps",
            "1",
        ]
    if stage == "eval":
        return [
            "eval",
            "--model",
            model,
            "--tasks",
            "gsm8k",
            "--limit",
            "1",
            "--max-tokens",
            "4",
            "--dtype",
            "float32",
            "--output",
            work / "ev",
        ]
    if stage == "align":
        return ["align", "--model", model, "--data", chat_data["heldout"], "--limit", "2", "--out", work / "al"]
    raise AssertionError(stage)


# ---------------------------------------------------------------- a damaged checkpoint, in every stage


@pytest.mark.parametrize("stage", ["build --dry-run", "build", "sweep", "generate", "distill", "eval", "align"])
def test_truncated_shard_is_refused_before_any_work(stage, tiny_family, chat_data, tmp_path):
    """A shard cut to half its size has an intact header, so metadata checks passed it and the load
    failed minutes later with safetensors' traceback; now every stage names it at once."""
    model = copy_model(tiny_family["short_cot"], tmp_path / "short_cot")
    shard = cut_in_half(model / "model.safetensors")
    work = tmp_path / "work"
    work.mkdir()
    args = stage_args(stage, model, tiny_family, chat_data, work)
    before = tree(tmp_path)
    line = refused(invoke(*args), str(shard), "truncated", "copy or download")
    assert f"{shard.stat().st_size:,} bytes" in line
    assert tree(tmp_path) == before


def test_shard_with_trailing_bytes_is_refused(tiny_family, tmp_path):
    """safetensors refuses a file longer than its header says as well ("not fully covered")."""
    model = copy_model(tiny_family["short_cot"], tmp_path / "m")
    with open(model / "model.safetensors", "ab") as f:
        f.write(b"\0" * 16)
    q = questions_file(tmp_path / "q.jsonl", "What is 1 + 1?")
    before = tree(tmp_path)
    refused(
        invoke(
            "generate",
            "--model",
            model,
            "--questions",
            q,
            "--out",
            tmp_path / "out.jsonl",
            "--backend",
            "transformers",
            "--max-tokens",
            "4",
        ),
        str(model / "model.safetensors"),
        "16 bytes past its last tensor",
    )
    assert tree(tmp_path) == before


def test_sharded_checkpoint_names_the_cut_shard(tiny_family, tmp_path):
    """With an index, the shard that is short is named, not the folder."""
    import torch
    from safetensors.torch import load_file, save_file

    src = tiny_family["short_cot"]
    model = tmp_path / "sharded"
    shutil.copytree(src, model, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors = load_file(src / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, keys in halves.items():
        save_file({k: tensors[k].contiguous() for k in keys}, model / fname, metadata={"format": "pt"})
    (model / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: f for f, keys in halves.items() for k in keys}})
    )
    assert torch.equal(load_file(model / "model-00002-of-00002.safetensors")[names[1]], tensors[names[1]])
    cut = cut_in_half(model / "model-00002-of-00002.safetensors")
    out = tmp_path / "ev"
    refused(
        invoke("eval", "--model", model, "--tasks", "gsm8k", "--limit", "1", "--max-tokens", "4", "--output", out),
        str(cut),
        "truncated",
    )
    assert not out.exists() and not (tmp_path / ".ev.responses").exists()


def _bin_only(src: Path, dst: Path) -> Path:
    import torch
    from safetensors.torch import load_file

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(src / "model.safetensors"), dst / "pytorch_model.bin")
    return dst


def _remote_code(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(
        model_type="acme_lm",
        architectures=["AcmeForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_acme.AcmeConfig",
            "AutoModelForCausalLM": "modeling_acme.AcmeForCausalLM",
        },
    )
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _empty_shard(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / "model.safetensors").write_bytes(b"")
    return dst


def _lfs_pointer(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    size = (src / "model.safetensors").stat().st_size
    (dst / "model.safetensors").write_text(
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{'0' * 64}\nsize {size}\n"
    )
    return dst


def _no_tokenizer(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("vocab.json", "merges.txt", "tokenizer*"))
    return dst


@pytest.mark.parametrize(
    "kind,file,needles",
    [
        ("empty shard", "model.safetensors", ["not a safetensors file", "0 bytes", "copy or download"]),
        ("pickle only", "pytorch_model.bin", ["convert them to safetensors", "save_pretrained"]),
        ("remote code", "config.json", ["auto_map", "trust_remote_code", "'acme_lm'"]),
        ("no tokenizer", "", ["has no tokenizer", "copy the tokenizer files"]),
        ("git-lfs pointer", "model.safetensors", ["Git LFS pointer", "git lfs pull"]),
    ],
)
def test_generate_refuses_an_unloadable_model_before_writing(kind, file, needles, tiny_family, tmp_path):
    """Each of these was a traceback after OUT.jsonl, its meta.json and its lock were written."""
    make = {
        "empty shard": _empty_shard,
        "pickle only": _bin_only,
        "remote code": _remote_code,
        "no tokenizer": _no_tokenizer,
        "git-lfs pointer": _lfs_pointer,
    }[kind]
    model = make(tiny_family["short_cot"], tmp_path / "model")
    q = questions_file(tmp_path / "q.jsonl", "What is 1 + 1?")
    before = tree(tmp_path)
    out = tmp_path / "out.jsonl"
    refused(
        invoke(
            "generate",
            "--model",
            model,
            "--questions",
            q,
            "--out",
            out,
            "--backend",
            "transformers",
            "--max-tokens",
            "4",
        ),
        str(model / file) if file else str(model),
        *needles,
    )
    assert tree(tmp_path) == before


def test_auto_map_of_a_built_in_architecture_is_loadable(tiny_family, tmp_path):
    """Many hub configs keep an auto_map for an architecture transformers has since built in (loaded
    without remote code): those are not refused."""
    from micota_merge.core.checkpoints import check_model_files

    model = copy_model(tiny_family["short_cot"], tmp_path / "m")
    cfg = json.loads((model / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_qwen2.Qwen2ForCausalLM"}
    (model / "config.json").write_text(json.dumps(cfg))
    assert check_model_files(model, "--model").config["model_type"] == "qwen2"
    with pytest.raises(UserError, match="trust_remote_code"):
        check_model_files(_remote_code(tiny_family["short_cot"], tmp_path / "r"), "--model")


# ---------------------------------------------------------------- JSONL that is not UTF-8

LATIN1_LINE = '{"question": "Combien font 1 + 1, caf\xe9 ?", "answer": "2"}\n'.encode("latin-1")


def _latin1_questions(path: Path) -> Path:
    path.write_bytes(json.dumps({"question": "What is 1 + 1?", "answer": "2"}).encode() + b"\n" + LATIN1_LINE)
    return path


def test_generate_names_the_line_that_is_not_utf8(tiny_family, tmp_path):
    q = _latin1_questions(tmp_path / "questions.jsonl")
    before = tree(tmp_path)
    refused(
        invoke(
            "generate",
            "--model",
            tiny_family["short_cot"],
            "--questions",
            q,
            "--out",
            tmp_path / "o.jsonl",
            "--backend",
            "transformers",
            "--max-tokens",
            "4",
        ),
        f"{q}:2",
        "UTF-8",
        "0xe9",
    )
    assert tree(tmp_path) == before


def test_distill_names_the_line_that_is_not_utf8(tiny_family, chat_data, tmp_path):
    data = tmp_path / "train.jsonl"
    good = chat_data["train"].read_bytes()
    bad = json.dumps(
        {"messages": [{"role": "user", "content": "1 + 1 ?"}, {"role": "assistant", "content": "deux, \xe9videmment"}]},
        ensure_ascii=False,
    )
    data.write_bytes(good + bad.encode("latin-1") + b"\n")
    line_no = good.count(b"\n") + 1
    before = tree(tmp_path)
    refused(
        invoke(
            "distill",
            "--student",
            tiny_family["short_cot"],
            "--data",
            data,
            "--out",
            tmp_path / "student",
            "--max-steps",
            "1",
        ),
        f"{data}:{line_no}",
        "UTF-8",
    )
    assert tree(tmp_path) == before


def test_run_names_the_pipeline_questions_line_that_is_not_utf8(tiny_family, tmp_path):
    q = _latin1_questions(tmp_path / "questions.jsonl")
    pipeline = {
        "models": {k: str(v) for k, v in tiny_family.items()},
        "merge": {"method": "linear", "ratio": 0.5, "dtype": "float32"},
        "tokenizer": "short_cot",
        "output": str(tmp_path / "ta"),
        "pipeline": {
            "workdir": str(tmp_path / "work"),
            "student": str(tiny_family["short_cot"]),
            "select": "build",
            "questions": str(q),
        },
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    before = tree(tmp_path)
    refused(invoke("run", path), f"{q}:2", "UTF-8")
    assert tree(tmp_path) == before


# ---------------------------------------------------------------- a question longer than the context


def test_question_longer_than_the_context_is_named(tiny_family, tmp_path):
    """Before: "pass --max-tokens -1997987 or less", with no question named."""
    from micota_merge.data.questions import content_id

    huge = "seven " * 3000  # the tiny model's context is 2048 tokens
    q = questions_file(tmp_path / "q.jsonl", "What is 1 + 1?", huge)
    before = tree(tmp_path)
    line = refused(
        invoke(
            "generate",
            "--model",
            tiny_family["short_cot"],
            "--questions",
            q,
            "--out",
            tmp_path / "out.jsonl",
            "--backend",
            "transformers",
            "--max-tokens",
            "4",
        ),
        content_id("q", huge),
        "context of 2048 tokens",
        "drop",
        "longer context",
    )
    assert "--max-tokens -" not in line
    assert tree(tmp_path) == before


def test_question_that_leaves_no_room_for_the_answer_is_named(tiny_family, tmp_path):
    from micota_merge.data.questions import content_id

    long = "seven " * 1500  # fits the 2048-token context, but not with 1000 new tokens
    q = questions_file(tmp_path / "q.jsonl", "What is 1 + 1?", long)
    before = tree(tmp_path)
    line = refused(
        invoke(
            "generate",
            "--model",
            tiny_family["short_cot"],
            "--questions",
            q,
            "--out",
            tmp_path / "out.jsonl",
            "--backend",
            "transformers",
            "--max-tokens",
            "1000",
        ),
        content_id("q", long),
        "--max-tokens 1000",
        "context of 2048 tokens",
    )
    n = int(re.search(r"longest prompt \(([\d,]+) tokens\)", line).group(1).replace(",", ""))
    assert f"--max-tokens {2048 - n} or less" in line
    assert tree(tmp_path) == before


# ---------------------------------------------------------------- a full disk


@pytest.fixture
def small_disk(tmp_path):
    """Mount real tmpfs filesystems of a given size (root only; skipped elsewhere)."""
    mounted = []

    def mount(size: str, leave_free: int | None = None) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=False, capture_output=True
        )
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()})")
        mounted.append(where)
        if leave_free is not None:  # fill it up to `leave_free` bytes
            free = shutil.disk_usage(where).free
            (where / "filler").write_bytes(b"\0" * (free - leave_free))
            assert shutil.disk_usage(where).free <= leave_free
        return where

    yield mount
    for m in mounted:
        subprocess.run(["umount", str(m)], check=False)


def test_distill_on_a_full_disk_is_one_line(small_disk, tiny_family, chat_data):
    """60m passes distill's free-space floor and holds a checkpoint's weights, then torch.save of the
    optimizer state fails: two chained RuntimeErrors ("iostream error", "unexpected pos"), a traceback."""
    disk = small_disk("60m")
    out = disk / "student"
    r = run_subprocess(
        "distill",
        "--student",
        tiny_family["short_cot"],
        "--data",
        chat_data["train"],
        "--out",
        out,
        "--max-steps",
        "2",
        "--save-steps",
        "1",
        "--batch-size",
        "2",
    )
    line = error_line(r.returncode, r.stderr, r.stdout)
    assert "no space left" in line and str(disk) in line and "free" in line and "--resume" in line, line
    assert not out.exists()


def test_distill_when_another_writer_fills_the_disk(small_disk, tiny_family, chat_data, monkeypatch):
    """No free-space check foresees another process filling the disk during training: the checkpoint's
    safetensors write then fails (SafetensorError "os error 28"). The check is skipped here to stand for
    that writer; the write and its failure are real."""
    import micota_merge.training.distill

    monkeypatch.setattr(micota_merge.training.distill, "check_free_space", lambda *a, **k: None)
    disk = small_disk("8m")
    out = disk / "student"
    line = refused_loosely(
        invoke(
            "distill",
            "--student",
            tiny_family["short_cot"],
            "--data",
            chat_data["train"],
            "--out",
            out,
            "--max-steps",
            "2",
            "--save-steps",
            "1",
            "--batch-size",
            "2",
        )
    )
    assert "no space left" in line and str(disk) in line and "free" in line, line
    assert not out.exists()


def test_eval_on_a_full_disk_is_one_line(small_disk, tiny_family):
    """lm-eval's response cache is sqlite: "database or disk is full" is no OSError, and sqlitedict
    logged it as well as raising it."""
    disk = small_disk("1m", leave_free=16 << 10)  # room for the cache's markers, not for its database
    out = disk / "ev"
    r = run_subprocess(
        "eval",
        "--model",
        tiny_family["short_cot"],
        "--tasks",
        "gsm8k",
        "--limit",
        "1",
        "--max-tokens",
        "4",
        "--dtype",
        "float32",
        "--output",
        out,
    )
    line = error_line(r.returncode, r.stderr, r.stdout)
    assert "no space left" in line and str(disk / ".ev.responses") in line and "free" in line, line
    assert "sqlite" not in r.stderr.lower().replace(line.lower(), ""), r.stderr
    assert not out.exists()


def test_eval_full_disk_from_sqlite_without_a_small_disk(tiny_family, tmp_path, monkeypatch):
    """The same refusal where no tmpfs can be mounted: sqlite's own error, raised where lm-eval's
    cache writes it."""
    import sqlite3

    import sqlitedict

    def full(self, *a, **k):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(sqlitedict.SqliteDict, "__setitem__", full)
    out = tmp_path / "ev"
    line = refused_loosely(
        invoke(
            "eval",
            "--model",
            tiny_family["short_cot"],
            "--tasks",
            "gsm8k",
            "--limit",
            "1",
            "--max-tokens",
            "4",
            "--dtype",
            "float32",
            "--output",
            out,
        )
    )
    assert "no space left" in line and str(tmp_path / ".ev.responses") in line and "free" in line, line
    assert not out.exists()


def test_oserror_enospc_says_to_free_space(tiny_family, tmp_path, small_disk):
    """A full disk at a plain write (here mix's output) names the path and says what to do."""
    disk = small_disk("64k", leave_free=0)
    data = tmp_path / "a.jsonl"
    rows = [
        {
            "id": f"q{i}",
            "messages": [{"role": "user", "content": "x" * 100}, {"role": "assistant", "content": "y" * 2000}],
        }
        for i in range(64)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = invoke("mix", f"{data}=1", "--out", disk / "mix.jsonl")
    line = refused_loosely(result)
    assert "no space left" in line.lower() and str(disk) in line and "free" in line, line


# ---------------------------------------------------------------- --debug and -v after the subcommand


def _commands(group, prefix=()):
    import click

    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, prefix + (name,))
        else:
            yield prefix + (name,), cmd


@pytest.mark.parametrize("path", [p for p, _ in _commands(cli)], ids=" ".join)
def test_every_command_takes_debug_and_verbose(path):
    cmd = dict(_commands(cli))[path]
    names = {p.name for p in cmd.params}
    assert {"debug", "verbose"} <= names, names
    assert "--debug" in invoke(*path, "--help").stdout


@pytest.mark.parametrize(
    "args",
    [
        ["build", "missing.yaml"],
        ["generate", "--model", "missing", "--questions", "gsm8k", "--decontaminate", "off", "--out", "o.jsonl"],
        ["demo", "standin", "--meta", "missing", "--out", "x"],
    ],
)
def test_debug_after_the_subcommand_shows_the_traceback(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    quiet = invoke(*args)
    assert quiet.exit_code == 2 and "error:" in quiet.stderr
    loud = invoke(*args, "--debug")
    assert loud.exit_code == 1 and isinstance(loud.exception, Exception), (loud.exit_code, loud.output)
    assert not isinstance(loud.exception, SystemExit)
    before = invoke("--debug", *args)
    assert type(before.exception) is type(loud.exception)


def test_verbose_after_the_subcommand_raises_the_log_level(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = logging.getLogger()
    level = root.level
    try:
        for flags, want in ((["-v"], logging.INFO), (["-vv"], logging.DEBUG), (["-v", "-v"], logging.DEBUG)):
            root.setLevel(logging.WARNING)
            invoke("build", "missing.yaml", *flags)
            assert root.level == want, flags
        root.setLevel(logging.WARNING)
        invoke("-v", "build", "missing.yaml", "-v")  # counted together
        assert root.level == logging.DEBUG
    finally:
        root.setLevel(level)


def test_debug_after_the_subcommand_in_a_real_process(tmp_path):
    r = run_subprocess("build", tmp_path / "missing.yaml", "--debug")
    assert r.returncode == 1 and "Traceback" in r.stderr and "UserError" in r.stderr, r.stderr
    r = run_subprocess("build", tmp_path / "missing.yaml")
    error_line(r.returncode, r.stderr, r.stdout)
