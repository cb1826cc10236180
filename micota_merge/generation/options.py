"""The options of every stage that asks a model for answers (generate, the sweep's probe, eval).

The groups shared by those stages (OpenAI-compatible servers, vLLM engines) are declared once here and
inherited, so a default such as the request timeout or the concurrency has one home.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

from pydantic import AfterValidator, Field, field_validator

from micota_merge.core.errors import UserError
from micota_merge.core.options import ModelDtype, StageOptions, chat_template_kwargs_field, cli, transport_fields
from micota_merge.core.ownership import OWN
from micota_merge.core.strict import Float, Int
from micota_merge.evaluation import benchmarks as _benchmarks


def _backend_known(v: str) -> str:
    from micota_merge.generation import backends

    try:
        return backends.canonical(v)  # "hf" -> "transformers", with a note
    except UserError:
        raise ValueError(backends.unknown(v)) from None


def _has_question_slot(v: str) -> str:
    if v and "{question}" not in v:
        raise ValueError("must contain {question} where the question goes")
    return v


BackendName = Annotated[str, AfterValidator(_backend_known)]
PromptTemplate = Annotated[str, AfterValidator(_has_question_slot)]


class ServerOptions(StageOptions):
    """OpenAI-compatible servers (vllm serve, SGLang, a hosted API): how requests travel."""

    base_url: list[str] = Field(
        default_factory=list,
        description="openai: API root of a server, e.g. http://127.0.0.1:8000/v1. Repeat for several servers "
        "(one per node): requests go to the least busy one, and fail over when one dies.",
        json_schema_extra=cli(transport=True, metavar="URL"),
    )
    api_key_env: Optional[str] = Field(
        None,
        description="openai: name of the environment variable holding the API key (e.g. OPENAI_API_KEY); "
        "default: no key (a local vllm serve needs none).",
        json_schema_extra=cli(transport=True),
    )
    served_model: Optional[str] = Field(
        None,
        description="openai: the model name the servers know (default: the one they serve from --model's "
        "folder, or --model itself).",
        json_schema_extra=cli(transport=True),
    )
    concurrency: Int = Field(
        16,
        ge=1,
        description="openai: requests in flight over all servers together (a vLLM server batches them).",
        json_schema_extra=cli(transport=True),
    )
    retries: Int = Field(
        8,
        ge=0,
        description="openai: further tries of a request that failed to connect, timed out or got HTTP "
        "429/5xx; awake servers first; a failing server rests 0.5 s, doubling per failure in a row up to 30 s.",
        json_schema_extra=cli(transport=True),
    )
    # one answer of 16k tokens on a busy server takes long
    request_timeout: Float = Field(
        3600.0,
        gt=0,
        description="openai: seconds to wait for a server's answer before retrying elsewhere.",
        json_schema_extra=cli(transport=True),
    )

    @field_validator("base_url", mode="before")
    @classmethod
    def _urls(cls, v):
        if isinstance(v, str):
            v = [v]
        return [u.strip() for x in (v or []) for u in str(x).split(",") if u.strip()]


class VllmOptions(StageOptions):
    """vLLM engines: how many GPUs, how much context."""

    tensor_parallel_size: Int = Field(1, ge=1, description="vllm: GPUs to split one model over.")
    max_model_len: Optional[Int] = Field(
        None, ge=16, description="vllm: context length to reserve, prompt plus answer (default: the model's)."
    )
    data_parallel_size: Int = Field(
        1,
        ge=1,
        description="vllm: engine replicas, each on its own --tensor-parallel-size GPUs; the answers are "
        "those of one replica.",
        json_schema_extra=cli(transport=True),
    )


class ProbeOptions(VllmOptions):
    """What the sweep's probe and `generate` share: one model answering a question set."""

    backend: BackendName = Field(
        "auto",
        description="auto: openai when --base-url is given, else vllm when vLLM and a CUDA GPU are present "
        "(or with --data-parallel-size / --serve-args), else transformers; vllm-cpu only when asked for by "
        "name. openai: OpenAI-compatible servers (vllm serve, SGLang, a hosted API).",
        json_schema_extra=cli(type="backend"),
    )
    max_tokens: Int = Field(16384, ge=1, description="New tokens per answer (long-CoT answers run to thousands).")
    batch_size: Optional[Int] = Field(
        None,
        ge=1,
        description="transformers: prompts per batch (16); vllm: questions per LLM.generate chunk, the most "
        "a kill can lose (256).",
    )
    limit: Optional[Int] = Field(None, ge=1, description="Only the first N questions (after --offset).")
    offset: Int = Field(
        0, ge=0, description="Skip the first N questions (a probe's held-out slice, or one shard of a large set)."
    )
    prompt: PromptTemplate = Field(
        "",
        description="User message template with {question}; default: the papers' "
        + repr(_benchmarks.PROMPT).replace("\\\\", "\\"),
    )
    chat_template_kwargs: dict[str, Any] = chat_template_kwargs_field()
    dtype: ModelDtype = Field(
        "auto", description="Weights' dtype: auto (the checkpoint's; vLLM runs float32 checkpoints in 16 bits)."
    )
    enforce_eager: bool = Field(
        False,
        description="vllm: no torch.compile / CUDA graphs (faster start, slower run).",
        json_schema_extra=cli(flag=True),
    )
    serve_args: Optional[str] = Field(
        None,
        description="vllm: more `vllm serve` flags for the server that --data-parallel-size starts (given "
        'alone, it starts one too), e.g. "--data-parallel-backend ray --data-parallel-size 32" for '
        "replicas over a Ray cluster's nodes.",
    )


class GenerateOptions(ProbeOptions, ServerOptions):
    """Everything `micota-merge generate` takes; defaults are the papers' settings."""

    model: str = Field(
        description="Checkpoint folder of the teacher assistant (or any model); with --backend openai also a "
        "model only the server has (e.g. a hosted one)."
    )
    questions: str = Field(
        description="A shipped set (gsm8k-train, "
        + ", ".join(_benchmarks.question_sets())
        + "), a JSONL file, a dataset folder "
        "(save_to_disk, or a dataset repository's files), or a Hub dataset hf:ORG/NAME[:CONFIG][@SPLIT] (read "
        "from the Hugging Face cache when offline)."
    )
    out: str = Field(description="Raw records, appended as they finish (FILE.jsonl).")
    n: Int = Field(1, ge=1, description="Samples per question.")
    temperature: Float = Field(0.0, ge=0, description="Sampling temperature; 0 = greedy, reproducible data.")
    top_p: Float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold in (0, 1].")
    seed: Int = Field(0, description="Seed of the sampling: a rerun draws the same answers on the same backend.")
    keep: Literal["correct", "values", "chain", "all"] = Field(
        "correct",
        description="correct: also write OUT.correct.jsonl with verified-correct, untruncated answers; values: "
        "only those whose every number the benchmark's verifier accepts too, chain: whose whole chain it "
        "accepts (a benchmark whose every step can be checked: --benchmark microworld for a micro-world "
        "question file); all: no kept file.",
    )
    question_field: Optional[str] = Field(
        None, description="Field holding the question (default: question / problem / prompt)."
    )
    answer_field: Optional[str] = Field(
        None, description="Field holding the gold answer (default: answer / final_answer)."
    )
    id_field: Optional[str] = Field(
        None, description="Field holding a unique id (default: id if present, else a content hash)."
    )
    split: Optional[str] = Field(None, description="Split of a saved DatasetDict.")
    benchmark: Optional[str] = Field(
        None,
        description="Grade a custom file's gold the way this benchmark's is parsed ("
        + ", ".join(_benchmarks.graded())
        + "); a benchmark that verifies whole answers (microworld) also marks each record's chain_correct and "
        "values_correct.",
    )
    decontaminate: Literal["drop", "warn", "off"] = Field(
        "drop",
        description="Questions that share a word 8-gram with a benchmark's question (open-r1's check; only "
        "an identical question for a templated benchmark): drop them, keep them and report them (warn), or "
        "check nothing (off: e.g. to answer a benchmark on purpose).",
    )
    decontaminate_against: list[str] = Field(
        default_factory=list,
        description="Benchmarks the questions are checked against (default: the papers' five; `run` adds the "
        "ones it evaluates).",
        json_schema_extra=cli(metavar="BENCH"),
    )
    force: bool = Field(
        False,
        description="Start OUT over instead of resuming (only an OUT generate wrote: its OUT.meta.json says so)." + OWN,
        json_schema_extra=cli(flag=True),
    )


# How requests travel, never what is answered (records are the same with one server or four, at any
# concurrency, with any number of data-parallel replicas): left out of every "same input" decision.
TRANSPORT_OPTIONS = transport_fields(GenerateOptions)
