"""The demo's figures over seeds of the whole micro world: mean ± spread of every figure.

Each world is trained from its seed with `micota-merge demo train` (or given with --world),
then the demo pipeline (micota_merge/recipes/pipeline/demo-pipeline.yaml, its distillation seeds included) runs
on it. Every world is scored on the committed held-out questions: the split is a hash of the
question text, so they are held out of every world's training.

    python scripts/microworld_seeds.py --seeds 0 1 2 --world 0=micota_merge/assets/microworld
    python scripts/microworld_seeds.py --seeds 0 1 2 --done 0=outputs/demo-pipeline  # after the demo

writes outputs/microworld-seeds/{seed-N/, seeds.json, seeds.md}. Resumable: a trained world and
every finished pipeline stage are kept (the pipeline skips by content).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from micota_merge.core.stats import spread  # noqa: E402
from micota_merge.demo.microworld import reflection_shares  # noqa: E402
from micota_merge.demo.verify import difficulty, verify_records  # noqa: E402
from micota_merge.evaluation.summary import group_scores  # noqa: E402


def train(seed: int, out: Path, min_accuracy: float) -> Path:
    """The world of `seed`; `demo train` refuses one whose experts did not learn the task (and this
    script stops there, saying so), unless --min-accuracy 0 asks for it anyway."""
    if not (out / "training.json").is_file():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "micota_merge.cli",
                "demo",
                "train",
                "--out",
                str(out),
                "--seed",
                str(seed),
                "--min-accuracy",
                str(min_accuracy),
                "--force",
            ],
            check=True,
        )
    return out


COMMITTED = "micota_merge/assets/microworld/"  # how the shipped recipes name the committed world


def _in_world(value, world: Path):
    """The recipe's value with every path into the committed world turned into the same path in `world`."""
    if isinstance(value, dict):
        return {k: _in_world(v, world) for k, v in value.items()}
    if isinstance(value, list):
        return [_in_world(v, world) for v in value]
    if isinstance(value, str) and value.startswith(COMMITTED):
        return str(world / value[len(COMMITTED) :])
    return value


def pipeline_file(world: Path, work: Path, recipe: Path) -> Path:
    """The recipe (the demo's, or the chain's) on `world`: its models, student, teacher and questions
    taken from that world, its outputs in `work`."""
    data = _in_world(yaml.safe_load(recipe.read_text()), world)
    data["output"] = str(work / "ta")
    data["pipeline"]["workdir"] = str(work)
    out = work / "pipeline.yaml"
    work.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def data_reflection(data_file: Path) -> dict | None:
    """`reflection_shares` of a data file's answers (None when the file is not there)."""
    if not data_file.is_file():
        return None
    recs = [json.loads(x) for x in data_file.read_text().splitlines() if x.strip()]
    return reflection_shares([r["messages"][-1]["content"] for r in recs])


def figures(work: Path) -> dict:
    sweep = json.loads((work / "ta" / "sweep" / "sweep.json").read_text())
    summary = json.loads((work / "report" / "summary.json").read_text())
    chosen = next(r for r in sweep["ratios"] if r["ratio"] == sweep["chosen"])
    out = {
        "chosen_ratio": sweep["chosen"],
        "ta_probe_accuracy": chosen["accuracy"],
        "ta_median_tokens": chosen["median_tokens"],
        "ta_mean_tokens": chosen["mean_tokens"],
        "long_cot_median_tokens": sweep["endpoints"]["long_cot"]["median_tokens"],
        "short_cot_median_tokens": sweep["endpoints"]["short_cot"]["median_tokens"],
        "student untrained accuracy": summary["scores"]["student"]["average"],
    }
    untrained = summary["scores"]["student"]["tasks"]["microworld"]
    out["student untrained chain accuracy"] = untrained.get("chain_accuracy")
    for name, g in summary["students"].items():
        out[f"{name} accuracy"] = g["accuracy"]["mean"]
        out[f"{name} accuracy sd over distill seeds"] = g["accuracy"]["sd"]
        chain = g["tasks"]["microworld"].get("chain_accuracy")
        out[f"{name} chain accuracy"] = chain["mean"] if chain else None
        out[f"{name} tokens"] = g["mean_tokens"]["mean"]
    for name, s in summary["scores"].items():
        if name.startswith("teacher:"):
            out[f"{name} accuracy"] = s["average"]
            out[f"{name} chain accuracy"] = s["tasks"]["microworld"].get("chain_accuracy")
    # every model's accuracy by difficulty (the students' as the mean over their distillation seeds)
    runs = {p.name: p / "run" for p in sorted((work / "eval").iterdir()) if (p / "run").is_dir()}
    by_run = {name: group_scores(run, "microworld") or {} for name, run in runs.items()}
    kinds = dict.fromkeys(name.rsplit("-seed", 1)[0] for name in by_run)
    for kind in kinds:
        members = [sc for name, sc in by_run.items() if name.rsplit("-seed", 1)[0] == kind]
        for d in difficulty.order:
            accs = [sc[d]["accuracy"] for sc in members if d in sc]
            if accs:
                out[f"{kind} accuracy, {d}"] = sum(accs) / len(accs)
    for source in ("ta", "teacher", "long_cot", "short_cot"):
        data = work / "data" / source / "data.jsonl"
        shares = data_reflection(work / "data" / source / "data.correct.jsonl")
        if shares and shares["reflected_steps"] is not None:
            out[f"{source} data reflected steps"] = shares["reflected_steps"]
            out[f"{source} data partly reflected answers"] = shares["partly_reflected"]
        if data.is_file():
            v = verify_records(data)
            out[f"{source} data final right share"] = v["final_right"] / max(v["records"], 1)
            out[f"{source} data chain right share"] = v["chain_right"] / max(v["records"], 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="world seeds")
    ap.add_argument(
        "--world",
        action="append",
        default=[],
        metavar="SEED=PATH",
        help="an already trained world for a seed (e.g. 0=micota_merge/assets/microworld)",
    )
    ap.add_argument(
        "--done",
        action="append",
        default=[],
        metavar="SEED=WORKDIR",
        help="a world whose pipeline already ran (e.g. 0=outputs/demo-pipeline, the README's "
        "first command): its figures are read, nothing is run",
    )
    ap.add_argument(
        "--recipe", type=Path, default=REPO / "micota_merge" / "recipes" / "pipeline" / "demo-pipeline.yaml"
    )
    ap.add_argument("--out", type=Path, default=Path("outputs/microworld-seeds"))
    ap.add_argument(
        "--min-accuracy", type=float, default=0.9, help="demo train's: refuse a world whose experts score less"
    )
    args = ap.parse_args()
    given = {int(k): Path(v) for k, v in (w.split("=", 1) for w in args.world)}
    done = {int(k): Path(v) for k, v in (w.split("=", 1) for w in args.done)}

    from micota_merge.pipeline.run import run

    per_world = {}
    for seed in args.seeds:
        if seed in done:
            per_world[seed] = figures(done[seed])
            continue
        world = given.get(seed) or train(seed, args.out / f"seed-{seed}" / "world", args.min_accuracy)
        work = args.out / f"seed-{seed}" / "pipeline"
        run(pipeline_file(world.resolve(), work.resolve(), args.recipe))
        per_world[seed] = figures(work)
    keys = list(dict.fromkeys(k for f in per_world.values() for k in f))
    table = {k: spread([f[k] for f in per_world.values() if f.get(k) is not None]) for k in keys}
    lines = [
        f"World seeds {args.seeds}: mean ± sample sd (min–max) over worlds",
        "",
        "| figure | mean ± sd | min–max | " + " | ".join(f"seed {s}" for s in per_world) + " |",
        "| --- | ---: | ---: |" + " ---: |" * len(per_world),
    ]
    for k, t in table.items():
        pct = "accuracy" in k or "share" in k or "reflected" in k

        def fmt(v: float | None, pct: bool = pct) -> str:
            return "-" if v is None else (f"{v:.1%}" if pct else f"{v:.3g}")

        lines.append(
            f"| {k} | {fmt(t['mean'])} ± {fmt(t['sd'])} | {fmt(t['min'])}–{fmt(t['max'])} | "
            + " | ".join(fmt(f.get(k)) for f in per_world.values())
            + " |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "seeds.json").write_text(json.dumps({"worlds": per_world, "spread": table}, indent=1) + "\n")
    (args.out / "seeds.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
