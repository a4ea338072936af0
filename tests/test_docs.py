"""The docs work as written: every relative link and #anchor of README.md and docs/*.md resolves,
and every shell and Python block is run here or says why not.

Each ```bash / ```python block is preceded by one annotation (an HTML comment, invisible on GitHub):

    <!-- doctest: run -->                  run verbatim
    <!-- doctest: tiny -->                 run with the tiny Stable Diffusion stand-in, as README.md
                                           says: TINY_SD is appended to every SD script's command
                                           (in place of its `...`)
    <!-- doctest: skip (why) -->           not run here, with the reason

`, slow` after run/tiny marks a block that takes more than about 20 s. A block without an
annotation fails the test. Blocks run in a scratch folder that links the repository's scripts/,
data/, configs/ and models/, so that their outputs/ stay out of the repository.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
CODE_LANGUAGES = {"bash": "bash", "sh": "bash", "shell": "bash", "python": "python"}
ANNOTATION = re.compile(r"^<!-- doctest: (run|tiny|skip)(, slow)?(?: \((.+)\))? -->$")
# README.md, "The paper's runs": the stand-in's flags, and the two that make a run seconds long.
TINY_SD = ("--config outputs/tiny_sd/tiny.yaml --ckpt outputs/tiny_sd/tiny.safetensors --H 64 --W 64 "
           "--extractor_weights random --optim_timesteps 2 --optim_num_steps 1")
SD_SCRIPT = re.compile(r"^python scripts/(\w+_guided2?|feature_guided)\.py\b")
LINKED = ("scripts", "data", "configs", "models")


@dataclass
class Block:
    page: Path
    line: int
    language: str
    code: str
    mode: str | None          # run, tiny, skip or None (no annotation)
    slow: bool
    reason: str | None

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def code_blocks(page: Path) -> list[Block]:
    """The fenced blocks of `page` in a language that runs, with their annotations."""
    lines, blocks, i = page.read_text().splitlines(), [], 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        language = CODE_LANGUAGES.get(fence[1])
        if language:
            above = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            note = ANNOTATION.match(above.strip())
            blocks.append(Block(page, i + 1, language, "\n".join(lines[i + 1:end]) + "\n",
                                note and note[1], bool(note and note[2]), note and note[3]))
        i = end + 1
    return blocks


BLOCKS = [block for page in PAGES for block in code_blocks(page)]


def test_every_block_is_run_or_skipped_with_a_reason():
    unannotated = [b.name for b in BLOCKS if b.mode is None or (b.mode == "skip") != bool(b.reason)]
    assert unannotated == [], ("add <!-- doctest: run|tiny|skip (reason) --> right above these "
                               f"blocks: {unannotated}")


# --- links and anchors ----------------------------------------------------------------------------
def github_slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces become hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading's anchor of `page` (repeated headings get -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6} (.+)$", prose(page), re.M):
        slug = github_slug(heading)
        found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return found


def prose(page: Path) -> str:
    """`page` without its fenced blocks and inline code (links there are not links)."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def links(page: Path) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)\)", prose(page))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z]+:", target):            # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target} (no heading #{anchor} in {linked.name})")
    assert broken == []


def test_slugs_follow_github():
    assert github_slug("Targets: several per run, feature files, `x` maps") == \
        "targets-several-per-run-feature-files-x-maps"
    assert github_slug("The toy world: where the truth is known") == "the-toy-world-where-the-truth-is-known"


# --- running the blocks ---------------------------------------------------------------------------
def with_tiny_sd(code: str) -> str:
    """Every SD script's command with the stand-in's flags, in place of its `...` if it has one."""
    commands = []
    for command in code.replace("\\\n", " ").splitlines():
        if SD_SCRIPT.match(command.strip()):
            head, _, comment = command.partition(" #")
            head = head.replace(" ...", "").rstrip() + " " + TINY_SD
            command = head + (f"  #{comment}" if comment else "")
        commands.append(command)
    return "\n".join(commands) + "\n"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A folder that looks like the repository to the docs' commands; `python` is this one's
    (its environment's bin/ first on PATH, as in an activated venv)."""
    folder = tmp_path_factory.mktemp("docs")
    for name in LINKED:
        (folder / name).symlink_to(REPO / name)
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TORCH_HOME": str(folder / ".torch"),
           "HF_HOME": str(folder / ".hf"), "HF_HUB_OFFLINE": "1"}
    return folder, env


@pytest.fixture(scope="module")
def tiny_sd(scratch):
    """README.md's stand-in, made by README.md's command."""
    folder, env = scratch
    run_block("python scripts/make_tiny_sd.py outputs/tiny_sd\n", "bash", folder, env)
    return scratch


def run_block(code: str, language: str, cwd: Path, env: dict) -> None:
    command = ["bash", "-euo", "pipefail", "-c", code] if language == "bash" else ["python", "-c", code]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, f"exit {done.returncode}\n{code}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def runnable(mode: str):
    return [pytest.param(b, id=b.name, marks=[pytest.mark.slow] if b.slow else [])
            for b in BLOCKS if b.mode == mode]


@pytest.mark.parametrize("block", runnable("run"))
def test_block_runs_as_written(block, scratch):
    run_block(block.code, block.language, *scratch)


@pytest.mark.parametrize("block", runnable("tiny"))
def test_block_runs_on_the_tiny_stand_in(block, tiny_sd):
    run_block(with_tiny_sd(block.code), block.language, *tiny_sd)


def test_the_tiny_substitution_replaces_the_ellipsis_and_keeps_other_commands():
    code = ("python scripts/resnet50_guided.py --prompt a.jpg ...   # note\n"
            "python scripts/clip_guided.py --paper \\\n  --prompt b.jpg\npython -m ldm list-extractors\n")
    lines = with_tiny_sd(code).splitlines()
    assert lines[0] == f"python scripts/resnet50_guided.py --prompt a.jpg {TINY_SD}  # note"
    assert lines[1].endswith(f"--prompt b.jpg {TINY_SD}") and lines[2] == "python -m ldm list-extractors"
