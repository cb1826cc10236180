"""`transformers`: Hugging Face transformers in this process (generate), lm-eval's hf model (eval)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator, Optional

from micota_merge.generation.backends import Backend, EvalJob, GenerateJob, register


def run_transformers(
    opts,
    model_dir: Path,
    prompt_ids: list[list[int]],
    batches: list[tuple[int, list[tuple[int, int]]]],
    stop_ids: list[int],
    pad_id: int,
    timing: dict,
) -> Iterator[tuple[list[tuple[int, int]], list[list[int]]]]:
    """Batched generate with left padding and the KV cache; yields (batch, generated token ids).

    `batches` are (index in the plan, items): the index seeds the batch's sampling."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "auto" if opts.dtype == "auto" else getattr(torch, opts.dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    sampling = opts.temperature > 0
    # Replace the checkpoint's generation defaults whole: a TA merged from R1 ships do_sample=True,
    # temperature 0.6, which would otherwise leak into a greedy run.
    model.generation_config = GenerationConfig(
        max_new_tokens=opts.max_tokens,
        do_sample=sampling,
        temperature=opts.temperature if sampling else None,
        top_p=opts.top_p if sampling else None,
        top_k=None,
        eos_token_id=stop_ids,
        pad_token_id=pad_id,
        use_cache=True,
    )
    timing["loaded"] = time.perf_counter()
    for b, batch in batches:
        rows = [prompt_ids[q] for q, _ in batch]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        if sampling:  # one seed per planned batch: a resumed batch draws the same samples
            torch.manual_seed(opts.seed * 1_000_003 + b)
        with torch.inference_mode():
            gen = model.generate(input_ids=ids, attention_mask=mask)
        yield batch, gen[:, width:].tolist()


class Transformers(Backend):
    name = "transformers"
    summary = "Hugging Face transformers in this process (eval: lm-eval's hf model)"

    def generate(self, job: GenerateJob) -> Optional[dict]:
        from micota_merge.generation.generate import _plan

        size = job.opts.batch_size or 16
        pending = set(job.pending)
        # The plan covers every item and is the same on every run; each batch keeps its index in
        # it, which seeds its sampling, so a batch recomputed after a kill draws the same tokens.
        batches = [
            (b, batch)
            for b, batch in enumerate(_plan(job.items, job.prompt_ids, size))
            if any(it in pending for it in batch)
        ]
        for batch, gens in run_transformers(
            job.opts, job.model_dir, job.prompt_ids, batches, job.stop_ids, job.pad_id, job.timing
        ):
            job.write([job.record(qi, s, g) for (qi, s), g in zip(batch, gens) if (qi, s) in pending])
        return None

    def eval_device(self, gpu: bool) -> Optional[str]:
        return "cuda" if gpu else "cpu"

    def lm_eval(self, job: EvalJob) -> tuple[str, dict]:
        from micota_merge.evaluation.models import register as register_model

        # lm-eval's hf model, subclassed so each answer carries its count and finish reason (models.py)
        args = {"pretrained": str(job.model_path), "dtype": job.dtype}
        if job.chat_template_kwargs:  # lm-eval's hf model renders the template with these
            args["chat_template_args"] = dict(job.chat_template_kwargs)
        return register_model("hf"), args


register(Transformers())
