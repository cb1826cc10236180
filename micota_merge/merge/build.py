"""build: the teacher assistant, through mergekit.

Reads only metadata before the merge (so a bad recipe fails in milliseconds, before any
weight is read), runs mergekit's Python API streaming tensors lazily from disk into a
staging folder beside the output, gives the TA one side's tokenizer, chat template and
config, checks every merged tensor for NaN/Inf, writes `micota.json`, then renames the
staging folder into place.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from pydantic import Field, ValidationError

from micota_merge.core.artifacts import atomic_dir, now, write_manifest
from micota_merge.core.checkpoints import (
    DTYPE_BYTES,
    TORCH_DTYPE_BYTES,
    CheckpointMeta,
    check_compatible,
    check_model_files,
    copy_tokenizer,
    resolve_model_path,
    tokenizer_fingerprint,
    weight_files,
)
from micota_merge.core.errors import StageFailed, UserError
from micota_merge.core.options import StageOptions, cli
from micota_merge.core.ownership import OWN, Claim, check_free_space, claim, identity_of, output_lock
from micota_merge.core.strict import Float, Int
from micota_merge.merge import aim as aim_step
from micota_merge.merge.preflight import (
    check_untie_supported,
    lineage_warnings,
    template_report,
    tie_warnings,
    token_report,
    untie_config,
    write_stop_ids,
    zero_task_vector,
)
from micota_merge.merge.recipe import Recipe, is_mergekit_config, parse_recipe, read_yaml

LOG = logging.getLogger("micota_merge.merge.build")


class BuildOptions(StageOptions):
    """Everything `micota-merge build` takes."""

    recipe: str = Field(description="A micota recipe or a plain mergekit YAML.")
    output: Optional[str] = Field(
        None, description="Where to write the TA (default: the recipe's `output`).", json_schema_extra=cli(short="-o")
    )
    ratio: Optional[Float] = Field(None, description="Override merge.ratio: the long-CoT share, 0..1.")
    force: bool = Field(
        False, description="Replace an output that this command wrote itself." + OWN, json_schema_extra=cli(flag=True)
    )
    dry_run: bool = Field(
        False, description="Validate and plan from metadata only; read no weights.", json_schema_extra=cli(flag=True)
    )
    print_mergekit: bool = Field(
        False, description="Print the mergekit YAML this recipe means and exit.", json_schema_extra=cli(flag=True)
    )
    device: Optional[str] = Field(
        None, description="Where mergekit does the math (default: cuda if available, else cpu)."
    )
    shard_size: Union[str, Int] = Field(
        "5GB",
        description="Largest output shard. Peak memory is about one shard plus a few tensors: use e.g. 1GB to "
        "merge 32B models on a 16 GB machine.",
    )


# Safety margin over the computed output size: config, tokenizer, index and filesystem slack.
_DISK_MARGIN = 1.05
_DISK_SLACK_BYTES = 64 << 20


@dataclass
class BuildPlan:
    """Everything decided before the first weight is read."""

    recipe: Optional[Recipe]
    mergekit_config: dict
    output: Path
    paths: dict[str, Path]
    metas: dict[str, CheckpointMeta]
    output_bytes: int
    warnings: list[str] = field(default_factory=list)
    source: str = ""
    stop_ids: list[int] = field(default_factory=list)  # ids the TA's generation_config.json stops on
    claim: Optional[Claim] = None  # what is at the output path now (ownership rule)
    identity: Optional[str] = None  # recipe and input content: an equal one means this TA is already built
    aim: Optional[aim_step.AimPlan] = None  # the AIM relaxation after the merge (merge.aim)

    @property
    def done(self) -> bool:
        return self.claim is not None and self.claim.same(self.identity)

    def describe(self) -> str:
        state = {"new": "new", "empty": "an empty folder, will be filled", None: "?"}.get(
            self.claim.state if self.claim else None,
            "already built from this recipe and inputs" if self.done else "an earlier build, replaced with --force",
        )
        lines = [f"output: {self.output}  ({self.output_bytes / 2**30:.2f} GiB)  [{state}]"]
        for role, path in self.paths.items():
            lines.append(f"{role:>9}: {path}  [{self.metas[role].architecture}]")
        if self.aim is not None:
            lines.append(
                f"      aim: omega {self.aim.omega:g}, calibrated on {self.aim.source}, blocks of "
                f"{self.aim.block_size} tokens (after the merge: one pass over the merged tensors)"
            )
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def load_build_input(path: str | Path) -> tuple[Optional[Recipe], Optional[dict]]:
    """A micota recipe, or a plain mergekit YAML (returned as a dict)."""
    data = read_yaml(path)
    if is_mergekit_config(data):
        return None, data
    return parse_recipe(data, str(path)), None


def with_ratio(recipe: Recipe, ratio: Optional[float]) -> Recipe:
    """A copy of the recipe with merge.ratio overridden (validated like the YAML field)."""
    if ratio is None:
        return recipe
    recipe = recipe.model_copy(deep=True)
    try:
        recipe.merge.ratio = ratio
    except ValidationError as e:  # pydantic re-validates on assignment
        raise UserError("--ratio: " + e.errors()[0]["msg"].removeprefix("Value error, ")) from None
    return recipe


def mergekit_yaml(recipe_path: str | Path, ratio: Optional[float] = None) -> str:
    """The mergekit YAML a recipe (or a plain mergekit config) means, without touching a checkpoint."""
    recipe, mk = load_build_input(recipe_path)
    if recipe is None:
        if ratio is not None:
            raise UserError(f"{recipe_path} is a plain mergekit config: --ratio applies to micota recipes only")
        return yaml.safe_dump(mk, sort_keys=False)
    recipe = with_ratio(recipe, ratio)
    text = recipe.to_mergekit_yaml()
    if recipe.merge.aim is not None:
        text += (
            f"# then AIM (merge.aim, omega {recipe.merge.aim.omega:g}): mergekit has no per-channel scale, so "
            "`micota-merge build` relaxes this merge's output towards base_model itself (micota_merge/merge/aim.py)\n"
        )
    return text


def plan_build(
    recipe_path: str | Path,
    output: Optional[str] = None,
    ratio: Optional[float] = None,
    force: bool = False,
    recipe: Optional[Recipe] = None,
    dry_run: bool = False,
    aim: Optional[aim_step.AimPlan] = None,
) -> BuildPlan:
    """Validate the recipe and the checkpoints from metadata only; raise UserError on anything wrong.

    With `dry_run`, too little disk for the output is a warning: a recipe is often checked on a
    laptop before it is built on the machine with the space. `aim`: the recipe's AIM plan, made
    already (the sweep's points share one: it does not depend on the ratio or density)."""
    recipe_path = Path(recipe_path)
    base_dir = recipe_path.parent
    if recipe is None:
        recipe, mk = load_build_input(recipe_path)
    else:
        mk = None
    if recipe is not None:
        recipe = with_ratio(recipe, ratio)
        out = Path(output or recipe.output)
        specs = recipe.model_specs()
    else:
        if ratio is not None:
            raise UserError(f"{recipe_path} is a plain mergekit config: --ratio applies to micota recipes only")
        if not output:
            raise UserError(f"{recipe_path} is a plain mergekit config: give the output folder with --output")
        out = Path(output)
        specs = _mergekit_model_specs(mk, recipe_path)

    paths = {role: resolve_model_path(spec, f"models.{role}", base_dir) for role, spec in specs.items()}
    claimed = claim(out, "build", inputs=paths, option="output")
    # the same checks as every stage that loads a model, also under --dry-run: they read no weight
    metas = {role: check_model_files(p, f"models.{role}", tokenizer=False) for role, p in paths.items()}
    identity = recipe.identity_role if recipe else next(iter(metas))
    # The identity side goes first so that warnings say whose values the TA keeps.
    ordered = {identity: metas[identity], **{r: m for r, m in metas.items() if r != identity}}
    warnings = check_compatible(ordered).warnings + lineage_warnings(metas) + tie_warnings(metas)
    check_untie_supported(metas)
    stop_ids: list[int] = []
    if recipe is not None:
        warnings += _tokenizer_warnings(paths, recipe.tokenizer)
        tokens = token_report(paths, recipe.tokenizer)
        warnings += tokens.warnings + template_report(paths, recipe.tokenizer)
        stop_ids = tokens.stop_ids
        mk_cfg = recipe.to_mergekit({r: str(p) for r, p in paths.items()})
        dtype = recipe.merge.dtype
    else:
        mk_cfg = _with_resolved_paths(mk, specs, paths)
        dtype = mk.get("out_dtype") or mk.get("dtype")
    _validate_with_mergekit(mk_cfg, str(recipe_path))

    inputs_content = {role: m.fingerprint()["content"] for role, m in metas.items()}
    if recipe is not None:
        zero = zero_task_vector(recipe.merge.method, recipe.merge.extra_params, inputs_content, paths)
        warnings += [zero.message] if zero else []
    what = recipe.model_dump(mode="json", exclude={"output", "sweep", "pipeline", "models"}) if recipe else mk
    if aim is None and recipe is not None:
        aim = aim_step.plan(recipe, paths, base_dir)
    # the calibration texts' content joins the identity only when there is one: older TAs keep theirs
    calibration = {"calibration": aim.record()} if aim else {}
    build_id = identity_of({"build": what, "inputs": inputs_content, **calibration})
    if claimed.state == "ours" and not force and not dry_run and claimed.identity() != build_id:
        raise UserError(
            f"output {out} already exists and holds a TA built from another recipe or other inputs: pass --force to "
            "replace it, or choose another --output"
        )

    output_bytes = metas[identity].n_bytes(dtype)
    head = next((m.tensors["lm_head.weight"] for m in metas.values() if "lm_head.weight" in m.tensors), None)
    if head is not None and "lm_head.weight" not in metas[identity].tensors:  # untied: the TA gets its own head
        output_bytes += head.numel * TORCH_DTYPE_BYTES.get(dtype or "", DTYPE_BYTES.get(head.dtype, 4))
    if not (claimed.state == "ours" and claimed.identity() == build_id):
        try:
            _check_disk(out, output_bytes)
        except UserError as e:
            if not dry_run:
                raise
            warnings.append(f"{e} (a real build stops here)")
    return BuildPlan(
        recipe, mk_cfg, out, paths, metas, output_bytes, warnings, str(recipe_path), stop_ids, claimed, build_id, aim
    )


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2G' or a byte count -> bytes (decimal units, as Hugging Face shards)."""
    if isinstance(text, int):
        return text
    t = text.strip().upper().removesuffix("B")
    units = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except (ValueError, IndexError):
        raise UserError(f"--shard-size {text!r}: give a size such as 5GB, 500MB or a byte count") from None


def build(opts: BuildOptions, recipe: Optional[Recipe] = None, echo=print) -> Path:
    """Merge the recipe's checkpoints into a teacher assistant folder. Returns its path.

    `recipe`, when given, is the parsed recipe to use instead of re-reading `opts.recipe` (the sweep's
    points)."""
    recipe_path, output, ratio, force, dry_run = opts.recipe, opts.output, opts.ratio, opts.force, opts.dry_run
    device = opts.device
    shard_bytes = parse_size(opts.shard_size)
    check_device(device)
    plan = plan_build(recipe_path, output, ratio, force, recipe=recipe, dry_run=dry_run)
    for w in plan.warnings:
        echo(f"warning: {w}")
    if dry_run:
        echo(plan.describe())
        echo("mergekit config:\n" + yaml.safe_dump(plan.mergekit_config, sort_keys=False))
        return plan.output
    with output_lock(plan.output, "build", log=echo):
        plan.claim = claim(plan.output, "build", inputs=plan.paths)  # again, now that no one else can write
        if plan.done and not force:
            echo(
                f"already built: {plan.output} holds this recipe's TA from inputs of the same content; nothing "
                "to do (--force rebuilds it)"
            )
            return plan.output
        _merge_into(plan, force, device, shard_bytes, echo)
    return plan.output


def _merge_into(plan: BuildPlan, force: bool, device: Optional[str], shard_bytes: int, echo) -> None:
    started = now()
    t0 = time.time()
    with atomic_dir(plan.output, "build", force=force, inputs=plan.paths) as staging:
        seed = plan.recipe.merge.seed if plan.recipe else 0
        run_mergekit(plan.mergekit_config, staging, seed=seed, device=device, shard_bytes=shard_bytes)
        extra = {}
        if plan.aim is not None:
            importance, stats = aim_importance(plan, echo)
            n = aim_step.relax_checkpoint(staging, plan.aim, importance, echo)
            echo(f"AIM: {n} merged tensors relaxed towards the base (omega {plan.aim.omega:g})")
            extra["aim"] = aim_step.save_beside(staging, importance, plan.aim, stats)
        if plan.recipe is not None:
            give_identity(staging, plan)
        if untie_config(staging):
            echo("config.json: tie_word_embeddings set to false (the TA has its own lm_head)")
        check_finite(staging)
        write_build_manifest(staging, plan, started, t0, **extra)
    echo(f"teacher assistant written to {plan.output} in {time.time() - t0:.1f} s")


def aim_importance(plan: BuildPlan, echo=print):
    """The base model's channel importances for the plan's AIM step (cached by content, see aim.py)."""
    recipe = plan.recipe
    return aim_step.importance_for(
        plan.aim,
        plan.metas["base"].fingerprint()["content"],
        plan.metas[recipe.tokenizer].fingerprint()["content"],
        recipe.merge.dtype,
        echo,
    )


def check_device(device: Optional[str]) -> None:
    """A device name that torch cannot use fails now, not after the inputs are read."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {device!r}: not a device torch knows; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA GPU is visible here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) are visible")
    elif dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device {device}: mergekit merges on cpu or cuda only")


def run_mergekit(
    config: dict, out_dir: Path, seed: int = 0, device: Optional[str] = None, shard_bytes: int = 5 * 10**9
) -> None:
    """mergekit's own merge: lazy loading, sharded safetensors, GPU when there is one.

    mergekit's writer holds one whole output shard in memory before writing it, so peak memory
    is about one shard plus a few tensors: smaller shards, less memory.
    """
    import torch
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    options = MergeOptions(
        device=device,
        cuda=device.startswith("cuda"),
        lazy_unpickle=True,
        copy_tokenizer=False,  # the TA takes one side's tokenizer: see _give_identity
        random_seed=seed,
        out_shard_size=shard_bytes,
        write_model_card=True,
        quiet=False,
    )
    try:
        run_merge(MergeConfiguration.model_validate(config), str(out_dir), options=options)
    except (RuntimeError, ValueError, KeyError) as e:
        raise StageFailed(f"mergekit failed: {type(e).__name__}: {e}") from e


def check_finite(folder: Path) -> int:
    """Every merged tensor must be finite; name the first that is not. Returns tensors checked."""
    import torch
    from safetensors import safe_open
    from tqdm import tqdm

    files = weight_files(folder)
    if not files:
        raise StageFailed(f"the merge wrote no weights into {folder}")
    names = []
    for f in files:
        with safe_open(f, framework="pt") as st:
            names += [(f, n) for n in st.keys()]
    current, handle = None, None
    for f, name in tqdm(names, desc="Checking merged tensors for NaN/Inf", unit="tensor"):
        if f != current:
            handle = safe_open(f, framework="pt")
            current = f
        t = handle.get_tensor(name)
        if t.is_floating_point() and not torch.isfinite(t).all():
            n_bad = int((~torch.isfinite(t)).sum())
            raise StageFailed(
                f"merged tensor {name} has {n_bad} NaN/Inf values; nothing was written. "
                "Try dtype float32, a different density, or check the inputs."
            )
    return len(names)


# ------------------------------------------------------------------ helpers


def give_identity(staging: Path, plan: BuildPlan) -> None:
    """The TA speaks like one side: its tokenizer, chat template, generation config and config.json; and it
    carries its own model card (in place of mergekit's, which knows nothing of the roles)."""
    from micota_merge.core import cards

    recipe = plan.recipe
    copy_tokenizer(plan.paths[recipe.tokenizer], staging)
    cfg = json.loads((plan.paths[recipe.identity_role] / "config.json").read_text())
    # Both spellings: transformers >= 4.56 reads `dtype`, older stacks (and vLLM on them) `torch_dtype`.
    cfg["dtype"] = cfg["torch_dtype"] = recipe.merge.dtype
    (staging / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    write_stop_ids(staging, plan.stop_ids)
    cards.write(staging, cards.ta_card(recipe, {role: m.fingerprint() for role, m in plan.metas.items()}))


def write_build_manifest(staging: Path, plan: BuildPlan, started: str, t0: float, **extra: Any) -> None:
    from micota_merge.core.fingerprint import checkpoint_fingerprint

    # The TA's own identity, hashed while its bytes are still in the page cache; the digest cache
    # this leaves in the folder (keyed by size and mtime) serves every later stage that reads it.
    output = checkpoint_fingerprint(staging)
    write_manifest(
        staging,
        "build",
        recipe=plan.recipe.model_dump(mode="json") if plan.recipe else None,
        recipe_file=str(plan.source),
        mergekit_config=plan.mergekit_config,
        inputs={role: m.fingerprint() for role, m in plan.metas.items()},
        seed=plan.recipe.merge.seed if plan.recipe else 0,
        warnings=plan.warnings,
        started=started,
        finished=now(),
        seconds=round(time.time() - t0, 3),
        results={"output_bytes": plan.output_bytes},
        output={"content": output["content"], "files": output["files"]},
        identity=plan.identity,
        **extra,
    )


def _tokenizer_warnings(paths: dict[str, Path], keep: str) -> list[str]:
    fps = {role: tokenizer_fingerprint(p) for role, p in paths.items() if role != "base"}
    out = []
    if len({fp["vocab"] for fp in fps.values()}) > 1:
        out.append(
            f"long_cot and short_cot have different tokenizers (vocabulary or added tokens); "
            f"the TA keeps {keep}'s tokenizer ({paths[keep]})"
        )
    if len({fp["chat_template"] for fp in fps.values()}) > 1:
        out.append(f"long_cot and short_cot have different chat templates; the TA keeps {keep}'s")
    if keep in paths and not any(
        (paths[keep] / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer.model")
    ):
        out.append(f"{keep} ({paths[keep]}) has no tokenizer files: the TA will have no tokenizer")
    return out


def _mergekit_model_specs(mk: dict, source: Path) -> dict[str, str]:
    specs: dict[str, str] = {}
    for i, entry in enumerate(mk.get("models") or []):
        model = entry.get("model") if isinstance(entry, dict) else None
        if not isinstance(model, str):
            raise UserError(f"{source}: models[{i}].model must be a path or hub id")
        specs[f"models[{i}]"] = model
    if isinstance(mk.get("base_model"), str) and mk["base_model"] not in specs.values():
        specs["base_model"] = mk["base_model"]
    if not specs:
        raise UserError(f"{source}: a mergekit config with `models:` is needed (slices are not supported here)")
    return specs


def _with_resolved_paths(mk: dict, specs: dict[str, str], paths: dict[str, Path]) -> dict:
    by_spec = {spec: str(paths[role]) for role, spec in specs.items()}
    cfg = json.loads(json.dumps(mk))
    for entry in cfg.get("models") or []:
        entry["model"] = by_spec.get(entry["model"], entry["model"])
    if isinstance(cfg.get("base_model"), str):
        cfg["base_model"] = by_spec.get(cfg["base_model"], cfg["base_model"])
    return cfg


def _validate_with_mergekit(cfg: dict, source: str) -> None:
    """Let mergekit parse the config now, so its complaints come before any weight is read."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge_methods import registry

    try:
        parsed = MergeConfiguration.model_validate(cfg)
    except Exception as e:
        raise UserError(f"{source}: mergekit rejects the config: {str(e).splitlines()[0]}") from None
    names = sorted(m.spec.name for m in registry.registered_methods())
    if parsed.merge_method not in names:
        raise UserError(f"{source}: unknown merge_method {parsed.merge_method!r}; mergekit has: {', '.join(names)}")


def _check_disk(out: Path, needed: int) -> None:
    check_free_space(out, int(needed * _DISK_MARGIN) + _DISK_SLACK_BYTES, f"{out} (the TA)")
