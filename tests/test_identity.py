"""Content identity: every stage that decides "same input" decides by the bytes, never by path,
shape or header. Two fine-tunes of one architecture (tiny_family's long_cot and short_cot, whose
config.json and safetensors headers are identical) must never pass for each other."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from micota_merge.cli import cli
from micota_merge.core.checkpoints import read_checkpoint
from micota_merge.core.fingerprint import CACHE_NAME, checkpoint_fingerprint, content_id, hub_blob_digest

REPO = Path(__file__).resolve().parents[1]


def run(*args) -> tuple[int, str]:
    r = CliRunner().invoke(cli, [str(a) for a in args])
    return r.exit_code, r.output


def one_line_error(code: int, text: str, *needles: str) -> None:
    assert code == 2, text
    assert "Traceback" not in text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text
    for n in needles:
        assert n in errors[0], (n, errors[0])


def flip_one_weight(folder: Path) -> None:
    """Change one element of one tensor in place, leaving the file's size and header as they were."""
    f = next(folder.glob("*.safetensors"))
    data = bytearray(f.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    pos = 8 + header_len + 5  # a byte inside the first tensor's data
    data[pos] ^= 0x01
    f.write_bytes(bytes(data))


# ---------------------------------------------------------------- the fingerprint itself


def test_same_architecture_same_headers_different_content(tiny_family):
    long, short = read_checkpoint(tiny_family["long_cot"]), read_checkpoint(tiny_family["short_cot"])
    assert long.header_hashes == short.header_hashes and long.config_hash == short.config_hash
    assert content_id(tiny_family["long_cot"]) != content_id(tiny_family["short_cot"])


def test_one_flipped_weight_byte_changes_the_fingerprint(tiny_family, tmp_path):
    a = tmp_path / "a"
    shutil.copytree(tiny_family["long_cot"], a)
    before = checkpoint_fingerprint(a)
    assert before["content"] == content_id(tiny_family["long_cot"])  # content, not path
    header_before = read_checkpoint(a).header_hashes
    flip_one_weight(a)
    assert read_checkpoint(a).header_hashes == header_before  # what the old check saw: no change
    after = checkpoint_fingerprint(a)
    assert after["content"] != before["content"]
    changed = [n for n in after["files"] if after["files"][n] != before["files"][n]]
    assert changed == ["model.safetensors"]


def test_digests_are_cached_by_size_and_mtime(tiny_family, tmp_path, monkeypatch):
    import micota_merge.core.fingerprint as fpm

    a = tmp_path / "a"
    shutil.copytree(tiny_family["short_cot"], a)
    first = content_id(a)
    assert fpm.cache_file(a).is_file() and not (a / CACHE_NAME).exists()  # a user's folder is never written to
    hashed = []
    real = fpm.file_digest
    monkeypatch.setattr(fpm, "file_digest", lambda p: hashed.append(Path(p).name) or real(p))
    assert content_id(a) == first and hashed == []  # served from the cache
    st = (a / "model.safetensors").stat()
    os.utime(a / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert content_id(a) == first and hashed == ["model.safetensors"]  # re-hashed, same bytes, same id


def test_a_stale_cache_entry_is_never_trusted_over_a_changed_file(tiny_family, tmp_path):
    """A rebuilt file gets a new inode and mtime: the cached digest of the old one must not be served."""
    a = tmp_path / "a"
    shutil.copytree(tiny_family["short_cot"], a)
    first = content_id(a)
    other = tmp_path / "b"
    shutil.copytree(tiny_family["long_cot"], other)
    os.replace(other / "model.safetensors", a / "model.safetensors")
    assert content_id(a) == content_id(tiny_family["long_cot"]) != first


def test_hub_cache_blob_name_is_its_identity(tmp_path):
    blobs = tmp_path / "models--org--name" / "blobs"
    blobs.mkdir(parents=True)
    sha = "ab" * 32
    (blobs / sha).write_bytes(b"weights")
    snap = tmp_path / "models--org--name" / "snapshots" / "rev"
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to(blobs / sha)
    assert hub_blob_digest(snap / "model.safetensors") == f"sha256:{sha}"
    assert hub_blob_digest(blobs / sha) is None


def test_build_records_its_output_fingerprint(tiny_family, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "models": {k: str(v) for k, v in tiny_family.items()},
                "merge": {"method": "linear", "ratio": 0.5},
                "output": str(tmp_path / "ta"),
            }
        )
    )
    code, text = run("build", recipe)
    assert code == 0, text
    manifest = json.loads((tmp_path / "ta" / "micota.json").read_text())
    assert manifest["output"]["content"] == content_id(tmp_path / "ta")
    assert manifest["inputs"]["long_cot"]["content"] == content_id(tiny_family["long_cot"])
    assert manifest["inputs"]["long_cot"]["content"] != manifest["inputs"]["short_cot"]["content"]


# ---------------------------------------------------------------- resumes refuse another input


def test_generate_refuses_to_resume_from_a_ta_rebuilt_at_another_ratio(tiny_family, tmp_path):
    """build at 0.55, generate, build --ratio 0.3 --force into the same folder, generate a larger --limit:
    the file would mix two teachers, so it is refused and left as it was."""
    recipe = tmp_path / "r.yaml"
    ta = tmp_path / "ta"
    recipe.write_text(
        yaml.safe_dump(
            {
                "models": {k: str(v) for k, v in tiny_family.items()},
                "merge": {"method": "linear", "ratio": 0.55, "dtype": "float32"},
                "output": str(ta),
            }
        )
    )
    assert run("build", recipe)[0] == 0
    out = tmp_path / "ta.jsonl"
    gen = [
        "generate",
        "--model",
        ta,
        "--questions",
        "gsm8k",
        "--decontaminate",
        "off",
        "--max-tokens",
        "4",
        "--backend",
        "transformers",
        "--out",
        out,
    ]
    code, text = run(*gen, "--limit", "2")
    assert code == 0, text
    before = out.read_bytes()
    code, text = run("build", recipe, "--ratio", "0.3", "--force")
    assert code == 0, text
    code, text = run(*gen, "--limit", "4")
    one_line_error(code, text, "model content", "--force")
    assert out.read_bytes() == before
    code, text = run(*gen, "--limit", "4", "--force")
    assert code == 0, text
    assert len(out.read_text().splitlines()) == 4


def test_generate_refuses_a_changed_question_file(tiny_family, tmp_path):
    q = tmp_path / "q.jsonl"
    q.write_text(
        "".join(
            json.dumps({"id": f"q{i}", "question": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(3)
        )
    )
    out = tmp_path / "o.jsonl"
    gen = [
        "generate",
        "--model",
        tiny_family["short_cot"],
        "--questions",
        q,
        "--max-tokens",
        "4",
        "--backend",
        "transformers",
        "--out",
        out,
    ]
    assert run(*gen)[0] == 0
    q.write_text(q.read_text().replace('"answer": "2"', '"answer": "3"'))
    one_line_error(*run(*gen), "question file content")


def test_eval_interrupted_then_another_model_is_refused(tiny_family, tmp_path, monkeypatch):
    """eval A, interrupted with its responses cached; eval B (same architecture) into the same folder
    must not be scored with A's cached answers."""
    import micota_merge.evaluation.evaluate as ev

    out = tmp_path / "run"
    args = ["eval", "--tasks", "gsm8k", "--limit", "2", "--max-tokens", "8", "--dtype", "float32", "-o", out]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(ev, "audit_samples", interrupted)
        code, text = run(*args, "--model", tiny_family["long_cot"])
        assert code == 130, text
    cache = tmp_path / ".run.responses"
    assert (cache / "identity.json").is_file() and not out.exists()
    code, text = run(*args, "--model", tiny_family["short_cot"])
    one_line_error(code, text, "model content", "--force")
    assert not out.exists()
    # the same model resumes, and scores what an uninterrupted run scores
    code, text = run(*args, "--model", tiny_family["long_cot"])
    assert code == 0, text
    fresh = tmp_path / "fresh"
    assert run(*args[:-1], fresh, "--model", tiny_family["long_cot"])[0] == 0
    resumed_samples = [
        json.loads(x)["resps"] for f in sorted(out.glob("samples_*.jsonl")) for x in f.read_text().splitlines()
    ]
    fresh_samples = [
        json.loads(x)["resps"] for f in sorted(fresh.glob("samples_*.jsonl")) for x in f.read_text().splitlines()
    ]
    assert resumed_samples == fresh_samples and len(resumed_samples) == 2
    assert not cache.exists()  # a finished run leaves no cache behind
    # --force discards another model's cache and scores the model asked for
    with monkeypatch.context() as m:
        m.setattr(ev, "audit_samples", interrupted)
        assert run(*args[:-1], tmp_path / "r2", "--model", tiny_family["long_cot"])[0] == 130
    code, text = run(*args[:-1], tmp_path / "r2", "--model", tiny_family["short_cot"], "--force")
    assert code == 0, text
    summary = json.loads((tmp_path / "r2" / "summary.json").read_text())
    assert summary["model"] == str(tiny_family["short_cot"])


def test_distill_resume_refuses_another_student(tiny_family, chat_data, tmp_path):
    from micota_merge.core.errors import UserError
    from micota_merge.training.distill import DistillConfig, distill

    student = tmp_path / "student"
    shutil.copytree(tiny_family["short_cot"], student)
    out = tmp_path / "out"
    kw = dict(
        data=[str(chat_data["train"])],
        out=str(out),
        max_steps=2,
        save_steps=1,
        batch_size=2,
        keep_checkpoints=True,
        logging_steps=1,
    )
    distill(DistillConfig(student=str(student), **kw), echo=lambda s: None)
    shutil.rmtree(out)  # as if killed after its checkpoints: OUT.work/ holds them
    shutil.rmtree(student)
    shutil.copytree(tiny_family["long_cot"], student)  # same path, same shapes, other weights
    with pytest.raises(UserError, match="student"):
        distill(DistillConfig(student=str(student), resume=True, **kw), echo=lambda s: None)


def test_sweep_refuses_a_finished_sweep_of_other_inputs(tiny_family, tmp_path):
    from micota_merge.core.errors import UserError
    from micota_merge.merge.sweep.run import SweepOptions, sweep

    models = tmp_path / "models"
    for role, path in tiny_family.items():
        shutil.copytree(path, models / role)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "models": {r: str(models / r) for r in tiny_family},
                "merge": {"method": "linear", "dtype": "float32"},
                "output": str(tmp_path / "ta"),
                "sweep": {
                    "ratios": [0.25, 0.75],
                    "probe": {"questions": "gsm8k-train", "limit": 2, "max_tokens": 4, "backend": "transformers"},
                    "min_accuracy": 0.0,
                    "max_truncated": 1.0,
                },
            }
        )
    )  # random models: no floor to reach
    first = sweep(SweepOptions(recipe=str(recipe), keep_all=True), echo=lambda s: None)
    again = sweep(SweepOptions(recipe=str(recipe)), echo=lambda s: None)
    assert again == first  # done, same content: reported, not redone
    # how probes would travel (replicas, servers) is not what they answer: still the same sweep
    assert sweep(SweepOptions(recipe=str(recipe), data_parallel_size=2), echo=lambda s: None) == first
    flip_one_weight(models / "long_cot")
    with pytest.raises(UserError, match="input content"):
        sweep(SweepOptions(recipe=str(recipe)), echo=lambda s: None)
    redone = sweep(SweepOptions(recipe=str(recipe), force=True, keep_all=True), echo=lambda s: None)
    work = tmp_path / "ta.sweep"
    manifest = json.loads((work / "ratio-0.75" / "micota.json").read_text())
    assert manifest["inputs"]["long_cot"]["content"] == content_id(models / "long_cot")  # rebuilt, not reused
    long_probe = json.loads((work / "long_cot.stats.json").read_text())
    assert long_probe["model_content"] == content_id(models / "long_cot")  # re-probed
    assert redone["identity"]["inputs"]["long_cot"] != first["identity"]["inputs"]["long_cot"]


# ---------------------------------------------------------------- run validates before it starts


def _pipeline(tiny_family, tmp_path, **pipeline) -> Path:
    data = {
        "models": {k: str(v) for k, v in tiny_family.items()},
        "merge": {"method": "linear", "ratio": 0.5},
        "output": str(tmp_path / "ta"),
        "pipeline": {
            "workdir": str(tmp_path / "w"),
            "student": str(tiny_family["short_cot"]),
            "select": "build",
            "questions": "gsm8k-train",
            "question_limit": 2,
            "generate": {"max_tokens": 4, "backend": "transformers"},
            **pipeline,
        },
    }
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    "change, needles",
    [
        ({"distill": {"learning_rate": 1e-5}}, ["pipeline.distill", "'learning_rate'", "did you mean 'lr'"]),
        ({"distill": {"max_steps": 0}}, ["pipeline.distill", "max_steps"]),
        ({"generate": {"max_token": 4}}, ["pipeline.generate", "did you mean 'max_tokens'"]),
        ({"eval": {"tasks": "gsm8k,aime25"}}, ["pipeline.eval.tasks", "aime25"]),
        ({"eval": {"limt": 2}}, ["pipeline.eval", "did you mean 'limit'"]),
        ({"student": "no/such/student"}, ["pipeline.student"]),
        ({"student": "EMPTY"}, ["pipeline.student", "config.json"]),
        ({"questions": "NOANSWER"}, ["pipeline.questions", "--answer-field"]),
    ],
)
def test_run_refuses_a_bad_pipeline_before_the_first_stage(tiny_family, tmp_path, change, needles):
    if change.get("student") == "EMPTY":
        (tmp_path / "empty").mkdir()
        change = {"student": str(tmp_path / "empty")}
    if change.get("questions") == "NOANSWER":
        q = tmp_path / "q.jsonl"
        q.write_text(json.dumps({"question": "What is 1 + 1?", "note": "no gold"}) + "\n")
        change = {"questions": str(q)}
    path = _pipeline(tiny_family, tmp_path, **change)
    t0 = time.time()
    code, text = run("run", path)
    one_line_error(code, text, *needles)
    assert time.time() - t0 < 30
    assert not (tmp_path / "ta").exists() and not (tmp_path / "w").exists()  # nothing ran


def test_run_refuses_from_after_until(tiny_family, tmp_path):
    code, text = run("run", _pipeline(tiny_family, tmp_path), "--from", "eval", "--until", "generate")
    one_line_error(code, text, "--from eval", "--until generate")


# ---------------------------------------------------------------- clean errors for what users hit


@pytest.fixture
def a_file(tmp_path) -> Path:
    f = tmp_path / "plain.txt"
    f.write_text("x")
    return f


def test_outputs_that_cannot_be_written(tiny_family, chat_data, tmp_path, a_file):
    model = tiny_family["short_cot"]
    gen = ["generate", "--model", model, "--questions", "gsm8k", "--decontaminate", "off"]
    cases = [
        ([*gen, "--out", a_file / "o.jsonl"], "is a file"),
        (
            [*gen, "--out", "/proc/micota/o.jsonl"],
            "cannot write",
        ),
        (["eval", "--model", model, "--tasks", "gsm8k", "-o", a_file / "run"], "is a file"),
        (["distill", "--student", model, "--data", chat_data["train"], "--out", a_file / "m"], "is a file"),
        (["mix", f"{chat_data['train']}=1", "--out", a_file / "m.jsonl"], "is a file"),
        (["align", "--model", model, "--data", chat_data["train"], "--out", "/proc/micota/al"], "cannot write"),
    ]
    for args, needle in cases:
        one_line_error(*run(*args), needle)


def test_a_folder_where_a_file_is_expected(tiny_family, tmp_path):
    (tmp_path / "o.jsonl").mkdir()
    one_line_error(
        *run(
            "generate",
            "--model",
            tiny_family["short_cot"],
            "--questions",
            "gsm8k",
            "--decontaminate",
            "off",
            "--out",
            tmp_path / "o.jsonl",
        ),
        "is a folder",
    )
    one_line_error(
        *run("distill", "--student", tiny_family["short_cot"], "--data", tmp_path, "--out", tmp_path / "m"),
        "is a folder",
    )


def test_eval_refuses_a_model_without_a_chat_template(tiny_family, tmp_path):
    m = tmp_path / "bare"
    shutil.copytree(tiny_family["short_cot"], m)
    (m / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((m / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (m / "tokenizer_config.json").write_text(json.dumps(cfg))
    one_line_error(*run("eval", "--model", m, "--tasks", "gsm8k", "-o", tmp_path / "r"), "chat template")


def test_generate_refuses_questions_without_answers(tiny_family, tmp_path):
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question": "What is 1 + 1?"}) + "\n")
    one_line_error(
        *run("generate", "--model", tiny_family["short_cot"], "--questions", q, "--out", tmp_path / "o.jsonl"),
        "no gold answers",
        "--answer-field",
    )
    q.write_text(json.dumps({"question": "1 + 1?", "answer": "2"}) + "\n" + json.dumps({"question": "2+2?"}) + "\n")
    one_line_error(
        *run("generate", "--model", tiny_family["short_cot"], "--questions", q, "--out", tmp_path / "o.jsonl"),
        "1 of 2",
        "row 2",
    )
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["generate", "--questions", "gsm8k", "--decontaminate", "off", "--limit", "0"], "--limit"),
        (["generate", "--questions", "gsm8k", "--decontaminate", "off", "--max-tokens", "40000"], "context"),
        (["distill", "--data", "DATA", "--max-length", "0"], "--max-length"),
        (["distill", "--data", "DATA", "--max-steps", "0"], "--max-steps"),
        (["distill", "--data", "DATA", "--limit", "0"], "--limit"),
        (["eval", "--tasks", "gsm8k", "--limit", "0"], "--limit"),
        (["eval", "--tasks", "gsm8k", "--max-tokens", "40000"], "context"),
        (["align", "--data", "DATA", "--limit", "0"], "--limit"),
    ],
)
def test_bad_numbers_are_one_line(tiny_family, chat_data, tmp_path, args, needle):
    args = [str(chat_data["train"]) if a == "DATA" else a for a in args]
    flag = {"generate": "--model", "eval": "--model", "distill": "--student", "align": "--model"}[args[0]]
    out_flag = {
        "generate": ["--out", tmp_path / "o.jsonl"],
        "eval": ["-o", tmp_path / "r"],
        "distill": ["--out", tmp_path / "m"],
        "align": [],
    }[args[0]]
    one_line_error(*run(*args, flag, tiny_family["short_cot"], *out_flag), needle)


def test_n_samples_with_greedy_decoding_warns(tiny_family, tmp_path):
    code, text = run(
        "generate",
        "--model",
        tiny_family["short_cot"],
        "--questions",
        "gsm8k",
        "--decontaminate",
        "off",
        "--limit",
        "1",
        "--n",
        "2",
        "--max-tokens",
        "4",
        "--backend",
        "transformers",
        "--out",
        tmp_path / "o.jsonl",
    )
    assert code == 0, text
    assert "--n 2 with temperature 0" in text


def test_compare_warns_when_runs_differ_in_settings():
    from micota_merge.evaluation.compare import compare_warnings

    a = {"tasks": {"gsm8k": {"n": 4}, "math500": {"n": 4}}, "limit": 4, "max_tokens": 64, "backend": "hf"}
    b = {"tasks": {"gsm8k": {"n": 2}}, "limit": 2, "max_tokens": 64, "backend": "hf"}
    warnings = compare_warnings(["A", "B"], [a, b])
    assert any("different tasks" in w for w in warnings)
    assert any("gsm8k" in w and "A: 4" in w and "B: 2" in w for w in warnings)
    assert any("limit" in w for w in warnings)
    assert not any("max_tokens" in w or "backend" in w for w in warnings)
    assert compare_warnings(["A", "A2"], [a, dict(a)]) == []


def test_one_rule_says_what_changed():
    """micota_merge.core.identity: every resume, cache and skip names a change the same way."""
    from micota_merge.core.identity import changed, describe, digest

    old = {"model_content": "a", "seed": 0, "prompt": {"x": [1, 2]}}
    new = {"model_content": "a", "seed": 1, "prompt": {"x": [1, 2]}}
    assert changed(old, new) == ["seed"] and changed(None, new) == list(new)
    assert describe(old, new, {"seed": "seed (--seed)"}, values=True) == "seed (--seed): was 0, now 1"
    assert digest({"b": 1, "a": [1]}) == digest({"a": [1], "b": 1}) != digest({"a": [1], "b": 2})
