"""The documentation names only commands, options, files and links that exist.

Read: README.md, docs/**/*.md and bench/README.md. Checked, without loading any model:

- every `micota-merge COMMAND [SUBCOMMAND] --option ...` in a code block or a code span: the
  command exists in the click group, and each option belongs to that command or to a group above
  it. Only invocations of micota-merge are read (a line or span, or a part of one after `&&`, `;`
  or `|`, that starts with `micota-merge`, `.venv/bin/micota-merge`, a bare command name followed
  by an option, or `-m micota_merge.cli`, which is the CLI itself); lines of other tools
  (`lm_eval`, `accelerate launch`'s own flags, `vllm serve`, `pip`, `pytest`, `python bench/...`)
  are not, so their options never count;
- a code span that is just a long option (`--keep-all`) names an option some micota-merge command has;
- every relative markdown link points to an existing file, and its `#anchor` to a heading there;
- every repository path in code (`micota_merge/...`, `scripts/...`, `bench/...`, `tests/...`,
  `docs/...`) exists, and every dotted `micota_merge.module.name` resolves to a module and a
  top-level name in it (read with ast, never imported);
- the README's first two bash blocks are the two commands CI runs (.ci/run extracts them).
"""

from __future__ import annotations

import ast
import re
import shlex
from functools import lru_cache
from pathlib import Path

import click
import pytest

from micota_merge.cli import cli

REPO = Path(__file__).resolve().parents[1]
PROG = "micota-merge"
HELP = {"--help", "-h"}


def doc_files() -> list[Path]:
    files = [REPO / "README.md", *sorted((REPO / "docs").glob("**/*.md")), REPO / "bench" / "README.md"]
    return [f for f in files if f.is_file()]


# ------------------------------------------------------------------------------ markdown


def split_markdown(text: str) -> tuple[list[str], list[str], list[str]]:
    """(code-block lines with `\\` continuations joined, inline code spans, prose paragraphs
    with the code spans left in place)."""
    code, prose, in_fence, fence = [], [], False, ""
    pending = ""
    for line in text.splitlines():
        m = re.match(r"^\s*(```+|~~~+)", line)
        if m and (not in_fence or m.group(1)[0] == fence[0]):
            if in_fence and pending:
                code.append(pending)
            in_fence, fence, pending = not in_fence, m.group(1), ""
            prose.append("")
            continue
        if in_fence:
            joined = (pending + " " + line.strip()) if pending else line.strip()
            if joined.endswith("\\"):
                pending = joined[:-1].rstrip()
            else:
                code.append(joined)
                pending = ""
            prose.append("")
        else:
            prose.append(line)
    paragraphs = [p for p in re.split(r"\n\s*\n", "\n".join(prose)) if p.strip()]
    spans = []
    for para in paragraphs:
        for m in re.finditer(r"(`+)(.+?)(?<!`)\1(?!`)", para, re.S):
            spans.append(" ".join(m.group(2).split()))
    return code, spans, paragraphs


def strip_spans(paragraph: str) -> str:
    return re.sub(r"(`+)(.+?)(?<!`)\1(?!`)", " ", paragraph, flags=re.S)


# ------------------------------------------------------------------------------ the CLI


def _names(cmd: click.Command) -> set[str]:
    return {o for p in cmd.params if isinstance(p, click.Option) for o in (*p.opts, *p.secondary_opts)} | HELP


@lru_cache(maxsize=1)
def all_options() -> frozenset[str]:
    found: set[str] = set()

    def walk(cmd: click.Command) -> None:
        found.update(_names(cmd))
        for sub in getattr(cmd, "commands", {}).values():
            walk(sub)

    walk(cli)
    return frozenset(found)


def _tokens(segment: str) -> list[str]:
    segment = re.sub(r"(^|\s)#.*$", "", segment)  # a shell comment
    try:
        raw = shlex.split(segment)
    except ValueError:  # an unbalanced quote in a placeholder: plain words are enough here
        raw = segment.split()
    out = []
    for tok in raw:
        tok = tok.strip("[](),")
        if tok.startswith("-") and "/--" in tok:  # --question-field/--answer-field/--id-field
            out.extend(t for t in tok.split("/") if t)
        elif tok and tok not in ("...", "…", "|"):
            out.append(tok)
    return out


def invocations(text: str) -> list[list[str]]:
    """The arguments of each micota-merge invocation in one code line or span."""
    found = []
    for segment in re.split(r"\s(?:&&|\|\||\||;)\s", text):
        toks = _tokens(segment)
        while toks and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", toks[0]):  # VAR=value before a command
            toks.pop(0)
        if not toks:
            continue
        if toks[0] == PROG or toks[0].endswith("/" + PROG):
            found.append(toks[1:])
        elif toks[0] in cli.commands and len(toks) > 1 and toks[1].startswith("--"):
            found.append(toks)  # `build --dry-run` in prose
        elif "micota_merge.cli" in toks:
            i = toks.index("micota_merge.cli")
            if i > 0 and toks[i - 1] == "-m":
                found.append(toks[i + 1 :])
    return found


def _is_option(tok: str) -> bool:
    # a quoted value with a space in it (`--serve-args "--data-parallel-backend ray"`) is a value
    return bool(re.match(r"^--?[A-Za-z][^\s]*$", tok))


def check_invocation(args: list[str]) -> list[str]:
    """What is wrong with one invocation's commands and options."""
    problems = []
    cmd: click.Command = cli
    path = [PROG]
    valid = set(_names(cli))
    placeholder = False
    for tok in args:
        if _is_option(tok):
            name = tok.split("=", 1)[0]
            allowed = all_options() if placeholder else valid
            if name not in allowed:
                problems.append(f"`{' '.join(path)}` has no option {name}")
            continue
        if isinstance(cmd, click.Group) and not placeholder:
            if tok in cmd.commands:
                cmd = cmd.commands[tok]
                path.append(tok)
                valid |= _names(cmd)
            elif re.fullmatch(r"[A-Z][A-Z_]*", tok):  # micota-merge COMMAND --help
                placeholder = True
            else:
                problems.append(f"`{' '.join(path)}` has no command {tok!r}")
                break
        # anything else is an argument or an option's value
    return problems


# ------------------------------------------------------------------------------ files


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    text = text.replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of a markdown text's headings (a repeated heading gets -1, -2, ...)."""
    seen: dict[str, int] = {}
    out = set()
    in_fence = False
    for line in text.splitlines():
        if re.match(r"^\s*(```|~~~)", line):
            in_fence = not in_fence
            continue
        m = None if in_fence else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            s = slug(m.group(1))
            n = seen.get(s, 0)
            out.add(s if n == 0 else f"{s}-{n}")
            seen[s] = n + 1
    return out


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REPO_PATH = re.compile(r"(?<![\w./-])((?:micota_merge|scripts|bench|tests|docs|\.ci)/[\w./-]*)")
MODULE_REF = re.compile(r"(?<![\w./-])(micota_merge(?:\.\w+)+)")


def link_problems(paragraphs: list[str], base: Path, own_text: str) -> list[str]:
    problems = []
    for para in paragraphs:
        for target in LINK.findall(strip_spans(para)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (base / file_part).resolve() if file_part else None
            if dest is not None and not dest.exists():
                problems.append(f"link to {target}: no such file")
            elif anchor and (dest is None or dest.suffix == ".md"):
                text = own_text if dest is None else dest.read_text(encoding="utf-8")
                if anchor not in anchors(text):
                    problems.append(f"link to {target}: no heading #{anchor} there")
    return problems


@lru_cache(maxsize=None)
def _top_level(module: Path) -> frozenset[str]:
    tree = ast.parse(module.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name):
                        names.add(n.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return frozenset(names)


def module_ref_problem(ref: str) -> str | None:
    parts = ref.split(".")
    here = REPO / parts[0]
    for i, part in enumerate(parts[1:], start=1):
        if (here / part).is_dir() and (here / part / "__init__.py").is_file():
            here = here / part
            continue
        module = here / f"{part}.py"
        rest = parts[i + 1 :]
        if module.is_file():
            if rest and rest[0] not in _top_level(module):
                return f"{ref}: {'.'.join(parts[: i + 1])} has no {rest[0]}"
            return None
        init = here / "__init__.py"
        if init.is_file() and part in _top_level(init):
            return None
        return f"{ref}: no module or name {part} in {'.'.join(parts[:i])}"
    return None


def code_path_problems(items: list[str]) -> list[str]:
    problems = []
    for item in items:
        for m in REPO_PATH.finditer(item):
            rel = m.group(1).rstrip(".,:;")
            if item[m.end() : m.end() + 1] in ("<", "{", "*"):  # micota_merge/assets/model_meta/<org>__<name>/
                continue
            if not (REPO / rel).exists():
                problems.append(f"path {rel} does not exist")
        for ref in MODULE_REF.findall(item):
            problem = module_ref_problem(ref)
            if problem:
                problems.append(problem)
    return problems


# ------------------------------------------------------------------------------ one document


def check_text(text: str, base: Path = REPO) -> list[str]:
    """Every problem in one markdown text (links resolved from `base`)."""
    code, spans, paragraphs = split_markdown(text)
    problems = []
    for item in code + spans:
        for args in invocations(item):
            problems += check_invocation(args)
    for span in spans:
        m = re.match(r"^(--[A-Za-z][\w-]*)", span)
        if m and not invocations(span):
            for name in m.group(0).split("/"):
                if name not in all_options():
                    problems.append(f"`{span}`: no micota-merge command has {name}")
    problems += link_problems(paragraphs, base, text)
    problems += code_path_problems(code + spans)
    return problems


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_doc_names_only_what_exists(doc):
    problems = check_text(doc.read_text(encoding="utf-8"), doc.parent)
    assert not problems, f"{doc.relative_to(REPO)}:\n  " + "\n  ".join(dict.fromkeys(problems))


def test_docs_are_all_read():
    names = {str(p.relative_to(REPO)) for p in doc_files()}
    assert {"README.md", "bench/README.md", "docs/concepts.md", "docs/stages/build.md"} <= names


def test_readme_starts_with_the_two_commands_ci_runs():
    # .ci/run takes the first two ```bash blocks: setup + the embedded demo, then the tests
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), re.S)
    assert [b.strip() for b in blocks[:2]] == [
        "bash scripts/setup.sh && .venv/bin/micota-merge run micota_merge/recipes/pipeline/demo-pipeline.yaml",
        ".venv/bin/python -m pytest",
    ]


def test_recipes_in_the_docs_are_valid():
    """Every ```yaml block with `models:` in the docs is a recipe the recipe models accept."""
    import yaml

    from micota_merge.merge.recipe import parse_recipe

    seen = 0
    for doc in doc_files():
        for block in re.findall(r"```yaml\n(.*?)```", doc.read_text(encoding="utf-8"), re.S):
            data = yaml.safe_load(block)
            if isinstance(data, dict) and "models" in data:
                parse_recipe(data, f"{doc.relative_to(REPO)} yaml block")
                seen += 1
    assert seen >= 2  # the README's minimal recipe and docs/recipes.md's full one


def test_readme_links_every_docs_page():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    linked = {(REPO / t.partition("#")[0]).resolve() for t in LINK.findall(readme) if not t.startswith("http")}
    pages = {p.resolve() for p in (REPO / "docs").glob("**/*.md")} | {(REPO / "bench" / "README.md").resolve()}
    missing = sorted(str(p.relative_to(REPO)) for p in pages - linked)
    assert not missing, f"README.md links no page {missing}"


# ------------------------------------------------------------------------------ the checker itself


def test_the_checker_catches_what_does_not_exist(tmp_path):
    (tmp_path / "there.md").write_text("# A heading: `x`\n", encoding="utf-8")
    bad = "\n".join(
        [
            "Run `micota-merge build RECIPE --made-up-option` and `.venv/bin/micota-merge frobnicate`.",
            "Or `micota-merge demo init --ratio 0.5` (a build option, not demo init's), `sweep --no-such`,",
            "and `--not-an-option` alone, then [a page](missing.md), [an anchor](there.md#nowhere),",
            "[here](#not-here).",
            "",
            "```bash",
            "bash scripts/setup.sh && .venv/bin/micota-merge eval --model M \\",
            "    --bogus 3",
            "MICOTA_VLLM_PYTHON=x micota-merge generate --model M --nope",
            "accelerate launch --num_processes 8 -m micota_merge.cli distill --config c.yaml --lr-typo 1",
            "```",
            "",
            "The code: `micota_merge/core/no_such_module.py` and `micota_merge.core.ownership.no_such_name`.",
        ]
    )
    problems = "\n".join(check_text(bad, tmp_path))
    for expected in (
        "`micota-merge build` has no option --made-up-option",
        "`micota-merge` has no command 'frobnicate'",
        "`micota-merge demo init` has no option --ratio",
        "`micota-merge sweep` has no option --no-such",
        "no micota-merge command has --not-an-option",
        "link to missing.md: no such file",
        "link to there.md#nowhere: no heading #nowhere there",
        "link to #not-here: no heading #not-here there",
        "`micota-merge eval` has no option --bogus",
        "`micota-merge generate` has no option --nope",
        "`micota-merge distill` has no option --lr-typo",
        "path micota_merge/core/no_such_module.py does not exist",
        "micota_merge.core.ownership has no no_such_name",
    ):
        assert expected in problems, f"{expected!r} not caught in:\n{problems}"


def test_the_checker_leaves_other_tools_and_real_names_alone(tmp_path):
    (tmp_path / "there.md").write_text("# The `sweep:` section\n\n## Ownership: nothing of yours\n", encoding="utf-8")
    good = "\n".join(
        [
            "# Title",
            "",
            "`micota-merge build RECIPE --dry-run -o DIR`, `micota-merge --debug demo init --out D`,",
            "`micota-merge COMMAND --help`, `run --until generate`, `--keep-all`,",
            "`lm_eval run --model hf --include_path micota_merge/evaluation/tasks --apply_chat_template`,",
            "`vllm serve --reasoning-parser`, `pip install deepspeed`, `-m slow`,",
            "[a page](there.md), [a section](there.md#the-sweep-section),",
            "[another](there.md#ownership-nothing-of-yours), [out](https://example.com/x.md), [up](#title).",
            "",
            "```bash",
            "vllm serve outputs/ta --port 8000 --data-parallel-size 8 --generation-config vllm",
            "accelerate launch --config_file micota_merge/recipes/accelerate/fsdp.yaml --num_processes 8 \\",
            "    -m micota_merge.cli distill --config c.yaml --data d.jsonl --out o",
            "micota-merge eval --model M [--backend hf|vllm|openai] [--base-url URL ...]   # a comment --nope",
            "micota-merge generate --question-field/--answer-field/--id-field",
            'micota-merge generate --backend vllm --serve-args "--data-parallel-backend ray"',
            "python bench/sweep.py --size-gb 1.0 --method linear",
            "```",
            "",
            "`micota_merge.evaluation.grading.grade(response, gold)` and `micota_merge/core/ownership.py`.",
        ]
    )
    assert check_text(good, tmp_path) == []
