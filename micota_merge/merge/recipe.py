"""The recipe: one YAML file that says which checkpoints to merge, how, and where to.

Pydantic models whose validators raise ValueError, so every error carries its field path
(`merge.ratio`), and unknown keys are answered with the closest valid one. `to_mergekit()`
turns a recipe into the mergekit configuration it means; a plain mergekit YAML (one with
`merge_method`) is accepted as a recipe too.

Ratio semantics (λ = `merge.ratio`, the share of the long-CoT side):
  linear / slerp:        λ·long_cot + (1−λ)·short_cot
  task-vector methods:   base + merge of λ·(long_cot − base) and (1−λ)·(short_cot − base),
                         with the method's own trimming / dropping and sign rules.
  over short_cot itself  (`models.base: short_cot`, MiCoTA's chain): short_cot's task vector is zero
                         and left out; the pre-flight (`preflight.zero_task_vector`) says what the
                         method then computes.
What each method takes (a base, a density, which parameters) is the method table, `methods.py`.
"""

from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from micota_merge.core.errors import UserError
from micota_merge.core.options import WEIGHT_DTYPES
from micota_merge.core.strict import Float, Int, not_bool
from micota_merge.generation.options import ProbeOptions
from micota_merge.merge import methods
from micota_merge.merge.aim import AimSettings

log = logging.getLogger(__name__)

Role = Literal["long_cot", "short_cot", "base"]

# The methods as the table (methods.py) holds them at import; validation reads the table itself.
METHODS = methods.names()
DTYPES = WEIGHT_DTYPES


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Models(_Strict):
    long_cot: Optional[str] = Field(
        None,
        description="Long-CoT checkpoint (e.g. DeepSeek-R1-Distill-Qwen-7B): hub id or folder; left out when "
        "pipeline.chain makes it (short_cot fine-tuned on a teacher's long CoT)",
    )
    short_cot: str = Field(description="Short-CoT checkpoint (e.g. Qwen2.5-7B-Instruct): hub id or folder")
    base: Optional[str] = Field(
        None,
        description="Shared base model; required by task-vector methods. `short_cot` (the word) merges over the "
        "short-CoT checkpoint itself: its task vector is zero and the TA is short_cot + the long side's",
    )

    def base_is_short_cot(self) -> bool:
        return self.base is not None and self.base in ("short_cot", self.short_cot)


class MergeSettings(BaseModel):
    # extra="allow": method-specific mergekit parameters pass through, checked in the validator.
    model_config = ConfigDict(extra="allow", validate_assignment=True)

    method: str = Field("dare_ties", description="mergekit method: " + ", ".join(METHODS))
    ratio: Float = Field(0.5, description="share of the long-CoT side, 0..1")
    density: Optional[Float] = Field(None, description="fraction of each task vector kept (ties/dare/...)")
    seed: Int = Field(0, description="seed for DARE's random drop: same seed, same bits")
    dtype: str = Field("bfloat16", description="dtype of the merge and of the written weights")
    aim: Optional[AimSettings] = Field(
        None,
        description="AIM (arXiv 2502.02421) after the merge: each update from models.base relaxed per input "
        "channel by the base's activations on calibration texts ({omega: 0.4} is the Long-to-Short study's AIM-TIES)",
    )

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        valid = methods.names()
        if v not in valid:
            close = difflib.get_close_matches(v, valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown method {v!r}{hint} Valid methods: {', '.join(valid)}")
        return v

    @field_validator("ratio")
    @classmethod
    def _ratio_range(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"ratio must be between 0 and 1 (the long-CoT share), got {v}")
        return v

    @field_validator("density")
    @classmethod
    def _density_range(cls, v: Optional[float]) -> Optional[float]:
        if v is not None and not 0.0 < v <= 1.0:
            raise ValueError(f"density must be in (0, 1] (the fraction of each task vector kept), got {v}")
        return v

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        if v not in DTYPES:
            raise ValueError(f"unknown dtype {v!r}; use one of {', '.join(DTYPES)}")
        return v

    @model_validator(mode="after")
    def _passthrough(self) -> "MergeSettings":
        spec = methods.get(self.method)
        allowed = spec.params
        for key in self.model_extra or {}:
            if key not in allowed:
                valid = sorted(set(type(self).model_fields) | allowed)
                close = difflib.get_close_matches(key, valid, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ValueError(f"unknown key {key!r} for method {self.method}: {hint}valid keys: {', '.join(valid)}")
            value = self.model_extra[key]
            if key in spec.numeric and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(
                    f"{key!r} is passed to mergekit as a number: a number is needed here, not "
                    f"{'true/false' if isinstance(value, bool) else repr(value)}"
                )
        return self

    @property
    def extra_params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Probe(ProbeOptions):
    """The sweep's probe: `generate`'s options for one model answering a question set (declared once, in
    generation/options.py), with a probe's own defaults: a short, greedy look at many checkpoints.

    Each probed model (every ratio's TA, both experts) is a different checkpoint, so servers started
    beforehand cannot serve them: with vllm, data_parallel_size / serve_args start `vllm serve` per probe."""

    questions: Optional[str] = Field(
        None,
        description="question set to probe with: a shipped set or a JSONL file (default: pipeline.questions "
        "in a pipeline, else gsm8k-train); never a benchmark the students are scored on, unless allow_test_split",
    )
    held_out: bool = Field(
        True,
        description="probing pipeline.questions: the questions after the pipeline.question_limit that generate "
        "answers (a held-out slice); false: the first ones, which generate answers too",
    )
    allow_test_split: bool = Field(
        False,
        description="probe on a benchmark the students are scored on, on purpose (the TA is then chosen on "
        "that test set, and its scores there are no longer a clean measure)",
    )
    chat_template_kwargs_by_side: dict[Literal["long_cot", "short_cot", "ta"], dict[str, Any]] = Field(
        default_factory=dict,
        description="chat template switches per probed model, over chat_template_kwargs: e.g. a hybrid short side "
        "without thinking, {short_cot: {enable_thinking: false}}; `ta` is every merged point",
    )
    limit: Int = Field(64, ge=1, description="probe questions")
    max_tokens: Int = Field(4096, ge=1, description="probe answer length cap")
    batch_size: Int = Field(16, ge=1, description="transformers: prompts per batch; vllm: per chunk")

    @model_validator(mode="before")
    @classmethod
    def _benchmark_is_questions(cls, data: Any) -> Any:
        # `benchmark:` named the shipped set before `questions:` took both shipped sets and files
        if isinstance(data, dict) and "benchmark" in data:
            data = dict(data)
            old = data.pop("benchmark")
            log.warning("sweep.probe.benchmark is deprecated: say sweep.probe.questions: %s (the same set)", old)
            if data.get("questions") is None and old is not None:
                data["questions"] = old
        return data


class SweepSettings(_Strict):
    ratios: list[Float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    densities: Optional[list[Float]] = Field(
        None, description="densities to sweep with every ratio (sparsifying methods); default: merge.density only"
    )
    probe: Probe = Field(default_factory=Probe)
    search: Literal["grid", "adaptive"] = Field(
        "adaptive",
        description="adaptive (the default, unless ratios or densities are listed): bracket the target length "
        "between the experts, probing `per_round` ratios per round (merged in one pass) until the bracket is "
        "narrower than `resolution` or a point's mean length is within `length_tolerance` of the target; "
        "grid: probe every ratio of `ratios`",
    )
    resolution: Float = Field(
        0.05, gt=0, le=0.5, description="adaptive: the ratio step, and the bracket width that stops the search"
    )
    per_round: Int = Field(1, ge=1, le=8, description="adaptive: ratios probed per round (1 is bisection)")
    length_tolerance: Float = Field(
        0.05, ge=0, description="adaptive: stop once a point's mean length is within this share of the target"
    )
    early_stop: Optional[bool] = Field(
        None,
        description="answer each TA point's probe `chunk` questions at a time and stop once its mean length is "
        "clearly on one side of the target (it can then only bracket it) or its accuracy clearly below "
        "min_accuracy, at `confidence`; the experts' probes always answer every question. Default: on for the "
        "adaptive search, off for a grid (a grid measures every point it lists)",
    )
    chunk: Int = Field(16, ge=1, description="early_stop: questions per chunk")
    confidence: Float = Field(0.99, gt=0, lt=1, description="early_stop: the intervals' confidence level")
    target_tokens: Union[Literal["mid"], Float] = Field(
        "mid", description="'mid' = geometric mean of the endpoints' mean lengths, or a number of tokens"
    )
    tolerance: Float = Field(2.0, ge=0, description="accuracy points below the best that still qualify")
    # 5 % of the default 64 probe questions is 4 right answers: well below any working model (instruct
    # models of 1.5B and up score 60-90 % on GSM8K) and above what noise scores on free-form numeric
    # answers (about 0): below it the probe cannot tell the TAs apart, and a "choice" by length would
    # ship a broken merge
    min_accuracy: Float = Field(
        0.05, ge=0, le=1, description="the probe accuracy (0..1) some point must reach before the sweep chooses a TA"
    )
    # an answer cut at probe.max_tokens has the cap's length and an accuracy that is a floor: once most
    # of a point's answers are cut, its mean length measures the cap, not the model
    max_truncated: Float = Field(
        0.5,
        ge=0,
        le=1,
        description="the largest share (0..1) of a point's probe answers cut at probe.max_tokens for it to be chosen",
    )

    @property
    def stops_early(self) -> bool:
        return self.early_stop if self.early_stop is not None else self.search == "adaptive"

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("ratios must list at least one ratio")
        bad = [r for r in v if not 0.0 <= r <= 1.0]
        if bad:
            raise ValueError(f"every ratio must be between 0 and 1, got {bad}")
        return sorted(set(v))

    @field_validator("densities")
    @classmethod
    def _densities(cls, v: Optional[list[float]]) -> Optional[list[float]]:
        if v is None:
            return v
        if not v:
            raise ValueError("densities must list at least one density, or be left out")
        bad = [d for d in v if not 0.0 < d <= 1.0]
        if bad:
            raise ValueError(f"every density must be in (0, 1] (the fraction of each task vector kept), got {bad}")
        return sorted(set(v))

    @model_validator(mode="before")
    @classmethod
    def _grid_when_listed(cls, data: Any) -> Any:
        # listed ratios or densities are a grid to probe; without them the search finds the ratio
        if isinstance(data, dict) and "search" not in data and ("ratios" in data or data.get("densities")):
            data = {**data, "search": "grid"}
        return data

    @model_validator(mode="after")
    def _adaptive_over_ratios(self) -> "SweepSettings":
        if self.search == "adaptive" and self.densities is not None:
            raise ValueError("densities: the adaptive search looks for the ratio at merge.density; use search: grid")
        return self

    @field_validator("target_tokens", mode="before")
    @classmethod
    def _target_not_bool(cls, v):
        return not_bool(v)  # before the union: one message, not one per member

    @field_validator("target_tokens")
    @classmethod
    def _target(cls, v):
        if v != "mid" and v <= 0:
            raise ValueError("target_tokens must be 'mid' or a positive number of tokens")
        return v


class MixBaseline(_Strict):
    name: str = Field(description="a plain name: it names the baseline's folders under the work folder")
    mix: dict[str, Float]

    @field_validator("name")
    @classmethod
    def _plain(cls, v: str) -> str:
        from micota_merge.core.ownership import plain_name

        try:
            return plain_name(v, "name")
        except UserError as e:  # a ValueError carries the field path into the one-line error
            raise ValueError(str(e)) from None


class ChainSettings(_Strict):
    """`pipeline.chain`: the long-CoT side made by the pipeline, as MiCoTA makes it. A teacher answers
    the training questions with long CoT (a generate stage: verified and filtered), and the short-CoT
    checkpoint (the TA's own parent) is fine-tuned on its verified answers (a distill stage); the TA
    then merges that fine-tuned model with its parent (over `models.base`). Options not given here
    are the pipeline's own (`pipeline.questions`, `pipeline.generate`, `pipeline.distill`...); the
    `generate:` and `distill:` given here are laid over the pipeline's."""

    teacher: str = Field(description="the long-CoT teacher (e.g. DeepSeek-R1-Distill-Qwen-32B): hub id or folder")
    workdir: Optional[str] = Field(
        None,
        description="folder of the teacher's data and the fine-tuned long-CoT model (default: "
        "pipeline.workdir/chain); pipelines that share it (one per student) share the chain",
    )
    questions: Optional[str] = Field(None, description="the teacher's questions (default: pipeline.questions)")
    question_limit: Optional[Int] = Field(None, gt=0, description="default: pipeline.question_limit")
    prompt: Optional[str] = Field(None, description="default: pipeline.prompt")
    generate: dict[str, Any] = Field(default_factory=dict, description="generate options over pipeline.generate")
    distill: dict[str, Any] = Field(default_factory=dict, description="distill options over pipeline.distill")

    @model_validator(mode="after")
    def _set_by_pipeline(self) -> "ChainSettings":
        for section, keys in (("distill", ("student", "data", "out")), ("generate", ("model", "out"))):
            for key in keys:
                if key in getattr(self, section):
                    raise ValueError(f"{section}.{key} is set by the pipeline; remove it")
        return self


class PipelineSettings(_Strict):
    """The `pipeline:` section: what `micota-merge run` does after the TA is built."""

    workdir: str = Field(description="folder for every stage's outputs and report.md")
    chain: Optional[ChainSettings] = Field(
        None, description="make models.long_cot: a teacher's long CoT, short_cot fine-tuned on it"
    )
    student: str = Field("", description="the student checkpoint to distil into")
    select: Literal["sweep", "build"] = Field("sweep", description="TA from a ratio sweep or a plain build")
    questions: str = Field("gsm8k-train", description="training questions: a shipped set name or a JSONL file")
    question_limit: Optional[Int] = Field(None, gt=0)
    prompt: Optional[str] = Field(None, description="prompt template with {question}; default: the papers'")
    generate: dict[str, Any] = Field(default_factory=dict, description="generate options (max_tokens, backend...)")
    mix: Optional[dict[str, Float]] = Field(
        None, description="mix the TA's data with the experts': {ta: 1, short_cot: 4}"
    )
    mix_total: Optional[Int] = Field(None, gt=0)
    distill: dict[str, Any] = Field(default_factory=dict, description="distill options (epochs, lr, max_length...)")
    eval: dict[str, Any] = Field(default_factory=dict, description="eval options (tasks, limit, max_tokens...)")
    baselines: list[Union[Literal["long_cot", "short_cot", "teacher"], MixBaseline]] = Field(
        default_factory=list,
        description="other data to distil from: long_cot, short_cot, teacher (pipeline.chain's data), or {name, mix}",
    )
    eval_teachers: bool = Field(True, description="also score the TA and the experts")
    chat_template_kwargs: dict[Literal["ta", "long_cot", "short_cot", "teacher", "student"], dict[str, Any]] = Field(
        default_factory=dict,
        description="chat template switches per model, for its generate, distill and eval stages alike: e.g. a "
        "hybrid short side and student without thinking, {short_cot: {enable_thinking: false}}",
    )
    seed: Int = 0
    distill_seeds: Optional[list[Int]] = Field(
        None,
        min_length=1,
        description="distil one student per data set and seed (the report gives mean ± spread "
        "over them); default: [seed]",
    )

    @model_validator(mode="after")
    def _check(self) -> "PipelineSettings":
        if not self.student:
            raise ValueError("student: give the checkpoint to distil into")
        sources = {"ta", "long_cot", "short_cot"} | ({"teacher"} if self.chain else set())
        if "teacher" in self.baselines and not self.chain:
            raise ValueError("baseline teacher: the teacher's data comes from pipeline.chain, which is not set")
        for mix in [self.mix or {}] + [b.mix for b in self.baselines if isinstance(b, MixBaseline)]:
            for part, w in mix.items():
                if part not in sources:
                    raise ValueError(f"mix part {part!r}: choose from {', '.join(sorted(sources))}")
                if w <= 0:
                    raise ValueError(f"mix weight of {part} must be positive, got {w}")
        if self.distill_seeds is not None and len(set(self.distill_seeds)) != len(self.distill_seeds):
            raise ValueError(f"distill_seeds must be distinct, got {self.distill_seeds}")
        names = [b if isinstance(b, str) else b.name for b in self.baselines]
        if len(set(names)) != len(names) or {"ta", "mix", "student"} & set(names):
            raise ValueError(f"baseline names must be unique and not ta/mix/student, got {names}")
        for key in ("student", "data", "out"):
            if key in self.distill:
                raise ValueError(f"distill.{key} is set by the pipeline; remove it")
        for key in ("model", "output"):
            if key in self.eval:
                raise ValueError(f"eval.{key} is set by the pipeline; remove it")
        for section in ("generate", "distill", "eval"):
            if self.chat_template_kwargs and "chat_template_kwargs" in getattr(self, section):
                raise ValueError(
                    f"{section}.chat_template_kwargs and pipeline.chat_template_kwargs both set switches; "
                    "give them per model in pipeline.chat_template_kwargs"
                )
        return self


class Recipe(_Strict):
    name: Optional[str] = None
    models: Models
    merge: MergeSettings = Field(default_factory=MergeSettings)
    tokenizer: Role = Field("short_cot", description="whose tokenizer and chat template the TA keeps")
    config_from: Optional[Role] = Field(
        None, description="whose config.json (rope_theta, context length...) the TA keeps; default: the tokenizer side"
    )
    output: str = Field(description="folder the teacher assistant is written to")
    sweep: Optional[SweepSettings] = None
    pipeline: Optional[PipelineSettings] = Field(None, description="what `micota-merge run` does after the build")

    @model_validator(mode="after")
    def _base_when_needed(self) -> "Recipe":
        chain = self.pipeline is not None and self.pipeline.chain is not None
        if self.models.long_cot is None and not chain:
            raise ValueError(
                "models.long_cot: required field is missing (a long-CoT checkpoint; or let pipeline.chain make it)"
            )
        if self.models.long_cot is not None and chain:
            raise ValueError(
                "models.long_cot: pipeline.chain makes the long-CoT side (short_cot fine-tuned on the teacher's "
                "answers); remove models.long_cot, or remove pipeline.chain to merge this checkpoint"
            )
        if self.merge.aim is not None and not methods.get(self.merge.method).base:
            raise ValueError(
                f"merge.aim relaxes each update from models.base; method {self.merge.method} has no base: "
                "use a task-vector method (ties, dare_ties, task_arithmetic...)"
            )
        if methods.get(self.merge.method).base and not self.models.base:
            raise ValueError(
                f"method {self.merge.method} merges task vectors and needs models.base "
                "(the checkpoint both sides were fine-tuned from), or use linear / slerp"
            )
        for role in ("tokenizer", "config_from"):
            if getattr(self, role) == "base" and not self.models.base:
                raise ValueError(f"{role}: base is named but models.base is not set")
        return self

    @property
    def identity_role(self) -> str:
        """The side whose config, tokenizer and chat template the TA carries."""
        return self.config_from or self.tokenizer

    @property
    def made_long_cot(self) -> bool:
        """Whether models.long_cot is made by `run` (pipeline.chain) rather than named."""
        return self.models.long_cot is None

    def model_specs(self, made: bool = False) -> dict[str, str]:
        """The checkpoints the merge reads, by role. A long_cot that pipeline.chain makes is left out
        with `made` (run's checks before the chain has made it); without, it is an error."""
        if self.made_long_cot and not made:
            raise UserError(
                "models.long_cot is made by pipeline.chain: `micota-merge run RECIPE` makes it and then merges; "
                "to build or sweep alone, name a long-CoT checkpoint in models.long_cot"
            )
        specs = {"short_cot": self.models.short_cot}
        if not self.made_long_cot:
            specs = {"long_cot": self.models.long_cot, **specs}
        if self.models.base and methods.get(self.merge.method).base:
            specs["base"] = self.models.short_cot if self.models.base == "short_cot" else self.models.base
        return specs

    def with_long_cot(self, path: str | os.PathLike) -> "Recipe":
        """This recipe with the long-CoT side the chain made (an absolute path: it resolves anywhere)."""
        models = self.models.model_copy(update={"long_cot": str(Path(path).resolve())})
        return self.model_copy(update={"models": models})

    def to_mergekit(self, paths: Optional[dict[str, str]] = None) -> dict:
        """The mergekit configuration this recipe means (a dict that dumps to mergekit YAML).

        `paths` maps roles to resolved local folders; by default the recipe's own strings.
        Sides with weight 0 are left out, so ratio 0 and 1 read only the side they keep.
        """
        p = dict(self.model_specs(), **(paths or {}))
        m = self.merge
        spec = methods.get(m.method)
        lam = m.ratio
        extra = m.extra_params
        if spec.ratio == "slerp_t":
            # slerp interpolates from base_model (t=0) towards the other model (t=1).
            return {
                "merge_method": m.method,
                "base_model": p["short_cot"],
                "models": [{"model": p["short_cot"]}, {"model": p["long_cot"]}],
                "parameters": {"t": lam, **extra},
                "dtype": m.dtype,
                "out_dtype": m.dtype,
            }
        sides = [(p["long_cot"], lam), (p["short_cot"], 1.0 - lam)]
        models = []
        for path, weight in sides:
            # a side that is the base has no task vector (mergekit would skip it): it is left out, so the
            # configuration says what is merged
            if weight == 0.0 or (spec.base and path == p.get("base")):
                continue
            params: dict[str, Any] = {"weight": weight}
            if spec.density or (spec.base and m.density):  # task_arithmetic takes one when given
                params["density"] = m.density if m.density is not None else 0.5
            models.append({"model": path, "parameters": params})
        if not models:  # ratio 0 over short_cot itself: the base alone (mergekit needs one model)
            models.append({"model": p["short_cot"], "parameters": {"weight": 1.0}})
        cfg: dict[str, Any] = {"merge_method": m.method, "models": models, "dtype": m.dtype, "out_dtype": m.dtype}
        if spec.base:
            cfg["base_model"] = p["base"]
        if extra:
            cfg["parameters"] = extra
        return cfg

    def to_mergekit_yaml(self, paths: Optional[dict[str, str]] = None) -> str:
        return yaml.safe_dump(self.to_mergekit(paths), sort_keys=False)


# ------------------------------------------------------------------ loading


def read_yaml(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe {path} does not exist")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{path}: invalid YAML{where}: {problem}") from None


def is_mergekit_config(data: Any) -> bool:
    return isinstance(data, dict) and "merge_method" in data


def format_validation_error(source: str, err: ValidationError, model: type[BaseModel]) -> str:
    """One line per problem, each naming the field path, suggesting the right key for typos."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            parent = _submodel(model, e["loc"][:-1])
            valid = list(parent.model_fields) if parent else []
            close = difflib.get_close_matches(str(e["loc"][-1]), valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            lines.append(f"unknown key {loc!r}{hint} (valid here: {', '.join(valid)})")
        elif e["type"] == "missing":
            lines.append(f"{loc}: required field is missing")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{loc}: {msg}" if loc else msg)
    return f"{source}: " + "; ".join(lines)


def _submodel(model: type[BaseModel], loc) -> Optional[type[BaseModel]]:
    for key in loc:
        field = model.model_fields.get(str(key))
        if field is None:
            return None
        ann = field.annotation
        candidates = getattr(ann, "__args__", (ann,))
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return None
    return model


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise UserError(f"{source}: a recipe is a YAML mapping with models, merge and output")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise UserError(format_validation_error(source, e, Recipe)) from None


def load_recipe(path: str | os.PathLike) -> Recipe:
    return parse_recipe(read_yaml(path), str(path))
