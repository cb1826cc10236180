"""mergekit's task-vector merges (TIES, DARE, breadcrumbs, DELLA) for many points from one read.

A `build --ratio R` runs mergekit's GeneralizedTaskArithmeticMerge on each tensor: the delta of
every non-base side is sparsified (magnitude, breadcrumbs, DARE's random drop or DELLA's
magnitude-weighted drop, at the side's density), multiplied by the side's weight, optionally
sign-elected (TIES) and normalized, and added to the base. The sparsification does not look
at the weight, so one sparsified delta per (side, density) serves every ratio; only the
weighting, consensus and sum are per ratio.

The random drop draws from torch's global generator, seeded once per merge by mergekit
(`MergeOptions.random_seed`, via transformers' set_seed) and consumed tensor after tensor in
mergekit's execution order, one draw per non-base side in config order. Ratios 0 and 1 leave a
side out of the config (see Recipe.to_mergekit), so they draw once per tensor where interior
ratios draw twice: each (density, set of sides) is its own *random stream*, kept as a saved
generator state and replayed in mergekit's order here. All streams advance in the same pass,
so a ratio x density grid still reads every input tensor once.

The execution order and every parameter (density, rescale, normalize, lambda, gamma, epsilon)
come from mergekit's own planner for each stream's config; sparsification and sign election
are mergekit's functions. Tests compare every method against separate builds, bit for bit.
CPU only: where a GPU is present, `build` runs mergekit on it (other kernels, another random
generator), so multiratio builds each point separately there.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Optional

from micota_merge.merge.build import BuildPlan

Point = tuple[float, Optional[float]]  # (ratio, density)

_RANDOM = ("random", "della_magprune")  # sparsifications that draw from the generator


class Unsupported(ValueError):
    """The one-pass replay cannot promise separate builds' bits here; build per point."""


# The mergekit releases whose private internals (merge._model_out_config, the task adapter, the
# planner's schedule, get_mask) this replay was checked against bit for bit, by
# tests/test_multiratio.py in CI. Another release may plan or draw differently: the sweep then
# builds point by point with mergekit itself (slower, never different).
VERIFIED_MERGEKIT = ("0.1.5",)


def check_mergekit_version() -> None:
    """Raise Unsupported unless the installed mergekit is one the replay was verified against."""
    from importlib import metadata

    try:
        found = metadata.version("mergekit")
    except metadata.PackageNotFoundError:
        raise Unsupported("mergekit is not installed") from None
    if found not in VERIFIED_MERGEKIT:
        raise Unsupported(
            f"mergekit {found} is not a release the one-pass replay was verified against "
            f"({', '.join(VERIFIED_MERGEKIT)})"
        )


def merge_schedule(config: dict) -> list:
    """mergekit's per-tensor merge tasks for a config, in the order its executor runs them.

    This is the first half of mergekit.merge.run_merge (architecture, loader cache, planner,
    schedule), which reads only configs and safetensors headers.
    """
    from mergekit.architecture import get_architecture_info
    from mergekit.config import MergeConfiguration
    from mergekit.graph import Executor
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge import MergeOptions, _model_out_config
    from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask
    from mergekit.plan import MergePlanner

    merge_config = MergeConfiguration.model_validate(config)
    # No random_seed here: MergeOptions seeds the global generator when given one.
    options = MergeOptions(device="cpu", lazy_unpickle=True, quiet=True)
    arch_info = get_architecture_info(merge_config, options)
    loader_cache = LoaderCache()
    loader_cache.setup(options=options)
    out_config = _model_out_config(merge_config, arch_info, trust_remote_code=False)
    for model in merge_config.referenced_models():
        loader_cache.get(model)
    targets = MergePlanner(merge_config, arch_info, options=options, out_model_config=out_config).plan_to_disk(
        out_path="unused"
    )
    schedule = Executor(targets=targets, math_device="cpu", storage_device="cpu").schedule
    return [h.task() for h in schedule.tasks if isinstance(h.task(), ExecuteMergeMethodTask)]


class _Generator:
    """One random stream: torch's CPU generator state as mergekit's seeding leaves it."""

    def __init__(self, seed: int):
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # what transformers' set_seed does to torch
            self.state = torch.get_rng_state()

    @contextlib.contextmanager
    def active(self):
        import torch

        torch.set_rng_state(self.state)
        yield
        self.state = torch.get_rng_state()


@dataclass
class _Stream:
    density: Optional[float]
    sides: tuple[str, ...]  # non-base roles in mergekit's model order
    tasks: list
    points: list[Point] = field(default_factory=list)
    generator: Optional[_Generator] = None


class TaskVectorReplay:
    """Per tensor, every point's merged tensor, as separate mergekit builds would write it."""

    def __init__(self, plans: dict[Point, BuildPlan], seed: int):
        from mergekit import merge_methods

        first = next(iter(plans.values()))
        self.method = merge_methods.get(first.mergekit_config["merge_method"])
        sparsification = self.method.sparsification_method
        self.random = sparsification is not None and sparsification.value in _RANDOM
        self.role_of = {str(p): role for role, p in first.paths.items()}
        if len(self.role_of) < len(first.paths):  # mergekit would see one model in two roles
            raise Unsupported("two roles name the same checkpoint")
        self.weights: dict[Point, dict[str, float]] = {}
        streams: dict[tuple, _Stream] = {}
        for point, plan in plans.items():
            weights = {self.role_of[m["model"]]: m["parameters"]["weight"] for m in plan.mergekit_config["models"]}
            self.weights[point] = weights
            key = (point[1], tuple(weights))
            if key not in streams:
                tasks = merge_schedule(plan.mergekit_config)
                sides = tuple(self.role_of[self._path(m)] for m in tasks[0].model_order if m != tasks[0].base_model)
                if sides != key[1]:
                    raise Unsupported(f"mergekit orders the sides {sides}, the recipe {key[1]}")
                streams[key] = _Stream(point[1], sides, tasks, generator=_Generator(seed) if self.random else None)
            streams[key].points.append(point)
        # by density, so that magnitude-trimmed deltas shared within a density are dropped early
        self.streams = sorted(streams.values(), key=lambda s: (s.density or 0.0, s.sides))
        self.names = [t.output_weight.name for t in self.streams[0].tasks]
        for s in self.streams:
            if [t.output_weight.name for t in s.tasks] != self.names:
                raise Unsupported("mergekit runs the tensors in a different order for ratios 0 or 1")
        self.inputs = self._input_names(first)

    @staticmethod
    def _path(model_ref) -> str:
        return str(model_ref.model.path)

    def _input_names(self, plan: BuildPlan) -> list[dict[str, str]]:
        """For each output tensor, the tensor each role's checkpoint is read from."""
        from mergekit.io.tasks import GatherTensors

        out = []
        for i, name in enumerate(self.names):
            wanted: dict[str, str] = {}
            for s in self.streams:
                gather = s.tasks[i].gather_tensors
                if not isinstance(gather, GatherTensors):  # vocabulary permutation / truncation
                    raise Unsupported(f"mergekit reshapes the vocabulary of {name}")
                for ref, info in gather.weight_info.items():
                    role = self.role_of[self._path(ref)]
                    if wanted.setdefault(role, info.name) != info.name:
                        raise Unsupported(f"{name} is read from different tensors at different ratios")
            for role, tensor in wanted.items():
                found = plan.metas[role].tensors.get(tensor)
                if found is None:  # aliases and tied names are mergekit's business
                    raise Unsupported(f"{role} has no tensor {tensor} (mergekit would resolve an alias)")
                if found.dtype not in ("F32", "F16", "BF16"):
                    raise Unsupported(f"{role}'s {tensor} is {found.dtype}, not a float tensor to merge")
            out.append(wanted)
        return out

    def _key(self, stream: _Stream, side: str) -> tuple:
        # A drawn delta belongs to its stream; a magnitude-trimmed one to any stream at its density.
        return (stream.density, stream.sides, side) if self.random else (stream.density, side)

    def merge(self, index: int, inputs: dict) -> Iterator[tuple[Point, object]]:
        """Yield (point, merged tensor) for tensor `index`, given its inputs in the merge dtype.

        Streams go one after the other and a sparsified delta is dropped once no later stream
        needs it, so what is held is the inputs, one stream's deltas and the point being merged.
        """
        from mergekit.sparsify import RescaleNorm, sparsify

        base = inputs["base"]
        sparsified: dict[tuple, object] = {}
        for i, stream in enumerate(self.streams):
            task = stream.tasks[index]
            params = dict(task.parameters.items())
            per_side = {self.role_of[self._path(ref)]: dict(v.items()) for ref, v in task.input_parameters.items()}
            if any(self._key(stream, side) not in sparsified for side in stream.sides):
                with stream.generator.active() if self.random else contextlib.nullcontext():
                    for side in stream.sides:  # in mergekit's order: the draws follow one another
                        delta = inputs[side] - base
                        if self.method.sparsification_method:
                            own = per_side[side]
                            delta = sparsify(
                                delta,
                                density=own["density"],
                                method=self.method.sparsification_method,
                                rescale_norm=RescaleNorm.l1 if params["rescale"] else None,
                                **{k: own[k] for k in ("gamma", "epsilon") if k in own},
                            )
                        sparsified[self._key(stream, side)] = delta
                        del delta
            deltas = [sparsified[self._key(stream, s)] for s in stream.sides]
            later = {self._key(s, side) for s in self.streams[i + 1 :] for side in s.sides}
            for k in [k for k in sparsified if k not in later]:
                del sparsified[k]
            for point in stream.points:
                w = self.weights[point]
                yield point, self._combine(deltas, [w[s] for s in stream.sides], base, params)
            del deltas

    def _combine(self, deltas: list, weights: list[float], base, params: dict):
        """GeneralizedTaskArithmeticMerge.merge_group after its sparsification, op for op."""
        import torch
        from mergekit.merge_methods.generalized_task_arithmetic import get_mask

        stacked = base.new_empty((len(deltas), *base.shape))
        for i, d in enumerate(deltas):
            stacked[i] = d
        w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
        while stacked.dim() > w.dim():
            w.unsqueeze_(-1)
        stacked.mul_(w)
        # mergekit computes the normalizing divisor whether or not it divides by it; only `normalize`
        # uses it, so it is computed only then (the sum over the sides is the costly part).
        if self.method.consensus_method and len(deltas) == 1 and not params["normalize"]:
            # One side (a sweep's ratio 0 or 1) elects its own signs: the mask only drops its zeros,
            # and x * 0 is x for x = ±0, so the masked sum is the sum itself, bit for bit.
            mixed = stacked.sum(dim=0)
        elif self.method.consensus_method:
            mask_dtype = torch.int8 if params["int8_mask"] else base.dtype
            mask = get_mask(stacked, method=self.method.consensus_method, mask_dtype=mask_dtype)
            mixed = (stacked * mask).sum(dim=0)
            if params["normalize"]:
                divisor = (w * mask).sum(dim=0)
                divisor[divisor == 0] = 1
                mixed /= divisor
        else:
            mixed = stacked.sum(dim=0)
            if params["normalize"]:
                divisor = w.sum(dim=0)
                divisor[divisor.abs() < 1e-8] = 1
                mixed /= divisor
        if params["lambda"] != 1:
            mixed *= params["lambda"]
        return (base + mixed).to(base.dtype)
