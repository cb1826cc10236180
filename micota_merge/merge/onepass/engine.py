"""One pass over the inputs for many (ratio, density) points (the sweep's merge phase).

Each input tensor is read once and every point's TA is written from it, instead of one full
merge per point: a 5-ratio x 2-density sweep reads the inputs once, not ten times. Which
method goes which way is the method table's `one_pass` (micota_merge/merge/methods.py):
  combine   (linear, task_arithmetic) a fixed combination per ratio, with mergekit's arithmetic
  replay    (ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della, della_linear)
            mergekit's sparsification and sign election replayed per point, random drops
            included (see replay.py)
The outputs are bit-for-bit those of separate `build`s; tests hold every method to that. The
merged tensors are checked for NaN/Inf as they are written and streamed to disk: only the
tensors in flight are held in memory, and no output is read back.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path

from micota_merge.core.artifacts import atomic_dir, now
from micota_merge.core.checkpoints import weight_files
from micota_merge.core.errors import StageFailed
from micota_merge.core.safetensors_io import SAFETENSORS_DTYPE, plan_shards, shard_file_names, write_header, write_index
from micota_merge.merge import aim as aim_step
from micota_merge.merge import methods
from micota_merge.merge.build import (
    BuildPlan,
    aim_importance,
    give_identity,
    plan_build,
    with_ratio,
    write_build_manifest,
)
from micota_merge.merge.onepass.replay import Point, TaskVectorReplay, Unsupported, check_mergekit_version
from micota_merge.merge.recipe import Recipe

_SHARD_BYTES = 5 * 10**9


def supports_one_pass(recipe: Recipe) -> bool:
    return methods.get(recipe.merge.method).one_pass is not None


def _replays_mergekit(recipe: Recipe) -> bool:
    """Through mergekit's own planner and functions (replay.py), whatever the parameters; the
    fixed combinations (combine below) know only the plain weighted mean and base + Σ w·Δ: a
    task-vector one with a pass-through parameter or a density is replayed too."""
    m = recipe.merge
    spec = methods.get(m.method)
    return spec.one_pass == "replay" or (spec.one_pass == "combine" and spec.base and bool(m.extra_params or m.density))


def at_point(recipe: Recipe, point: Point) -> Recipe:
    """The recipe at one (ratio, density) point of a sweep."""
    recipe = with_ratio(recipe, point[0])
    if point[1] != recipe.merge.density:
        recipe = recipe.model_copy(deep=True)
        recipe.merge.density = point[1]
    return recipe


class StreamingSafetensorsWriter:
    """Writes a (sharded) safetensors checkpoint tensor by tensor, holding none of it in memory.

    Names, shapes and dtypes are known up front from the inputs' headers, so each file's
    header is written first and tensors follow in order.
    """

    def __init__(self, folder: Path, specs: dict[str, tuple[int, ...]], dtype: str):
        self.folder, self.dtype = folder, dtype
        entries = {name: (SAFETENSORS_DTYPE[dtype], tuple(shape)) for name, shape in specs.items()}
        shards = plan_shards(entries, _SHARD_BYTES)
        self.files, self.where, total = {}, {}, 0
        for fname, names in zip(shard_file_names(len(shards)), shards):
            f = open(folder / fname, "wb")
            total += write_header(f, entries, names, {"format": "pt"})
            self.files[fname] = f
            self.where.update({name: fname for name in names})
        if len(shards) > 1:
            write_index(folder, total, self.where)

    def write(self, name: str, tensor) -> None:
        import torch

        if tensor.numel():  # the tensor's own bytes, no copy
            self.files[self.where[name]].write(tensor.contiguous().view(torch.uint8).numpy().data)

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def all_finite(t) -> bool:
    """No NaN or Inf in t. A NaN or Inf anywhere makes the sum NaN or Inf, and summing is many times
    cheaper than an elementwise test; only a sum that overflowed needs the elementwise test."""
    import torch

    if not t.is_floating_point() or bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def combine(method: str, ratio: float, long_cot, short_cot, base=None):
    """One ratio's TA tensor, with mergekit's arithmetic (inputs already in the merge dtype): the
    weighted mean (linear), or base + Σ w·Δ for a method with a base (task_arithmetic)."""
    import torch

    sides = [(t, w) for t, w in ((long_cot, ratio), (short_cot, 1.0 - ratio)) if w != 0.0]
    if not methods.get(method).base:
        first = sides[0][0]
        acc = torch.float64 if first.dtype == torch.float64 else torch.float32
        weights = torch.tensor([w for _, w in sides], dtype=acc)
        result = torch.zeros_like(first, dtype=acc)
        for (t, _), w in zip(sides, weights.unbind(0)):
            result.addcmul_(t, w)
        return result.div_(weights.sum()).to(first.dtype)
    # task_arithmetic: base + Σ w_i (x_i − base), computed in the merge dtype as mergekit does
    deltas = base.new_empty((len(sides), *base.shape))
    for i, (t, _) in enumerate(sides):
        deltas[i] = t - base
    weights = torch.tensor([w for _, w in sides], dtype=deltas.dtype)
    while deltas.dim() > weights.dim():
        weights.unsqueeze_(-1)
    deltas.mul_(weights)
    return (base + deltas.sum(dim=0)).to(base.dtype)


def build_points(
    recipe_path: str | Path, recipe: Recipe, outputs: dict[Point, Path], force: bool = False, echo=print
) -> dict[Point, Path]:
    """Write one TA per (ratio, density) point from a single read of the inputs. Returns {point: folder}.

    Raises Unsupported (before writing anything) where a separate build per point is needed.
    """
    import torch
    from safetensors import safe_open
    from tqdm import tqdm

    if not supports_one_pass(recipe):
        raise Unsupported(f"{recipe.merge.method} has no one-pass form here; build each point separately")
    method = recipe.merge.method
    spec = methods.get(method)
    if not spec.density and any(p[1] != recipe.merge.density for p in outputs):
        raise Unsupported(f"{method} has no density to sweep")
    points = sorted(outputs, key=lambda p: (p[0], p[1] or 0.0))
    # the first point's plan makes the AIM plan (calibration texts drawn and templated) the others share
    plan0 = plan_build(recipe_path, str(outputs[points[0]]), None, force, recipe=at_point(recipe, points[0]))
    plans: dict[Point, BuildPlan] = {
        p: plan0
        if p == points[0]
        else plan_build(recipe_path, str(outputs[p]), None, force, recipe=at_point(recipe, p), aim=plan0.aim)
        for p in points
    }
    dtype = recipe.merge.dtype
    tdtype = getattr(torch, dtype)
    identity = plan0.metas[recipe.identity_role]
    if _replays_mergekit(recipe):
        check_mergekit_version()  # before anything is written: a point-by-point build is the fallback
        if torch.cuda.is_available():
            # `build` runs mergekit on the GPU there, whose kernels and random stream are not the
            # CPU's; the replay's equality with builds is verified on CPU only.
            raise Unsupported("with a GPU, builds run mergekit on it and the one-pass replay is verified on CPU only")
        replay = TaskVectorReplay(plans, seed=recipe.merge.seed)
        if set(replay.names) != set(identity.tensors):
            raise Unsupported("mergekit would write other tensors than the checkpoint holds")
        order = replay.names
        reads = replay.inputs
    else:
        from micota_merge.merge.preflight import mergekit_tensor_names

        names = mergekit_tensor_names(identity)
        if names is not None and names != set(identity.tensors):
            # MoE: mergekit writes the experts fused where the inputs store one tensor per expert
            raise Unsupported("mergekit writes other tensor names than the checkpoint holds (fused MoE experts)")
        replay = None
        order = list(identity.tensors)
        roles = ["long_cot", "short_cot"] + (["base"] if spec.base else [])
        reads = [{role: name for role in roles} for name in order]
    specs = {name: identity.tensors[name].shape for name in order}
    started, t0 = now(), time.time()
    # AIM's importances depend on the base and the calibration only, never on the point: computed
    # (or read from the cache) once for every point
    importance, aim_stats = aim_importance(plan0, echo) if plan0.aim is not None else ({}, {})
    omega = plan0.aim.omega if plan0.aim is not None else None
    with ExitStack() as stack:
        stagings = {
            p: stack.enter_context(atomic_dir(outputs[p], "build", force=force, inputs=plans[p].paths)) for p in points
        }
        handles = {}
        roles_read = {role for names in reads for role in names} | ({"base"} if importance else set())
        for role in sorted(roles_read):
            for f in weight_files(plan0.paths[role]):
                h = stack.enter_context(safe_open(f, framework="pt"))
                for name in h.keys():
                    handles[(role, name)] = h
        writers = {p: StreamingSafetensorsWriter(stagings[p], specs, dtype) for p in points}
        # The random streams are replayed on torch's global generator: leave the caller's as it was.
        stack.enter_context(torch.random.fork_rng(devices=[]))
        try:
            desc = f"One-pass merge of {len(points)} {'points' if len({p[1] for p in points}) > 1 else 'ratios'}"
            for i, name in enumerate(tqdm(order, desc=desc, unit="tensor")):
                inputs = {role: handles[(role, src)].get_tensor(src).to(tdtype) for role, src in reads[i].items()}
                if replay is not None:
                    merged = replay.merge(i, inputs)
                else:
                    merged = (
                        (p, combine(method, p[0], inputs["long_cot"], inputs["short_cot"], inputs.get("base")))
                        for p in points
                    )
                if name in importance:
                    base = inputs["base"] if "base" in inputs else handles[("base", name)].get_tensor(name).to(tdtype)
                    merged = ((p, aim_step.relax(out, base, importance[name], omega)) for p, out in merged)
                for p, out in merged:
                    if not all_finite(out):
                        raise StageFailed(
                            f"merged tensor {name} at ratio {p[0]:g}"
                            + (f", density {p[1]:g}" if p[1] is not None else "")
                            + " has NaN/Inf values; nothing was written. "
                            "Try dtype float32, a different density, or check the inputs."
                        )
                    writers[p].write(name, out)
                del inputs
        finally:
            for w in writers.values():
                w.close()
        for p in points:
            extra = {}
            if importance:
                extra["aim"] = aim_step.save_beside(stagings[p], importance, plans[p].aim, aim_stats)
            give_identity(stagings[p], plans[p])
            write_build_manifest(stagings[p], plans[p], started, t0, one_pass=True, **extra)
    echo(f"{len(points)} teacher assistants written in one pass in {time.time() - t0:.1f} s")
    return {p: outputs[p] for p in points}
