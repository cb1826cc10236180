"""Pre-flight checks that only real checkpoint pairs reveal, read from metadata alone.

- Tokens: DeepSeek-R1-Distill-Qwen reuses Qwen2.5's added-token ids 151643-151649 for other
  tokens (151645 is `<|im_end|>` to Qwen2.5-Instruct, `<｜Assistant｜>` to R1). Both vocabularies
  have the same size, so nothing fails; the merged weights have learned both meanings, and the
  TA reads them through one side's tokenizer. `token_report` lists the colliding ids, and the
  ids the TA must stop on: every id that ends a turn for either parent (their eos ids and their
  templates' end-of-turn tokens), written into the TA's generation_config.json.
- Lineage: a side whose rope_theta differs from the base's was not fine-tuned from that base
  (R1-Distill-Qwen-1.5B/7B come from Qwen2.5-Math, rope_theta 10000, not Qwen2.5, 1e6).
- Tied embeddings: a side that ties lm_head to its embeddings has no lm_head tensor; mergekit
  then reads its embedding as its lm_head (Qwen2's architecture lists the tie), so the TA has
  its own lm_head and must not say tie_word_embeddings: true (`untie_config`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from micota_merge.core.checkpoints import CheckpointMeta, config_value, read_chat_template

SIDES = ("long_cot", "short_cot")


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def added_tokens(folder: Path) -> dict[int, tuple[str, bool]]:
    """{id: (content, special)} from tokenizer.json, tokenizer_config.json or added_tokens.json."""
    out: dict[int, tuple[str, bool]] = {}
    for t in _json(folder / "tokenizer.json").get("added_tokens") or []:
        out[int(t["id"])] = (t["content"], bool(t.get("special")))
    for i, t in (_json(folder / "tokenizer_config.json").get("added_tokens_decoder") or {}).items():
        out.setdefault(int(i), (t["content"], bool(t.get("special"))))
    for content, i in _json(folder / "added_tokens.json").items():
        out.setdefault(int(i), (content, True))
    return out


def _ids(value) -> set[int]:
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value} if isinstance(value, list) else set()


def _token_text(value) -> Optional[str]:
    return value.get("content") if isinstance(value, dict) else value


def turn_end_ids(folder: Path, tokens: dict[int, tuple[str, bool]]) -> dict[int, str]:
    """Ids that end an assistant turn for this checkpoint: eos ids of config.json and
    generation_config.json, its tokenizer's eos token, and the token its chat template closes
    an answer with. Values say where each id comes from."""
    by_text = {content: i for i, (content, _) in tokens.items()}
    why: dict[int, list[str]] = {}
    for name in ("config.json", "generation_config.json"):
        for i in _ids(_json(folder / name).get("eos_token_id")):
            why.setdefault(i, []).append(f"{name} eos")
    eos_text = _token_text(_json(folder / "tokenizer_config.json").get("eos_token"))
    if eos_text in by_text:
        why.setdefault(by_text[eos_text], []).append("tokenizer eos")
    template = read_chat_template(folder)
    if template:
        from micota_merge.core.templates import render_with_template, template_facts

        try:
            end = template_facts(render_with_template(template)).end_of_turn
        except Exception:  # a template this renderer cannot run: the eos ids above still count
            end = ""
        hit = max((c for c in by_text if c and end.startswith(c)), key=len, default=None)
        if hit:
            why.setdefault(by_text[hit], []).append("chat template's end of turn")
    return {i: ", ".join(w) for i, w in sorted(why.items())}


@dataclass
class TokenReport:
    warnings: list[str] = field(default_factory=list)
    collisions: list[tuple[int, str, str]] = field(default_factory=list)
    stop_ids: list[int] = field(default_factory=list)  # what the TA's generation_config.json stops on


def token_report(paths: dict[str, Path], keep: str) -> TokenReport:
    """Compare the two sides' added tokens id by id; decide the TA's stop ids."""
    rep = TokenReport()
    sides = [r for r in SIDES if r in paths]
    tokens = {r: added_tokens(paths[r]) for r in sides}
    ends = {r: turn_end_ids(paths[r], tokens[r]) for r in sides}
    other = next((r for r in sides if r != keep), None)
    kept_tokens = tokens.get(keep, {})
    if other and tokens[other] and kept_tokens:
        for i in sorted(set(tokens[keep]) & set(tokens[other])):
            if tokens[keep][i][0] != tokens[other][i][0]:
                rep.collisions.append((i, tokens[other][i][0], tokens[keep][i][0]))
    stop: dict[int, list[str]] = {}
    for r in sides:
        for i, why in ends[r].items():
            stop.setdefault(i, []).append(f"{r}: {why}")
    rep.stop_ids = sorted(stop)
    if rep.collisions:
        width = max(len(c[1]) for c in rep.collisions)
        rows = [f"    {'id':>6}  {other:<{width}}  {keep} (kept)"]
        for i, a, b in rep.collisions:
            rows.append(f"    {i:>6}  {a:<{width}}  {b}{'*' if kept_tokens[i][1] else ''}")
        stops = "; ".join(
            f"{i} = {kept_tokens.get(i, ('?', False))[0]} (ends a turn for {', '.join(stop[i])})" for i in rep.stop_ids
        )
        rep.warnings.append(
            f"{len(rep.collisions)} token ids mean different tokens to {other} and {keep} (the vocabularies have "
            f"the same size, so nothing fails):\n" + "\n".join(rows) + "\n"
            f"  The TA keeps {keep}'s tokenizer, chat template and stop tokens: whichever side's habit the merged "
            f"weights follow, an id is read as {keep}'s token (* = special there: dropped from decoded text, so "
            f"{other}'s token at that id leaves no trace in the records). The TA's generation_config.json stops "
            f"on every id that ends a turn for either side: {stops}"
        )
    return rep


def lineage_warnings(metas: dict[str, CheckpointMeta]) -> list[str]:
    """A side whose rope_theta differs from the base's was pre-trained apart from that base."""
    base = metas.get("base")
    if base is None:
        return []
    out = []
    for r in SIDES:
        if r not in metas:
            continue
        a, b = config_value(metas[r].config, "rope_theta"), config_value(base.config, "rope_theta")
        if a is not None and b is not None and float(a) != float(b):
            out.append(
                f"lineage: {r} has rope_theta {a} but base has {b}, so {r} was not fine-tuned from this base "
                f"(DeepSeek-R1-Distill-Qwen-1.5B/7B derive from Qwen2.5-Math, rope_theta 10000); its task "
                f"vector against base also holds the pre-training difference. Prefer the base it was "
                f"tuned from (see r1-qwen7b-math-ta.yaml), or compare ratios with `sweep` before trusting it"
            )
    return out


def tie_warnings(metas: dict[str, CheckpointMeta]) -> list[str]:
    """One line when some checkpoints tie lm_head to the embeddings and others do not."""
    tied = [r for r, m in metas.items() if "lm_head.weight" not in m.tensors]
    untied = [r for r, m in metas.items() if "lm_head.weight" in m.tensors]
    if not tied or not untied:
        return []
    line = (
        f"tie mismatch: {', '.join(untied)} {'has' if len(untied) == 1 else 'have'} a separate lm_head, "
        f"{', '.join(tied)} {'ties' if len(tied) == 1 else 'tie'} it to the embeddings; the merge reads "
        f"{'its' if len(tied) == 1 else 'their'} embedding as lm_head (untied), so the TA gets its own "
        f"lm_head.weight and tie_word_embeddings: false"
    )
    return [line]


def check_untie_supported(metas: dict[str, CheckpointMeta]) -> None:
    """Refuse a tie mismatch, before any weight is read, where mergekit cannot read a tied side's
    embedding as its lm_head (its architecture definition lists no tie): it would stop mid-merge
    with "Tensor lm_head.weight required but not present"."""
    from micota_merge.core.errors import UserError

    tied = [r for r, m in metas.items() if "lm_head.weight" not in m.tensors]
    if not tied or len(tied) == len(metas):
        return
    try:
        from mergekit.architecture import arch_info_for_config
        from transformers import AutoConfig

        meta = metas[tied[0]]
        config = AutoConfig.for_model(**{k: v for k, v in meta.config.items() if k != "transformers_version"})
        arch = arch_info_for_config(config)
        heads = [w for w in arch.all_weights(config) if w.name == "lm_head.weight"] if arch else []
    except Exception:  # an architecture mergekit only knows through transformers: it handles ties there
        return
    embed = "model.embed_tokens.weight"
    if heads and embed not in (heads[0].tied_names or ()):
        raise UserError(
            f"tie mismatch: {', '.join(tied)} ties lm_head to its embeddings and mergekit's {meta.architecture} "
            f"definition cannot read the embedding in its place. Untie it first: load it, set "
            f"config.tie_word_embeddings = False and lm_head.weight = a copy of {embed}, save_pretrained, "
            f"and use that folder"
        )


def untie_config(folder: Path) -> bool:
    """Set tie_word_embeddings false in folder/config.json when the weights hold a separate lm_head.

    A tied config over an lm_head tensor makes transformers drop the merged head and reuse the
    embedding, silently. Returns whether the config was changed.
    """
    from micota_merge.core.checkpoints import read_checkpoint

    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if not cfg.get("tie_word_embeddings") or "lm_head.weight" not in read_checkpoint(folder).tensors:
        return False
    cfg["tie_word_embeddings"] = False
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return True


def write_stop_ids(folder: Path, stop_ids: list[int]) -> None:
    """The TA's generation_config.json stops on `stop_ids` (other fields: the kept side's)."""
    if not stop_ids:
        return
    path = folder / "generation_config.json"
    gc = _json(path)
    old = _ids(gc.get("eos_token_id"))
    if old >= set(stop_ids) and path.is_file():
        return
    gc["eos_token_id"] = sorted(old | set(stop_ids))
    path.write_text(json.dumps(gc, indent=2) + "\n")


@dataclass
class ZeroTaskVector:
    """A side with the base's content has no task vector: what the merge then computes."""

    side: str  # the side that is the base
    other: str  # the side whose task vector is merged
    ratio_cancels: bool  # every ratio gives the same TA
    message: str

    def refuse_sweep(self, ratios: list, adaptive: bool = False) -> None:
        """A sweep where the ratio cancels would probe one TA again and again."""
        from micota_merge.core.errors import UserError

        if self.ratio_cancels and adaptive:
            raise UserError(f"sweep: {self.message}; every ratio is the same TA, so there is no length to search for")
        if self.ratio_cancels and len(ratios) > 1:
            n = len(ratios)
            raise UserError(f"sweep.ratios: {self.message}; a sweep over {n} ratios would probe one TA {n} times")


def _mergekit_default(method: str, name: str):
    import mergekit.merge_methods as mm

    spec = mm.get(method).spec
    return next((p.default for p in spec.parameters if p.name == name), None)


def zero_task_vector(method: str, params: dict, contents: dict[str, str], paths: dict) -> Optional[ZeroTaskVector]:
    """What merging over a base that *is* one side means (MiCoTA's chain merges a fine-tuned model with
    its own parent), for the recipe's method; None when both sides differ from the base.

    `contents` are the checkpoints' content fingerprints: a copy of the base is a zero task vector too."""
    from micota_merge.merge import methods

    if not methods.get(method).base or "base" not in contents:
        return None
    zero = [r for r in SIDES if r in contents and contents[r] == contents["base"]]
    if not zero:
        return None
    if len(zero) == 2:
        return ZeroTaskVector(
            "both", "none", True, "both sides have the base's content: every task vector is zero and the TA is the base"
        )
    side = zero[0]
    other = next(r for r in SIDES if r != side)
    import mergekit.merge_methods as mm

    default = _mergekit_default(method, "normalize")
    normalize = params.get("normalize", default)
    consensus = getattr(mm.get(method), "consensus_method", None) is not None
    left_out = paths.get(side) == paths.get("base")  # mergekit skips a model that is its base_model
    cancels = bool(normalize) and (left_out or consensus)
    weight = "ratio" if other == "long_cot" else "1 - ratio"
    sparsify = "drop and rescale" if method.startswith(("dare", "della")) else "trim"
    after = f" after its {sparsify}" if methods.get(method).density else ""
    if cancels:
        what = (
            f"with normalize (mergekit's default for {method}: {default}) the merge "
            f"divides by the weight of the one side with a task vector and the ratio cancels: every ratio gives "
            f"base + ({other} - base){after}, which is {other} itself up to the {sparsify}. Set merge.normalize: "
            f"false for the ratio to scale it"
        )
    else:
        what = f"the TA is base + ({weight}) x ({other} - base){after}"
        if other == "long_cot":
            what += ": the ratio moves it from the base (0) to long_cot (1)"
    msg = f"zero task vector: {side} has the base's content (the TA merges over {side} itself), so {what}"
    return ZeroTaskVector(side, other, cancels, msg)


def mergekit_tensor_names(meta: CheckpointMeta) -> Optional[set[str]]:
    """The tensor names mergekit's architecture definition writes for this checkpoint's config, or None
    where mergekit knows the architecture only through transformers. For Qwen3-MoE they are the fused
    `mlp.experts.gate_up_proj` / `down_proj` that transformers 5 loads, while Hub checkpoints store one
    tensor per expert: the TA's names are then not its inputs' (and the one-pass sweep does not apply)."""
    try:
        from mergekit.architecture import arch_info_for_config
        from transformers import AutoConfig

        config = AutoConfig.for_model(**{k: v for k, v in meta.config.items() if k != "transformers_version"})
        arch = arch_info_for_config(config)
        return {w.name for w in arch.all_weights(config) if not w.optional or w.name in meta.tensors} if arch else None
    except Exception:  # an architecture mergekit reads through transformers alone
        return None


def _thinking_mode(folder: Path) -> Optional[str]:
    """How a checkpoint's chat template asks for thinking, in words, from rendering it; None without one."""
    template = read_chat_template(folder)
    if not template:
        return None
    from micota_merge.core.templates import render_with_template, template_facts

    cfg = _json(folder / "tokenizer_config.json")
    bos, eos = _token_text(cfg.get("bos_token")) or "", _token_text(cfg.get("eos_token")) or ""
    try:
        plain = template_facts(render_with_template(template, bos, eos))
        off = template_facts(render_with_template(template, bos, eos, {"enable_thinking": False}))
    except Exception:  # a template this renderer cannot run
        return "a template this pre-flight cannot render"
    if off.prefill != plain.prefill:
        return f"hybrid: thinks by default, and enable_thinking=false prefills {off.prefill!r}"
    if plain.prefill:
        return f"always thinks: its generation prompt prefills {plain.prefill!r}"
    return "no thinking prefill; the model may still open <think> itself"


def template_report(paths: dict[str, Path], keep: str) -> list[str]:
    """Which side's template and thinking tokens the TA keeps, and how each side's template thinks."""
    sides = [r for r in SIDES if r in paths]
    modes = {r: _thinking_mode(paths[r]) for r in sides}
    if keep not in modes or modes[keep] is None:
        return []
    tokens = added_tokens(paths[keep])
    think = [
        f"{c} {i} ({'special' if sp else 'not special: kept in decoded text'})"
        for i, (c, sp) in sorted(tokens.items())
        if c in ("<think>", "</think>")
    ]
    line = f"template: the TA keeps {keep}'s chat template ({modes[keep]})"
    others = [f"{r}'s {modes[r]}" for r in sides if r != keep and modes[r] and modes[r] != modes[keep]]
    if others:
        line += "; " + ", ".join(others)
    if think:
        line += f"; its thinking tokens: {', '.join(think)}"
    return [line]
