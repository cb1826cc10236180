"""Nothing of the user's is ever touched: the ownership rule, locks, names and early checks.

Each case of the data-safety review is reproduced here on real folders and real processes: a
stage creates what does not exist, resumes or replaces only what it wrote itself (its manifest
says so), refuses everything else with one line and exit 2, and two processes on one output
never mix.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from micota_merge.cli import cli
from micota_merge.core.errors import UserError

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "micota_merge.cli"]


def run(*args) -> tuple[int, str]:
    r = CliRunner().invoke(cli, [str(a) for a in args])
    return r.exit_code, r.output


def one_line_error(code: int, text: str, *needles: str) -> str:
    assert code == 2, text
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


def snapshot(*roots: Path) -> dict[str, str]:
    """Every path under the roots with its bytes' digest (folders and links marked): a change of one
    byte, a new file, or a removed one all show."""
    seen: dict[str, str] = {}
    for root in roots:
        items = [root] + (sorted(root.rglob("*")) if root.is_dir() and not root.is_symlink() else [])
        for p in items:
            if p.is_symlink():
                seen[str(p)] = "link:" + os.readlink(p)
            elif p.is_dir():
                seen[str(p)] = "dir"
            elif p.is_file():
                seen[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return seen


def write_recipe(path: Path, family: dict[str, Path], output: Path, **extra) -> Path:
    data = {
        "models": {r: str(p) for r, p in family.items()},
        "merge": {"method": "linear", "ratio": 0.5, "dtype": "float32"},
        "output": str(output),
        **extra,
    }
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def family(tiny_family, tmp_path) -> dict[str, Path]:
    """A private copy of the tiny checkpoints (tests here aim outputs at them)."""
    models = tmp_path / "models"
    for role, p in tiny_family.items():
        shutil.copytree(p, models / role)
    return {role: models / role for role in tiny_family}


# ---------------------------------------------------------------- the rule itself


def test_plain_names():
    from micota_merge.core.ownership import plain_name

    for ok in ("ta", "mix_long", "student+ta@seed1", "ratio-0.5-density-0.7", "a=b"):
        assert plain_name(ok, "name") == ok
    for bad in ("../../../escaped", "a/b", "..", ".", "", "/abs", "x" * 200, "a b", "~home"):
        with pytest.raises(UserError, match="plain name"):
            plain_name(bad, "name")


def test_protected_paths(tmp_path, monkeypatch):
    from micota_merge.core.ownership import protected_reason

    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    ckpt = tmp_path / "inputs" / "ckpt"
    ckpt.mkdir(parents=True)
    data = tmp_path / "inputs" / "q.jsonl"
    data.write_text("{}\n")
    hard = tmp_path / "hardlink.jsonl"
    os.link(data, hard)
    inputs = {"--model": ckpt, "--questions": data}
    cases = {
        "/": "root folder",
        home: "home folder",
        tmp_path: "holds your home folder",
        cwd: "current folder",
        ckpt: "is the input --model",
        tmp_path / "inputs": "holds the input",
        ckpt / "sub": "inside the input",
        data: "is the input --questions",
        hard: "is the input --questions",
    }
    for path, why in cases.items():
        assert why in (protected_reason(path, inputs) or ""), (path, protected_reason(path, inputs))
    assert protected_reason(tmp_path / "new-out", inputs) is None
    assert protected_reason(tmp_path / "inputs" / "other.jsonl", inputs) is None  # beside a file input: fine


def test_claim_states(tmp_path):
    from micota_merge.core.ownership import claim

    assert claim(tmp_path / "new", "build").state == "new"
    (tmp_path / "empty").mkdir()
    assert claim(tmp_path / "empty", "build").state == "empty"
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "micota.json").write_text(json.dumps({"stage": "build", "identity": "abc"}))
    c = claim(ours, "build")
    assert c.state == "ours" and c.same("abc") and not c.same("xyz")
    with pytest.raises(UserError, match="written by micota-merge build, not by eval"):
        claim(ours, "eval")  # another stage's output is not eval's to replace
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not written by micota-merge"):
        claim(foreign, "build")
    link = tmp_path / "link"
    link.symlink_to(ours)
    with pytest.raises(UserError, match="symbolic link"):
        claim(link, "build")
    f = tmp_path / "f.jsonl"
    f.write_text("x\n")
    with pytest.raises(UserError, match="not written by micota-merge generate"):
        claim(f, "generate", kind="file")


# ---------------------------------------------------------------- locks, with real processes


def lock_path(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    return path.parent / f".{path.name}.lock"


def _hold(path: Path, stage: str = "build", seconds: int = 60) -> subprocess.Popen:
    p = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import time\nfrom micota_merge.core.ownership import output_lock\n"
                f"with output_lock({str(path)!r}, {stage!r}):\n"
                f"    print('held', flush=True)\n    time.sleep({seconds})\n"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert p.stdout.readline().strip() == "held"
    return p


def test_lock_refuses_a_second_process_takes_over_a_dead_ones_and_leaves_nothing(tmp_path):
    from micota_merge.core.ownership import output_lock

    out = tmp_path / "ta"
    holder = _hold(out)
    try:
        with pytest.raises(UserError, match=f"another micota-merge process \\(pid {holder.pid}\\) is writing"):
            with output_lock(out, "build"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert lock_path(out).exists()  # a killed holder leaves its file; the OS dropped its lock
    notes = []
    with output_lock(out, "build", log=notes.append):
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
    assert notes and f"pid {holder.pid}" in notes[0] and "took over" in notes[0]
    assert not lock_path(out).exists()  # a clean exit removes it
    # a file of someone else's where the lock goes is refused, not overwritten
    lock_path(out).write_text("my notes")
    with pytest.raises(UserError, match="not a micota-merge lock"):
        with output_lock(out, "build"):
            pass
    assert lock_path(out).read_text() == "my notes"


def test_two_builds_at_once_one_writes(family, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", family, tmp_path / "ta")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [
        subprocess.Popen(
            CLI + ["build", str(recipe)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env
        )
        for _ in range(2)
    ]
    outs = [(p.wait(timeout=300), p.stdout.read()) for p in procs]
    written = [o for code, o in outs if "teacher assistant written" in o]
    assert len(written) == 1, outs
    for code, o in outs:
        if "teacher assistant written" not in o:
            assert (code == 2 and "another micota-merge process" in o) or (code == 0 and "already built" in o), o
    assert json.loads((tmp_path / "ta" / "micota.json").read_text())["stage"] == "build"
    assert not lock_path(tmp_path / "ta").exists()
    assert not list(tmp_path.glob(".ta.partial-*"))


def test_busy_outputs_refused_in_every_stage(family, chat_data, tmp_path):
    """build, distill --resume, eval, align, mix and a second `run` on a live work folder."""
    recipe = write_recipe(tmp_path / "r.yaml", family, tmp_path / "ta")
    student = family["short_cot"]
    pipeline = tmp_path / "p.yaml"
    write_recipe(
        pipeline,
        family,
        tmp_path / "work" / "ta",
        pipeline={"workdir": str(tmp_path / "work"), "student": str(student), "select": "build"},
    )
    cases = [
        (tmp_path / "ta", ["build", recipe]),
        (
            tmp_path / "s",
            [
                "distill",
                "--student",
                student,
                "--data",
                chat_data["train"],
                "--out",
                tmp_path / "s",
                "--resume",
                "--max-steps",
                "1",
            ],
        ),
        (tmp_path / "e", ["eval", "--model", student, "--tasks", "gsm8k", "--limit", "1", "-o", tmp_path / "e"]),
        (tmp_path / "a", ["align", "--model", student, "--data", chat_data["train"], "--out", tmp_path / "a"]),
        (tmp_path / "m.jsonl", ["mix", f"{chat_data['train']}=1", "--out", tmp_path / "m.jsonl"]),
        (tmp_path / "work", ["run", pipeline]),
    ]
    for busy, args in cases:
        holder = _hold(busy)
        try:
            one_line_error(*run(*args), f"another micota-merge process (pid {holder.pid})")
        finally:
            holder.kill()
            holder.wait()
        assert not busy.exists(), busy


# ---------------------------------------------------------------- the review's cases, one by one


def test_run_over_an_unrelated_folder_is_refused(family, tmp_path):
    victim = tmp_path / "thesis"
    victim.mkdir()
    (victim / "chapter1.tex").write_text("weeks of work")
    recipe = write_recipe(tmp_path / "r.yaml", family, victim)
    before = snapshot(victim)
    for flags in ([], ["--force"]):
        one_line_error(*run("run", recipe, *flags), str(victim), "not written by micota-merge")
        one_line_error(*run("build", recipe, *flags), str(victim), "not written by micota-merge")
    assert snapshot(victim) == before


def test_force_never_widens(family, tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("secret")
    monkeypatch.setenv("HOME", str(home))
    recipe = write_recipe(tmp_path / "r.yaml", family, tmp_path / "ta")
    before = snapshot(home, family["long_cot"].parent)
    for target, why in (
        (home, "home folder"),
        (family["long_cot"], "is the input long_cot"),
        (family["long_cot"].parent, "holds the input"),
        (family["long_cot"] / "sub", "inside the input"),
    ):
        line = one_line_error(*run("build", recipe, "-o", target, "--force"), why)
        assert "pass --force" not in line
    assert snapshot(home, family["long_cot"].parent) == before


def test_sidecars_and_work_folders_of_others_are_refused(family, chat_data, tmp_path):
    # a foreign OUT.correct.jsonl / OUT.stats.json beside a new generate output
    for side in ("q.correct.jsonl", "q.stats.json"):
        d = tmp_path / side
        d.mkdir()
        (d / side).write_text("mine")
        before = snapshot(d)
        one_line_error(
            *run(
                "generate",
                "--model",
                family["short_cot"],
                "--questions",
                "gsm8k",
                "--decontaminate",
                "off",
                "--limit",
                "1",
                "--max-tokens",
                "2",
                "--backend",
                "transformers",
                "--out",
                d / "q.jsonl",
            ),
            side,
        )
        assert snapshot(d) == before
    # a foreign <output>.sweep/ folder
    (tmp_path / "ta.sweep").mkdir()
    (tmp_path / "ta.sweep" / "results.csv").write_text("mine")
    recipe = write_recipe(
        tmp_path / "r.yaml",
        family,
        tmp_path / "ta",
        sweep={
            "ratios": [0.5],
            "probe": {"questions": "gsm8k-train", "limit": 1, "max_tokens": 2, "backend": "transformers"},
        },
    )
    before = snapshot(tmp_path / "ta.sweep")
    for flags in ([], ["--force"]):
        one_line_error(*run("sweep", recipe, *flags), "ta.sweep", "not made by micota-merge sweep")
    assert snapshot(tmp_path / "ta.sweep") == before and not (tmp_path / "ta").exists()
    # a foreign OUT.work/ folder beside a distill output
    (tmp_path / "s.work").mkdir()
    (tmp_path / "s.work" / "run.log").write_text("mine")
    before = snapshot(tmp_path / "s.work")
    for flags in ([], ["--force"]):
        one_line_error(
            *run(
                "distill",
                "--student",
                family["short_cot"],
                "--data",
                chat_data["train"],
                "--out",
                tmp_path / "s",
                "--max-steps",
                "1",
                *flags,
            ),
            "s.work",
        )
    assert snapshot(tmp_path / "s.work") == before and not (tmp_path / "s").exists()


def test_staging_look_alikes_are_not_removed(family, tmp_path):
    """Only marked staging folders of dead processes are cleaned; a look-alike name is someone's."""
    look_alike = tmp_path / ".ta.partial-999999"
    look_alike.mkdir()
    (look_alike / "data.bin").write_text("mine")
    # a backup of a TA under the trash name: it holds a micota.json, but no staging marker
    backup = tmp_path / ".ta.old-999999"
    backup.mkdir()
    (backup / "micota.json").write_text('{"stage": "build"}')
    recipe = write_recipe(tmp_path / "r.yaml", family, tmp_path / "ta")
    code, text = run("build", recipe)
    assert code == 0, text
    assert (look_alike / "data.bin").read_text() == "mine"
    assert (backup / "micota.json").read_text() == '{"stage": "build"}'
    # a marked staging folder of a dead process is ours and cleaned
    stale = tmp_path / ".ta.partial-999998"
    stale.mkdir()
    (stale / ".micota-staging.json").write_text("{}")
    assert run("build", recipe, "--ratio", "0.25", "--force")[0] == 0
    assert not stale.exists() and backup.is_dir()


def test_baseline_names_stay_inside_the_work_folder(family, tmp_path):
    pipeline = tmp_path / "p.yaml"
    write_recipe(
        pipeline,
        family,
        tmp_path / "work" / "ta",
        pipeline={
            "workdir": str(tmp_path / "work"),
            "student": str(family["short_cot"]),
            "select": "build",
            "baselines": [{"name": "../../../escaped", "mix": {"short_cot": 1}}],
        },
    )
    one_line_error(*run("run", pipeline), "name", "plain name")
    assert not (tmp_path / "work").exists() and not (tmp_path.parent.parent / "escaped").exists()


def test_checks_that_come_before_the_work(family, tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    recipe = write_recipe(tmp_path / "r.yaml", family, tmp_path / "ta")
    one_line_error(*run("build", recipe, "-o", ".", "--force"), "current folder")
    assert not list(cwd.iterdir()) and not list(tmp_path.glob(".*partial*"))
    (tmp_path / "real").mkdir()
    (tmp_path / "linked").symlink_to(tmp_path / "real")
    one_line_error(*run("build", recipe, "-o", tmp_path / "linked", "--force"), "symbolic link")
    one_line_error(*run("build", recipe, "--device", "tpu9"), "--device")
    assert not (tmp_path / "ta").exists()


def test_reruns_of_a_finished_output_say_so_and_exit_0(family, chat_data, tmp_path):
    student = family["short_cot"]
    recipe = write_recipe(tmp_path / "r.yaml", family, tmp_path / "ta")
    runs = {
        "build": (["build", recipe], "already built"),
        "mix": (["mix", f"{chat_data['train']}=1", "--out", tmp_path / "m.jsonl"], "already mixed"),
        "align": (
            ["align", "--model", student, "--data", chat_data["train"], "--limit", "2", "--out", tmp_path / "al"],
            "already measured",
        ),
        "distill": (
            [
                "distill",
                "--student",
                student,
                "--data",
                chat_data["train"],
                "--out",
                tmp_path / "s",
                "--max-steps",
                "1",
                "--limit",
                "4",
                "--max-length",
                "64",
            ],
            "already distilled",
        ),
        "demo": (["demo", "init", "--out", tmp_path / "demo"], "nothing to do"),
        "standin": (
            [
                "demo",
                "standin",
                "--meta",
                next(
                    p
                    for p in (REPO / "micota_merge" / "assets" / "model_meta").iterdir()
                    if (p / "config.json").is_file()
                ),
                "--out",
                tmp_path / "standin",
            ],
            "nothing to do",
        ),
        "generate": (
            [
                "generate",
                "--model",
                student,
                "--questions",
                "gsm8k",
                "--decontaminate",
                "off",
                "--limit",
                "2",
                "--max-tokens",
                "2",
                "--backend",
                "transformers",
                "--out",
                tmp_path / "g.jsonl",
            ],
            "nothing to do",
        ),
        "eval": (
            ["eval", "--model", student, "--tasks", "gsm8k", "--limit", "1", "--max-tokens", "2", "-o", tmp_path / "e"],
            "already evaluated",
        ),
    }
    for stage, (args, said) in runs.items():
        code, text = run(*args)
        assert code == 0, (stage, text)
        code, text = run(*args)
        assert code == 0 and said in text, (stage, text)


# ---------------------------------------------------------------- run --dry-run, run --force


def test_run_dry_run_plans_and_writes_nothing_then_force_starts_over(family, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", family, tmp_path / "ta")
    code, text = run("run", recipe, "--dry-run")
    assert code == 0 and "[plan] build: teacher assistant: would run" in text and "nothing was written" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "r.yaml"]
    assert run("run", recipe)[0] == 0
    code, text = run("run", recipe, "--dry-run")
    assert code == 0 and "[done] build" in text
    first = (tmp_path / "ta" / "micota.json").stat().st_ino
    code, text = run("run", recipe, "--force")
    assert code == 0 and "[redo] build" in text and (tmp_path / "ta" / "micota.json").stat().st_ino != first


# ---------------------------------------------------------------- free space, on a real small file system


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root): " + r.stderr.decode(errors="replace").strip())
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_sweep_checks_space_for_every_point_before_probing(family, small_disk, tmp_path):
    out = small_disk / "ta"
    recipe = write_recipe(
        tmp_path / "r.yaml",
        family,
        out,
        sweep={
            "ratios": [0.1, 0.3, 0.5, 0.7, 0.9],
            "probe": {"questions": "gsm8k-train", "limit": 1, "max_tokens": 2, "backend": "transformers"},
        },
    )
    code, text = run("sweep", recipe)
    line = one_line_error(code, text, "not enough disk space for the sweep", "5 points", "--ratios")
    assert "enough for" in line
    assert not (small_disk / "ta.sweep" / "short_cot.probe.jsonl").exists()  # refused before any probe
    assert not out.exists()


# ---------------------------------------------------------------- every stage against every protected path


def test_no_stage_touches_a_protected_path(family, chat_data, tmp_path, monkeypatch):
    """Each stage's output aimed, with and without --force, at a fake home with .ssh/, each input,
    the folder of the inputs, the current folder, a foreign non-empty folder, the questions file and
    the student: every one refused, and not one byte of any of them changed, added or removed."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("secret")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("MICOTA_CACHE", str(tmp_path / "cache"))  # our own cache folder is not the user's data
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "notes.md").write_text("mine")
    monkeypatch.chdir(cwd)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "results.csv").write_text("a,b\n1,2\n")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    questions = data_dir / "questions.jsonl"
    questions.write_text(json.dumps({"id": "q1", "question": "What is 2+3?", "answer": "5"}) + "\n")
    train = data_dir / "train.jsonl"
    shutil.copyfile(chat_data["train"], train)
    student = family["short_cot"]
    meta = next(p for p in (REPO / "micota_merge" / "assets" / "model_meta").iterdir() if (p / "config.json").is_file())
    targets = {
        "home": home,
        "long_cot": family["long_cot"],
        "base": family["base"],
        "student": student,
        "inputs' folder": family["long_cot"].parent,
        "cwd": cwd,
        "foreign": foreign,
        "questions": questions,
        "train data": train,
    }
    protected = [home, family["long_cot"].parent, cwd, foreign, data_dir]
    before = snapshot(*protected)

    def commands(t: Path, name: str) -> list[list]:
        bare = write_recipe(
            tmp_path / f"bare-{name}.yaml",
            family,
            t,
            sweep={
                "ratios": [0.5],
                "probe": {"questions": str(questions), "limit": 1, "max_tokens": 2, "backend": "transformers"},
            },
        )
        pipe = write_recipe(
            tmp_path / f"pipe-{name}.yaml",
            family,
            t / "ta",
            pipeline={"workdir": str(t), "student": str(student), "select": "build", "questions": str(questions)},
        )
        return [
            ["build", bare, "-o", t],
            ["sweep", bare],
            ["run", bare],
            ["run", pipe],
            [
                "generate",
                "--model",
                family["long_cot"],
                "--questions",
                questions,
                "--limit",
                "1",
                "--max-tokens",
                "2",
                "--backend",
                "transformers",
                "--out",
                t,
            ],
            ["mix", f"{train}=1", "--out", t],
            ["distill", "--student", student, "--data", train, "--out", t, "--max-steps", "1"],
            ["eval", "--model", student, "--tasks", "gsm8k", "--limit", "1", "-o", t],
            ["align", "--model", student, "--data", train, "--out", t],
            ["demo", "init", "--out", t],
            ["demo", "standin", "--meta", meta, "--out", t],
        ]

    for name, t in targets.items():
        for args in commands(t, name.replace(" ", "-").replace("'", "")):
            for flags in ([], ["--force"]):
                code, text = run(*args, *flags)
                assert code == 2 and "Traceback" not in text, (name, args, flags, text)
                assert str(t) in text, (name, args, flags, text)  # the refusal names the path
    after = snapshot(*protected)
    changed = sorted(set(before.items()) ^ set(after.items()))
    assert not changed, changed[:10]


def test_distill_checks_space_before_loading_the_student(family, chat_data, small_disk):
    out = small_disk / "student"
    code, text = run(
        "distill",
        "--student",
        family["short_cot"],
        "--data",
        chat_data["train"],
        "--out",
        out,
        "--max-steps",
        "1",
        "--dtype",
        "float32",
    )
    one_line_error(code, text, "not enough disk space", str(out))
    assert not list(small_disk.iterdir())


def test_distill_numbers_are_not_booleans(family, chat_data, tmp_path):
    cfg = tmp_path / "d.yaml"
    cfg.write_text(yaml.safe_dump({"epochs": True}))
    code, text = run(
        "distill",
        "--config",
        cfg,
        "--student",
        family["short_cot"],
        "--data",
        chat_data["train"],
        "--out",
        tmp_path / "s",
    )
    one_line_error(code, text, "epochs", "not true/false")
    assert not (tmp_path / "s").exists()
