"""One options model per stage: the flags, their help and defaults come from the model, the pipeline's
sections and the sweep's probe validate through the same model, and code that needs a stage's default
reads the model instead of repeating it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from micota_merge.cli import cli
from micota_merge.core.options import default_of, flag_name, ordered_fields, resolve, transport_fields
from micota_merge.data.export import ExportOptions
from micota_merge.data.mix import MixOptions
from micota_merge.evaluation.evaluate import EvalOptions
from micota_merge.generation.options import GenerateOptions, ServerOptions, VllmOptions
from micota_merge.merge.build import BuildOptions
from micota_merge.merge.recipe import Probe
from micota_merge.merge.sweep.run import SweepOptions
from micota_merge.pipeline.run import RunOptions
from micota_merge.training.align import AlignOptions
from micota_merge.training.distill import DistillConfig

# (command, its model, the fields that are positional arguments instead of flags)
STAGES = [
    ("build", BuildOptions, ("recipe",)),
    ("sweep", SweepOptions, ("recipe",)),
    ("generate", GenerateOptions, ()),
    ("mix", MixOptions, ("parts",)),
    ("distill", DistillConfig, ()),
    ("eval", EvalOptions, ()),
    ("align", AlignOptions, ()),
    ("run", RunOptions, ("pipeline",)),
    ("export", ExportOptions, ("data",)),
]


def help_text(command: str) -> str:
    r = CliRunner().invoke(cli, [command, "--help"], terminal_width=1000)
    assert r.exit_code == 0, r.output
    return re.sub(r"\s+", " ", r.output.rsplit("Options:", 1)[1])  # the options, not the examples above them


@pytest.mark.parametrize("command, model, positional", STAGES, ids=[s[0] for s in STAGES])
def test_every_field_is_a_flag_with_the_models_default(command, model, positional):
    import click

    cmd = cli.commands[command]
    ctx = click.Context(cmd, info_name=command)
    records = {p.name: p.get_help_record(ctx) for p in cmd.params if isinstance(p, click.Option)}
    help_text(command)  # --help renders (exit 0)
    for name, field in model.model_fields.items():
        if name in positional:
            continue
        assert name in records, f"{command} has no flag for {name}"
        decl, text = records[name]
        spelled = (field.json_schema_extra or {}).get("cli", {}).get("name", name)  # run's --from
        assert flag_name(spelled) in decl, (command, name, decl)
        assert (field.description or "").split(".")[0] in text  # the field's own help
        default = default_of(model, name)
        if default not in (None, [], "", False, True) and not field.is_required():
            assert f"[default: {default}]" in text, (command, name, text)


def test_flags_that_exist_only_on_the_command_line_are_few():
    """Only what is not a stage option (eval's --compare, --config, logging) is declared by hand."""
    extra = {"compare", "config_file", "debug", "verbose", "runs"}
    for command, model, positional in STAGES:
        params = {p.name for p in cli.commands[command].params}
        assert params - set(model.model_fields) <= extra, (command, params - set(model.model_fields))
        assert set(model.model_fields) <= params, (command, set(model.model_fields) - params)


def test_shared_groups_are_declared_once():
    # generate and eval take the servers' and vLLM's options from one declaration each
    for name in ServerOptions.model_fields:
        assert GenerateOptions.model_fields[name].default == EvalOptions.model_fields[name].default
    assert set(VllmOptions.model_fields) <= set(GenerateOptions.model_fields) & set(EvalOptions.model_fields)
    # code that must agree with the CLI reads the model's default instead of repeating it
    from micota_merge.generation.backends import EvalJob
    from micota_merge.generation.servers.client import Client

    c = Client(["http://127.0.0.1:1/v1"], "m")
    assert (c.concurrency, c.retries, c.timeout) == (
        default_of(ServerOptions, "concurrency"),
        default_of(ServerOptions, "retries"),
        default_of(ServerOptions, "request_timeout"),
    )
    job = EvalJob(model_path=None, gpu_memory_utilization=0.9)
    assert job.concurrency == default_of(EvalOptions, "concurrency")
    assert job.request_timeout == default_of(EvalOptions, "request_timeout")
    # the transport options (left out of "same input") are marked on the fields themselves
    assert set(transport_fields(GenerateOptions)) == set(ServerOptions.model_fields) | {"data_parallel_size"}
    assert set(transport_fields(EvalOptions)) == set(transport_fields(GenerateOptions))


def test_the_models_own_fields_come_first_in_help():
    order = ordered_fields(GenerateOptions)
    assert order[:3] == ["model", "questions", "out"] and order[-1] == "request_timeout"


def test_precedence_default_then_config_then_flag(tmp_path):
    config = tmp_path / "gen.yaml"
    config.write_text(yaml.safe_dump({"max-tokens": 100, "temperature": 0.6, "model": "m"}))
    opts = resolve(GenerateOptions, {"temperature": 0.2, "questions": "q", "out": "o.jsonl"}, str(config))
    assert (opts.max_tokens, opts.temperature, opts.top_p) == (100, 0.2, 1.0)


def test_generate_reads_a_config_file(tiny_family, tmp_path):
    """`generate --config` as `distill --config`: the file's options, a flag winning over it."""
    config = tmp_path / "gen.yaml"
    config.write_text(yaml.safe_dump({"max_tokens": 3, "limit": 2, "backend": "transformers"}))
    out = tmp_path / "g.jsonl"
    r = CliRunner().invoke(
        cli,
        ["generate", "--config", str(config), "--model", str(tiny_family["short_cot"])]
        + ["--questions", "gsm8k", "--decontaminate", "off", "--out", str(out), "--limit", "1"],
    )
    assert r.exit_code == 0, r.output
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(records) == 1 and all(rec["num_tokens"] <= 3 for rec in records)
    meta = json.loads(out.with_name(out.name + ".meta.json").read_text())
    assert meta["settings"]["max_tokens"] == 3


@pytest.mark.parametrize(
    "args, needle",
    [
        (["sweep", "R", "--ratios", "0,x"], "--ratios"),
        (["eval", "--model", "M", "--batch-size", "many"], "--batch-size"),
        (["eval", "--model", "M", "--gpu-memory-utilization", "2"], "--gpu-memory-utilization"),
        (["generate", "--model", "M", "--questions", "q", "--out", "o", "--prompt", "no slot"], "--prompt"),
        (["generate", "--model", "M", "--questions", "q", "--out", "o", "--concurrency", "0"], "--concurrency"),
        (["align", "--model", "M", "--data", "d", "--batch-size", "0"], "--batch-size"),
    ],
)
def test_a_bad_flag_is_one_line_naming_it(tmp_path, args, needle):
    r = CliRunner().invoke(cli, [a.replace("R", str(tmp_path / "r.yaml")) if a == "R" else a for a in args])
    errors = [x for x in r.output.splitlines() if x.startswith("error:")]
    assert r.exit_code == 2 and len(errors) == 1 and needle in errors[0], r.output


def test_probe_is_generates_options_with_a_probes_defaults(caplog):
    own = {"held_out", "allow_test_split", "chat_template_kwargs_by_side"}
    assert set(Probe.model_fields) - own <= set(GenerateOptions.model_fields)
    p = Probe()
    assert (p.limit, p.max_tokens, p.questions) == (64, 4096, None)  # None: the sweep's choice (probe_plan)
    assert p.dtype == default_of(GenerateOptions, "dtype")  # not re-declared: generate's own default
    # the key users wrote before `questions:` took both shipped sets and files
    with caplog.at_level("WARNING"):
        assert Probe.model_validate({"benchmark": "math500"}).questions == "math500"
    assert "sweep.probe.benchmark is deprecated" in caplog.text
    assert Probe.model_validate({"benchmark": "math500", "questions": "q.jsonl"}).questions == "q.jsonl"


class _Stop(Exception):
    pass


@pytest.fixture
def probe_spy(monkeypatch) -> dict:
    """generate as the sweep's probe calls it, stopped at the call: {"opts": the GenerateOptions it got}."""
    from micota_merge.generation import generate as gen

    seen: dict = {}

    def fake_generate(opts, echo=print):
        seen["opts"] = opts
        raise _Stop

    monkeypatch.setattr(gen, "generate", fake_generate)
    monkeypatch.setattr(gen, "written_with", lambda out, settings: False)
    monkeypatch.setattr(gen, "_settings", lambda opts, model, prompt: {})
    monkeypatch.setattr("micota_merge.core.fingerprint.content_id", lambda path: "x")
    return seen


def test_the_probe_hands_every_field_to_generate(probe_spy, tmp_path):
    """A probe setting reaches generate unchanged: no field is copied by hand, so none can be dropped."""
    from micota_merge.merge.recipe import SweepSettings
    from micota_merge.merge.sweep import run as sweep_run

    probe = {
        "questions": "math500",
        "limit": 3,
        "max_tokens": 77,
        "batch_size": 5,
        "prompt": "Q: {question}",
        "tensor_parallel_size": 2,
        "max_model_len": 999,
        "enforce_eager": True,
        "serve_args": "--x 1",
        "data_parallel_size": 3,
        "dtype": "bfloat16",
        "backend": "transformers",
    }
    settings = SweepSettings.model_validate({"probe": {**probe, "allow_test_split": True}})
    plan = {"questions": "math500", "offset": 5, "decontaminate": "off", "decontaminate_against": ["aime24"]}
    with pytest.raises(_Stop):
        sweep_run._probe(tmp_path / "m", "long_cot", tmp_path, settings, {**plan, "statement": ""}, echo=print)
    opts = probe_spy["opts"]
    for key, value in {**probe, **plan}.items():
        assert getattr(opts, key) == value, key
    assert (opts.keep, opts.temperature) == ("all", 0.0)


@pytest.mark.parametrize(
    "name,expected",
    [("long_cot", {"enable_thinking": True}), ("short_cot", {"enable_thinking": False}), ("r0.5", {"x": 1})],
)
def test_each_probed_model_gets_its_sides_template_switches(probe_spy, tmp_path, name, expected):
    """A hybrid short side answers without thinking, the long side with it, every TA as the recipe says."""
    from micota_merge.merge.recipe import SweepSettings
    from micota_merge.merge.sweep import run as sweep_run

    probe = {
        "questions": "q.jsonl",
        "chat_template_kwargs": {"x": 1},
        "chat_template_kwargs_by_side": {
            "long_cot": {"enable_thinking": True},
            "short_cot": {"enable_thinking": False},
        },
    }
    settings = SweepSettings.model_validate({"probe": probe})
    plan = {"questions": "q.jsonl", "offset": 0, "decontaminate": "off", "decontaminate_against": [], "statement": ""}
    with pytest.raises(_Stop):
        sweep_run._probe(tmp_path / "m", name, tmp_path, settings, plan, echo=print)
    assert probe_spy["opts"].chat_template_kwargs == expected


def _pipeline(tiny_family, tmp_path: Path, eval_section: dict) -> Path:
    data = {
        "models": {k: str(tiny_family[k]) for k in ("long_cot", "short_cot", "base")},
        "merge": {"method": "linear", "ratio": 0.5, "dtype": "float32"},
        "output": str(tmp_path / "ta"),
        "pipeline": {
            "workdir": str(tmp_path / "work"),
            "student": str(tiny_family["short_cot"]),
            "select": "build",
            "question_limit": 2,
            "eval": eval_section,
        },
    }
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    "section, needle",
    [
        ({"concurrency": True}, "concurrency"),
        ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
        ({"output": "x"}, "eval.output is set by the pipeline"),
        ({"protocol": "r2"}, "protocol"),
        ({"dtype": "fp8"}, "dtype"),
    ],
)
def test_the_pipelines_eval_section_is_evals_options(tiny_family, tmp_path, section, needle):
    r = CliRunner().invoke(cli, ["run", str(_pipeline(tiny_family, tmp_path, section)), "--dry-run"])
    errors = [x for x in r.output.splitlines() if x.startswith("error:")]
    assert r.exit_code == 2 and len(errors) == 1 and needle in errors[0], r.output
    assert not (tmp_path / "work").exists()
