"""The sweep's merge phase: one pass over the inputs for 5 ratios vs 5 separate builds.

Writes three generated Qwen2-shaped checkpoints of about --size-gb each (as
bench/merge_throughput.py does), then times, each in its own process:
  one pass   micota_merge.merge.onepass.engine.build_points (what `sweep` runs): every input tensor read
             once, the 5 TAs written tensor by tensor (for DARE-TIES: mergekit's random drop
             replayed per random stream, sign election per ratio)
  separate   5 x `micota-merge build --ratio r` (mergekit, one full merge per ratio); the ratio
             0.5 build is also "one build", the unit of the target (one pass <= 2x one build)
  I/O floor  `cat` of the input weights once and `cp` of the 5 outputs' weights once: the bytes
             the one pass must move at least, on the same disk and page cache
and prints wall time, the input bytes each approach reads, and peak anonymous memory.

    python bench/sweep.py --size-gb 1.0 [--method dare_ties] [--ratios 0,0.25,0.5,0.75,1]

Bytes read are counted from the plan, not the kernel: safetensors are read through mmap and a
warm page cache hides re-reads from /proc/PID/io, so the figure is input checkpoints x passes
(one pass: each input once; separate: each build reads its inputs, and ratios 0 and 1 leave one
side out). The generated inputs are in the page cache (just written), for every approach alike.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_throughput import measure, write_family  # noqa: E402

from micota_merge.merge import methods  # noqa: E402

ONE_PASS = r"""
import sys, yaml
from pathlib import Path
from micota_merge.merge.onepass.engine import build_points
from micota_merge.merge.recipe import parse_recipe
recipe_path, out = Path(sys.argv[1]), Path(sys.argv[2])
ratios = [float(r) for r in sys.argv[3].split(",")]
recipe = parse_recipe(yaml.safe_load(recipe_path.read_text()))
build_points(recipe_path, recipe, {(r, recipe.merge.density): out / f"one-{r}" for r in ratios}, force=True)
"""

METHODS = methods.one_pass()  # the methods the one pass covers (the method table)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--method", default="dare_ties", choices=METHODS)
    ap.add_argument("--density", type=float, default=0.5, help="density of the sparsifying methods")
    ap.add_argument("--ratios", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--workdir", default="/tmp/micota-bench-sweep")
    args = ap.parse_args()

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model_bytes, _ = write_family(work, args.size_gb)
    merge = {"method": args.method, "ratio": 0.5, "dtype": "bfloat16", "seed": 0}
    if methods.get(args.method).density:
        merge["density"] = args.density
    recipe = {
        "models": {r: str(work / r) for r in ("long_cot", "short_cot", "base")},
        "merge": merge,
        "tokenizer": "short_cot",
        "output": str(work / "ta"),
    }
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    ratios = [float(r) for r in args.ratios.split(",")]
    inputs = 3 if methods.get(args.method).base else 2

    one_s, _, one_anon = measure([sys.executable, "-c", ONE_PASS, str(work / "recipe.yaml"), str(work), args.ratios])
    micota = str(Path(sys.executable).parent / "micota-merge")
    sep_s, sep_anon, single_s, single_r = 0.0, 0, None, None
    for r in ratios:
        s, _, anon = measure(
            [
                micota,
                "build",
                str(work / "recipe.yaml"),
                "--ratio",
                str(r),
                "--output",
                str(work / f"sep-{r}"),
                "--force",
            ]
        )
        sep_s += s
        sep_anon = max(sep_anon, anon)
        if single_r is None or abs(r - 0.5) < abs(single_r - 0.5):  # an interior ratio: both sides merged
            single_s, single_r = s, r
        shutil.rmtree(work / f"sep-{r}", ignore_errors=True)
    # the I/O floor: read the inputs once, write the outputs once
    roles = ("long_cot", "short_cot") if args.method == "linear" else ("base", "long_cot", "short_cot")
    in_files = " ".join(str(work / role / "model.safetensors") for role in roles)
    cat_s, _, _ = measure(["bash", "-c", f"cat {in_files} > /dev/null"])
    (work / "copies").mkdir()
    outs = " ".join(str(work / f"one-{r}" / "model.safetensors") for r in ratios)
    cp_s, _, _ = measure(
        [
            "bash",
            "-c",
            "for f in "
            + outs
            + '; do cp "$f" '
            + str(work / "copies")
            + '/$(basename $(dirname "$f")).safetensors; done && sync -f '
            + str(work / "copies"),
        ]
    )
    sep_read = sum((inputs - (1 if r in (0.0, 1.0) else 0)) for r in ratios) * model_bytes
    one_read = inputs * model_bytes

    gib = 2**30
    print(
        f"{len(ratios)} ratios ({args.ratios}) of a {args.method} merge"
        + (f" at density {args.density:g}" if "density" in merge else "")
        + f", {model_bytes / gib:.2f} GiB bf16 checkpoints, one torch thread"
    )
    print(f"{'':34}{'wall s':>8}{'input GiB read':>16}{'peak anon GiB':>15}")
    print(f"{'one pass (5 TAs)':34}{one_s:>8.1f}{one_read / gib:>16.2f}{one_anon / gib:>15.2f}")
    print(f"{'separate builds (5 TAs)':34}{sep_s:>8.1f}{sep_read / gib:>16.2f}{sep_anon / gib:>15.2f}")
    print(f"{f'one build (ratio {single_r:g})':34}{single_s:>8.1f}{one_read / gib:>16.2f}")
    print(f"{'I/O floor: cat inputs once':34}{cat_s:>8.1f}{one_read / gib:>16.2f}")
    print(f"{'I/O floor: cp 5 outputs once':34}{cp_s:>8.1f}")
    print(
        f"\none pass: {one_s / single_s:.2f}x one build (target <= 2x), {one_s / (cat_s + cp_s):.1f}x the I/O "
        f"floor ({cat_s + cp_s:.1f} s); separate / one pass: {sep_s / one_s:.2f}x time, "
        f"{sep_read / one_read:.2f}x bytes read"
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
