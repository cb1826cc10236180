"""The sweep on the micro world: the adaptive search against the full grid, and the length-accuracy
fronts of DARE-TIES, TIES and AIM-TIES.

Runs `micota-merge sweep` (in this process, one after another, each in its own folder) on the demo
recipe's merge (micota_merge/recipes/pipeline/demo-pipeline.yaml: the micro world's experts over
their base, density 0.5, the demo's probe of 64 training questions up to 400 tokens):
  grid       dare_ties at every ratio 0.30, 0.35, ..., 0.90 (the 0.05 grid), every probe in full:
             the baseline (the sweep before issue 24); grid_0.1 is the demo's own 0.1 grid
  adaptive   dare_ties, sweep.search: adaptive at resolution 0.05 (per_round 1: bisection)
  +early_stop  the same with sweep.early_stop (chunks of 16 questions, 99 % intervals)
  fronts     ties and ties + merge.aim {omega: 0.4} (the Long-to-Short study's AIM-TIES setting) over
             the same grid; dare_ties' front is the grid run's
and prints, per sweep: probe tokens generated (every probed model's records x mean answer tokens,
the experts' probes included), points merged, wall time and the chosen ratio; then each method's
(ratio, mean tokens, accuracy) points with the experts as reference.

    python bench/sweep_search.py [--workdir /tmp/micota-bench-search] [--only grid,adaptive]

Probe tokens are the cost that grows with the model at paper scale (a 7B-32B model answering 64
questions at up to 8k-16k tokens per point); merges and wall time are this machine's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "micota_merge" / "recipes" / "pipeline" / "demo-pipeline.yaml"
GRID = [round(0.3 + 0.05 * k, 2) for k in range(13)]
RUNS = (
    "grid",
    "grid+early_stop",
    "adaptive",
    "adaptive+early_stop",
    "grid_0.1",
    "adaptive_0.1+early_stop",
    "ties",
    "aim_ties",
    "aim_dare_ties",
)
FRONTS = ("grid", "ties", "aim_ties", "aim_dare_ties")  # each method's points, every question answered


def recipe(work: Path, name: str, method: str = "dare_ties", aim=None, **sweep) -> Path:
    data = yaml.safe_load(DEMO.read_text())
    data.pop("pipeline")
    for role in ("long_cot", "short_cot", "base"):
        data["models"][role] = str(REPO / data["models"][role])
    data["sweep"]["probe"]["questions"] = str(REPO / data["sweep"]["probe"]["questions"])
    data["merge"]["method"] = method
    if aim is not None:
        data["merge"]["aim"] = aim
    data["output"] = str(work / name / "ta")
    data["sweep"].update(sweep)
    (work / name).mkdir(parents=True, exist_ok=True)
    path = work / name / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run(path: Path) -> dict:
    from micota_merge.merge.sweep import run as sweep_run

    t0 = time.time()
    result = sweep_run.sweep(sweep_run.SweepOptions(recipe=str(path), keep_all=True), echo=lambda m: None)
    wall = time.time() - t0
    probed = list(result["endpoints"].values()) + result["ratios"]
    tokens = sum(r["records"] * r["mean_tokens"] for r in probed)
    return {
        "wall_s": round(wall, 1),
        "points": len(result["ratios"]),
        "probe_tokens": round(tokens),
        "chosen": result["chosen"],
        "rows": [
            {
                "ratio": r["ratio"],
                "mean_tokens": r["mean_tokens"],
                "accuracy": r["accuracy"],
                "truncation_rate": r["truncation_rate"],
                "questions": r["records"],
            }
            for r in result["ratios"]
        ],
        "endpoints": {
            k: {"mean_tokens": v["mean_tokens"], "accuracy": v["accuracy"]} for k, v in result["endpoints"].items()
        },
        "target_tokens": result["target_tokens"],
        "search": result.get("search"),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/micota-bench-search")
    ap.add_argument("--only", default=",".join(RUNS))
    args = ap.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    full = {"early_stop": False}  # every probe answers all its questions: the fronts' points are comparable
    runs = {
        # the baseline: the 0.05 grid, every point probed in full (the sweep before issue 24)
        "grid": lambda: recipe(work, "grid", ratios=GRID, search="grid", **full),
        "grid+early_stop": lambda: recipe(work, "grid+early_stop", ratios=GRID, search="grid", early_stop=True),
        "adaptive": lambda: recipe(work, "adaptive", search="adaptive", resolution=0.05, **full),
        "adaptive+early_stop": lambda: recipe(
            work, "adaptive+early_stop", search="adaptive", resolution=0.05, early_stop=True
        ),
        # the demo's own 0.1 grid, in full, and the search at its resolution
        "grid_0.1": lambda: recipe(work, "grid_0.1", search="grid", **full),
        "adaptive_0.1+early_stop": lambda: recipe(
            work, "adaptive_0.1+early_stop", search="adaptive", resolution=0.1, early_stop=True
        ),
        "ties": lambda: recipe(work, "ties", method="ties", ratios=GRID, search="grid", **full),
        "aim_ties": lambda: recipe(
            work, "aim_ties", method="ties", aim={"omega": 0.4}, ratios=GRID, search="grid", **full
        ),
        # AIM over the demo's own merge: the same DARE-TIES points with and without the relaxation
        "aim_dare_ties": lambda: recipe(work, "aim_dare_ties", aim={"omega": 0.4}, ratios=GRID, search="grid", **full),
    }
    out = {}
    for name in args.only.split(","):
        out[name] = run(runs[name]())
        print(f"{name}: {json.dumps({k: v for k, v in out[name].items() if k not in ('rows', 'search')})}", flush=True)
    (work / "results.json").write_text(json.dumps(out, indent=2))

    print("\n| sweep | points merged | TA questions answered | probe tokens | × grid | wall s | chosen ratio |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    grid_tokens = out.get("grid", {}).get("probe_tokens")
    for name, r in out.items():
        share = f"{r['probe_tokens'] / grid_tokens:.2f}" if grid_tokens else ""
        asked = sum(row["questions"] for row in r["rows"])
        print(f"| {name} | {r['points']} | {asked} | {r['probe_tokens']} | {share} | {r['wall_s']} | {r['chosen']} |")
    for name, r in out.items():
        if name not in FRONTS:
            continue
        e = r["endpoints"]
        print(
            f"\n{name} (target {r['target_tokens']} tokens; short_cot {e['short_cot']['mean_tokens']:.1f} tok "
            f"{100 * e['short_cot']['accuracy']:.1f} %, long_cot {e['long_cot']['mean_tokens']:.1f} tok "
            f"{100 * e['long_cot']['accuracy']:.1f} %)"
        )
        print("| ratio | mean tokens | accuracy % | truncated % |\n| ---: | ---: | ---: | ---: |")
        for row in r["rows"]:
            print(
                f"| {row['ratio']:.2f} | {row['mean_tokens']:.1f} | {100 * row['accuracy']:.1f} | "
                f"{100 * (row['truncation_rate'] or 0):.1f} |"
            )


if __name__ == "__main__":
    main()
