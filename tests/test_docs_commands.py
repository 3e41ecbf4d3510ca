"""Every shell command in README.md and docs/*.md runs, so the docs cannot drift from the code.

The convention (docs/design.md, "Docs that run"):
* every fenced block names its language; ```bash, ```sh and ```console blocks are commands
  (in console blocks only the `$ ` lines), ```text is output or a synopsis and is not run;
* a command block that cannot run here carries `<!-- not run: REASON -->` on the line right
  before it (GPU-only, Slurm-only, multi-node, the network, placeholders);
* the command blocks of one page run in order, as one bash script with `set -euo pipefail`, in a
  fresh copy of the working tree with the real ../shared/data beside it, so a page may use what
  its earlier commands made (pack, then train, then evaluate);
* training and benchmark commands are scaled down by flags appended to them (`scaled`); the
  last value of a repeated flag wins, so the doc's own values are overridden, not edited.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO, SHARED_DATA

PAGES = ["README.md"] + sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md"))
COMMAND_LANGS = {"bash", "sh", "console"}
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
NOT_RUN = re.compile(r"^\s*<!--\s*not run:(.*?)-->\s*$")

# Enough to prove the command works end to end on 2 CPU cores: one epoch of two micro-batches.
TRAIN_FLAGS = "--epochs 1 --max-steps 2 --batch-size 4 --encoder-weights none --num-workers 1 --device cpu"
# `make run` keeps its end-of-run test evaluation (what a newcomer sees); the other training
# commands skip it (tests/test_test_eval.py holds it), 3-4 s each.
NO_TEST = "--no-test-eval"
SMALL = "--size 64"
BENCH_FLAGS = {
    "benchmarks/throughput.py": "--device cpu --size 64 --batch-size 4 --steps 2 --warmup 1 "
                                "--encoder resnet18 --samples 12 --source-size 64 --workers 1",
    "benchmarks/loss.py": "--device cpu --size 64 --batch-size 2 --iters 2 --warmup 1",
    "benchmarks/pack.py": "--images 4 --size 64 --workers 1,2",
}
TRAINS = re.compile(r"(-m tumorseg_dist\.train|launch/train\.sh)(\s|$)")


@dataclass
class Block:
    page: str
    line: int           # 1-based line of the opening fence
    lang: str
    body: str
    not_run: str | None  # the reason, when marked


def blocks(text: str, page: str) -> list[Block]:
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang, start = m.group(1), m.group(2), i
        i += 1
        while i < len(lines) and not re.match(rf"^{indent}```\s*$", lines[i]):
            i += 1
        assert i < len(lines), f"{page}:{start + 1}: fenced block never closed"
        body = "\n".join(ln[len(indent):] for ln in lines[start + 1:i])
        marker = NOT_RUN.match(lines[start - 1]) if start else None
        out.append(Block(page, start + 1, lang, body, marker.group(1).strip() if marker else None))
        i += 1
    return out


def commands(block: Block) -> list[str]:
    """The block's commands, continuation lines joined, comments and console output dropped."""
    text = block.body
    if block.lang == "console":
        text = "\n".join(ln[2:] for ln in text.splitlines() if ln.startswith("$ "))
    out = []
    for ln in text.replace("\\\n", " ").splitlines():
        ln = re.sub(r"(^|\s)#\s.*$", "", ln).strip()   # a trailing `# comment`
        if ln and not ln.startswith("#"):
            out.append(re.sub(r"\s+", " ", ln))
    return out


def scaled(cmd: str) -> str:
    if cmd.startswith("make ") and re.search(r"\brun\b", cmd):
        # The install step needs the package index; the suite's .venv is that install.
        return f"make -o .venv/.installed run ARGS='{TRAIN_FLAGS}'"
    if TRAINS.search(cmd):
        # The built-in synthetic run keeps its size: its run name (docs/inference.md) says it.
        data_given = "--data" in cmd or re.search(r"--config recipes/(?!synthetic)", cmd)
        return f"{cmd} {TRAIN_FLAGS} {NO_TEST}" + (f" {SMALL}" if data_given else "")
    if "-m tumorseg_dist.pack" in cmd and "--format synthetic" in cmd:
        # Phantoms are drawn, not read: a few dozen small ones pack the same way (30 s -> 3 s).
        return f"{cmd} --samples 40 --size 64"
    if "-m tumorseg_dist.export" in cmd:
        # A two-step model's logits differ more between onnxruntime and torch than a trained
        # one's (the doc shows 5e-06); tests/test_export.py holds the default tolerance.
        return f"{cmd} --atol 1e-3"
    for script, flags in BENCH_FLAGS.items():
        if script in cmd:
            return f"{cmd} {flags}"
    return cmd


# The same pack of the same real dataset appears on several pages (COCO's takes ~40 s): the first
# page to run it keeps its output in $PACK_CACHE (one folder for the session's workers), a later
# page copies it. Packing is deterministic, so the copy is what the command would write; a
# command whose output already exists (a page re-running its own pack) still runs.
CACHED_PACK = r"""
cached_pack() {
    local key=$1 out=$2; shift 2
    if [ -n "${PACK_CACHE:-}" ] && [ ! -e "$out" ] && [ -f "$PACK_CACHE/$key/manifest.json" ]; then
        mkdir -p "$(dirname "$out")" && cp -a "$PACK_CACHE/$key" "$out"
        echo "docs test: $out is the same command's output from another page" >&2
        return
    fi
    eval "$1"
    if [ -n "${PACK_CACHE:-}" ] && [ -f "$out/manifest.json" ] && [ ! -e "$PACK_CACHE/$key" ]; then
        local tmp="$PACK_CACHE/.tmp-$key-$$"
        cp -a "$out" "$tmp" && mv -T "$tmp" "$PACK_CACHE/$key" 2>/dev/null || rm -rf "$tmp"
    fi
}
"""
PACK_OUT = re.compile(r"-m tumorseg_dist\.pack (\.\./shared/data/\S+).* --out (\S+)")


def page_line(cmd: str) -> str:
    """The script line of one doc command: scaled, and a pack of the shared data through the cache."""
    line, m = scaled(cmd), PACK_OUT.search(cmd)
    if m is None or "$" in cmd:
        return line
    key = hashlib.sha256(line.encode()).hexdigest()[:16]
    return f"cached_pack {key} {shell_quote(m.group(2))} {shell_quote(line)}"


def page_script(page: str) -> tuple[str, int]:
    lines, n = ["set -euo pipefail", CACHED_PACK], 0
    for b in blocks((REPO / page).read_text(), page):
        if b.lang not in COMMAND_LANGS or b.not_run:
            continue
        for cmd in commands(b):
            n += 1
            lines.append(f"echo {shell_quote(f'>>> {page}:{b.line}: {cmd}')} >&2")
            lines.append(page_line(cmd))
    return "\n".join(lines) + "\n", n


def shell_quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


def working_copy(root: Path) -> Path:
    """The working tree as `git` sees it (tracked and new files), with ../shared/data beside it."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    main = root / "main"
    for f in filter(None, files):
        src = REPO / f
        if src.is_file():
            (main / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, main / f)
    (main / ".venv").symlink_to(REPO / ".venv")
    (root / "shared").mkdir()
    (root / "shared" / "data").symlink_to(SHARED_DATA)
    return main


# ---------------------------------------------------------------- the convention itself (fast)

def test_the_extractor_finds_commands_skips_marked_blocks_and_scales_training():
    page = "\n".join([
        "```bash", "python -m tumorseg_dist.pack IN --out shards/x   # a comment",
        "python -m tumorseg_dist.train --data shards/x \\", "    --epochs 30", "```",
        "<!-- not run: needs a GPU -->", "```bash", "nvidia-smi", "```",
        "```text", "not a command", "```",
        "```console", "$ python -m tumorseg_dist.evaluate --checkpoint c.pt", "evaluate: dice 0.5", "```",
    ])
    bs = blocks(page, "t.md")
    assert [(b.lang, b.not_run) for b in bs] == [("bash", None), ("bash", "needs a GPU"),
                                                ("text", None), ("console", None)]
    assert commands(bs[0]) == ["python -m tumorseg_dist.pack IN --out shards/x",
                               "python -m tumorseg_dist.train --data shards/x --epochs 30"]
    assert commands(bs[3]) == ["python -m tumorseg_dist.evaluate --checkpoint c.pt"]
    train = scaled(commands(bs[0])[1])
    assert train.endswith(f"--epochs 30 {TRAIN_FLAGS} {NO_TEST} {SMALL}")
    assert scaled("python -m tumorseg_dist.train") == f"python -m tumorseg_dist.train {TRAIN_FLAGS} {NO_TEST}"
    assert page_line("python -m tumorseg_dist.pack ../shared/data/busi --out shards/busi").startswith(
        "cached_pack ")
    assert page_line("python -m tumorseg_dist.pack phantoms/liver --out shards/x") == \
        "python -m tumorseg_dist.pack phantoms/liver --out shards/x"   # a page's own input: always run


def test_a_pack_seen_on_another_page_is_copied_and_a_repeat_on_the_same_page_runs(tmp_path):
    fake = "mkdir -p shards/x && echo {} > shards/x/manifest.json && echo ran"
    script = CACHED_PACK + f"cached_pack k1 shards/x {shell_quote(fake)}\n"
    env = {**os.environ, "PACK_CACHE": str(tmp_path / "cache")}
    (tmp_path / "cache").mkdir()
    outs = []
    for page in ("a", "b", "b"):
        (tmp_path / page).mkdir(exist_ok=True)
        p = subprocess.run(["bash", "-c", "set -euo pipefail\n" + script], cwd=tmp_path / page, env=env,
                           capture_output=True, text=True, check=True)
        outs.append(p.stdout + p.stderr)
        assert (tmp_path / page / "shards" / "x" / "manifest.json").read_text().strip() == "{}"
    assert "ran" in outs[0]                                     # first page: packed, kept
    assert "ran" not in outs[1] and "from another page" in outs[1]   # another page: copied
    assert "ran" in outs[2]                                     # its output exists: the command runs
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["k1"]   # no temp left


@pytest.mark.parametrize("page", PAGES)
def test_every_block_is_labelled_and_every_skip_says_why(page):
    for b in blocks((REPO / page).read_text(), page):
        where = f"{page}:{b.line}"
        assert b.lang, f"{where}: a fenced block names its language (bash for commands, text otherwise)"
        if b.not_run is not None:
            assert b.not_run, f"{where}: `<!-- not run: REASON -->` needs its reason"
            assert b.lang in COMMAND_LANGS, f"{where}: only a command block can be marked not run"


def test_the_docs_have_commands_that_run():
    assert sum(page_script(p)[1] for p in PAGES) >= 30


# ---------------------------------------------------------------- running them (slow)

# A page runs its commands in order (it packs what it later trains on): the recipes page is
# about 30 commands, past the suite's 900 s per test on a loaded 2-core box; the page's own limit
# is the subprocess timeout below.
@pytest.mark.slow
@pytest.mark.timeout(1600)
@pytest.mark.parametrize("page", [p for p in PAGES if page_script(p)[1]])
def test_page_commands_run(page, tmp_path, tmp_path_factory):
    script, _ = page_script(page)
    pack_cache = tmp_path_factory.getbasetemp().parent / "docs-pack-cache"   # shared by the workers
    pack_cache.mkdir(exist_ok=True)
    main = working_copy(tmp_path)
    env = {**os.environ, "PATH": f"{REPO / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(main), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "TRITON_INTERPRET": "1", "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline",
           "TUMORSEG_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_CACHE": str(tmp_path / "hf"),
           "MPLBACKEND": "Agg", "PACK_CACHE": str(pack_cache)}
    p = subprocess.run(["bash", "-c", script], cwd=main, env=env, capture_output=True,
                       text=True, timeout=1500)
    if p.returncode != 0:
        ran = re.findall(r"^>>> (.*)$", p.stderr, re.M)
        raise AssertionError(f"{ran[-1] if ran else page} exited {p.returncode}\n"
                             f"--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-5000:]}")
