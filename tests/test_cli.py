"""Every command reads its flags the same way (cli.parse, tyro dataclasses): --help shows every
default in one format, a bad value or an unknown flag is one `NAME: error:` line and exit 2."""
from __future__ import annotations

import importlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PY, REPO, run_cli
from tumorseg_dist import cli


def _script(name: str):
    """A benchmark, loaded from its file as `python benchmarks/NAME.py` would run it."""
    bench = REPO / "benchmarks"
    if str(bench) not in sys.path:
        sys.path.insert(0, str(bench))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", bench / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


def _module(name: str):
    return lambda: importlib.import_module(f"tumorseg_dist.{name}")


# name in error lines, how to load it, what --help's usage line names, arguments every run
# needs, and a flag with a value of the wrong type
COMMANDS = {
    "train": (_module("train"), "python -m tumorseg_dist.train", [], ["--epochs", "ten"]),
    "pack": (_module("pack"), "python -m tumorseg_dist.pack", ["--out", "o"], ["--seed", "x"]),
    "evaluate": (_module("evaluate"), "python -m tumorseg_dist.evaluate", ["--checkpoint", "c"],
                 ["--batch-size", "x"]),
    "predict": (_module("predict"), "python -m tumorseg_dist.predict", ["i", "--checkpoint", "c", "--out", "o"],
                ["--threshold", "half"]),
    "export": (_module("export"), "python -m tumorseg_dist.export", ["--checkpoint", "c", "--onnx", "o"],
               ["--opset", "x"]),
    "verify": (_module("data.verify"), "python -m tumorseg_dist.data.verify", ["d"], ["--mode", "fast"]),
    "throughput": (lambda: _script("throughput"), "python benchmarks/throughput.py", [], ["--steps", "x"]),
    "loss": (lambda: _script("loss"), "python benchmarks/loss.py", [], ["--iters", "x"]),
    "pack-bench": (lambda: _script("pack"), "python benchmarks/pack.py", [], ["--images", "x"]),
    "cli-bench": (lambda: _script("cli_help"), "python benchmarks/cli_help.py", [], ["--repeat", "x"]),
    "contention": (lambda: _script("contention"), "python benchmarks/contention.py", [], ["--epochs", "x"]),
}


def _exit(name: str, argv: list[str]) -> int:
    with pytest.raises(SystemExit) as e:
        COMMANDS[name][0]().main(argv)
    return e.value.code


def _entries(help_text: str) -> list[str]:
    """Each argument's entry (its flag and help, wrapped lines joined) from tyro's --help, drawn
    with UTF-8 boxes (`│ x │`) or plainly (two-space indent) depending on the terminal."""
    entries: list[str] = []
    current = positional = False
    for raw in help_text.splitlines():
        line = raw.rstrip()
        if line.startswith("│"):
            content = line[2:].rstrip("│").rstrip()
        elif line.startswith("  "):
            content = line[2:]
        else:  # a box's title or edge, or text outside the boxes
            if line.strip() and not set(line.strip()) <= set("─-╭╮╰╯"):
                positional = "positional arguments" in line
            current = False
            continue
        if not content.strip() or set(content.strip()) <= set("─-"):
            current = False
        elif content.startswith("-") or (positional and not content.startswith(" ")):
            entries.append(content)
            current = True
        elif content.startswith(" ") and current:
            entries[-1] += " " + content.strip()
        else:  # a group's description
            current = False
    return [" ".join(e.split()) for e in entries if not e.startswith("-h, --help")]


@pytest.mark.parametrize("name", COMMANDS)
def test_help_exits_0_and_shows_every_default_the_same_way(name, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    assert _exit(name, ["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {COMMANDS[name][1]} ")
    entries = _entries(out)
    assert len(entries) >= 3, out
    for entry in entries:
        assert re.search(r"\((default: .+|required)\)$", entry), f"{name}: no default shown in {entry!r}"


@pytest.mark.parametrize("name", COMMANDS)
def test_a_bad_value_is_one_line_and_exit_2(name, capsys):
    _, _, needed, bad = COMMANDS[name]
    assert _exit(name, needed + bad) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{name}: error: ") and bad[0] in err, err


@pytest.mark.parametrize("name", COMMANDS)
def test_an_unknown_flag_is_one_line_and_exit_2(name, capsys):
    assert _exit(name, COMMANDS[name][2] + ["--no-such-flag", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{name}: error: ") and "--no-such-flag" in err, err


def test_a_real_process_prints_one_line_and_exits_2():
    p = subprocess.run([sys.executable, "-m", "tumorseg_dist.evaluate", "--checkpoint", "c",
                        "--resolution", "native"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("evaluate: error: ") and "native" in p.stderr


def test_old_flag_spellings_still_parse():
    from tumorseg_dist.pack import parse as pack_parse
    cfg = pack_parse(["in", "--out", "o", "--split", "0.5,0.25,0.25", "--shard-size", "1MB",
                      "--no-progress", "--mask-fusion", "reader:1", "--images-dir", "img"])
    assert (cfg.split, cfg.shard_size, cfg.progress) == ((0.5, 0.25, 0.25), 1 << 20, False)
    assert (cfg.options.mask_fusion, cfg.options.images_dir, cfg.format) == ("reader:1", "img", "auto")
    assert pack_parse(["--out", "o", "--samples", "8"]).format == "synthetic"  # no INPUT: the phantoms
    from tumorseg_dist.predict import PredictArgs
    args = cli.parse(PredictArgs, ["a", "b", "--checkpoint", "c", "--out", "o", "--split", "val",
                                   "--split", "test", "--tta"], name="predict")
    assert args.inputs == (REPO.__class__("a"), REPO.__class__("b")) and args.split == ("val", "test")
    assert _script("throughput").parse(["--batches", "5"]).steps == 5


def test_a_flag_combination_that_cannot_work_is_one_line(capsys):
    from tumorseg_dist.pack import main as pack
    with pytest.raises(SystemExit) as e:
        pack(["in", "--out", "o", "--task-index", "0"])
    assert e.value.code == 2
    assert capsys.readouterr().err == "pack: error: --task-index and --num-tasks go together\n"


def test_every_error_class_of_the_package_is_a_user_error():
    from tumorseg_dist.checkpoint import CheckpointError
    from tumorseg_dist.config import ConfigError
    from tumorseg_dist.data.formats import LayoutError, PackInputError
    from tumorseg_dist.data.shards import ShardError
    from tumorseg_dist.imageio import ImageFileError
    from tumorseg_dist.models import ModelError
    from tumorseg_dist.packing.pipeline import PackAbort
    from tumorseg_dist.packing.workers import WorkerDied
    for error in (CheckpointError, ConfigError, LayoutError, PackInputError, ShardError, ImageFileError,
                  ModelError, PackAbort, WorkerDied):
        assert issubclass(error, cli.USER_ERRORS), error


# ---------------------------------------------------------------- the command table, fast --help

def test_help_of_every_command_imports_no_torch():
    """--help answers before the heavy imports (torch, DALI, DeepSpeed): the commands import
    their job only once the flags are good. benchmarks/cli_help.py times it."""
    from tumorseg_dist.commands import COMMANDS
    for name, (mod, _) in COMMANDS.items():
        code = (f"import runpy, sys; sys.argv = [{mod!r}, '--help']\n"
                f"try:\n    runpy.run_module({mod!r}, run_name='__main__')\n"
                f"except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
                f"heavy = sorted({{'torch', 'nvidia.dali', 'deepspeed', 'wandb'}} & set(sys.modules))\n"
                f"assert not heavy, heavy")
        p = subprocess.run([PY, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, f"{name}: {p.stderr[-1500:]}"
        assert "usage" in p.stdout.lower() or name == "bench" and "benchmark" in p.stdout, (name, p.stdout[:300])


def test_python_m_package_lists_every_command_and_dispatches():
    from tumorseg_dist.commands import COMMANDS
    p = run_cli([PY, "-m", "tumorseg_dist"], cwd=REPO)
    for name in COMMANDS:
        assert f"  {name} " in p.stdout and f"tumorseg-{name}" in p.stdout
    p = run_cli([PY, "-m", "tumorseg_dist", "evaluate", "--help"], cwd=REPO)
    assert "--checkpoint" in p.stdout
    p = run_cli([PY, "-m", "tumorseg_dist", "tarin"], cwd=REPO, check=False)
    assert p.returncode == 2 and "unknown command 'tarin'" in p.stderr and "train" in p.stderr


def test_every_command_has_its_console_script():
    import configparser
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    scripts = dict(line.split(" = ") for line in cfg["options.entry_points"]["console_scripts"].strip().splitlines())
    from tumorseg_dist.commands import COMMANDS
    assert scripts == {f"tumorseg-{n}": f"{mod}:main" for n, (mod, _) in COMMANDS.items()}
    installed = Path(PY).with_name("tumorseg-evaluate")
    if installed.exists():   # an install of this checkout (make setup): the script is the same main
        p = run_cli([str(installed), "--help"], cwd=REPO)
        assert "--checkpoint" in p.stdout


def test_bench_runs_a_benchmark_and_names_the_choices():
    p = run_cli([PY, "-m", "tumorseg_dist.bench", "nope"], cwd=REPO, check=False)
    assert p.returncode == 2 and "throughput, loss, pack, cli, contention, predict, resume" in p.stderr
    p = run_cli([PY, "-m", "tumorseg_dist.bench", "cli", "--help"], cwd=REPO)
    assert "--repeat" in p.stdout
    p = run_cli([PY, "-m", "tumorseg_dist.bench", "resume", "--help"], cwd=REPO)
    assert "--repeats" in p.stdout


def test_a_finished_command_exits_with_its_code_after_threads_atexit_and_flushed_output(tmp_path):
    """cli.exit_with skips only the interpreter's teardown: a non-daemon thread's last write, an
    atexit handler's file and buffered (unflushed) stdout and stderr all arrive, with the code;
    an executor nobody shut down does not hold the exit (threading's exit hooks stop it)."""
    script = tmp_path / "cmd.py"
    script.write_text(f"""
import atexit, sys, threading, time
from pathlib import Path
from tumorseg_dist.cli import exit_with
out = Path({str(tmp_path)!r})
atexit.register(lambda: (out / "atexit").write_text("ran"))
def late():
    time.sleep(0.3)
    (out / "thread").write_text("joined")
threading.Thread(target=late).start()
from concurrent.futures import ThreadPoolExecutor
pool = ThreadPoolExecutor(2)   # never shut down, as torch.compile's compile pool
pool.submit(time.sleep, 0.1)
sys.stdout.write("no newline, still buffered")
sys.stderr.write("err too")
exit_with(3)
""")
    p = subprocess.run([PY, str(script)], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert p.returncode == 3
    assert (p.stdout, p.stderr) == ("no newline, still buffered", "err too")
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "thread").read_text() == "joined"


@pytest.mark.parametrize("module", ["train", "pack", "evaluate", "predict", "export", "__main__"])
def test_every_command_module_ends_its_process_through_exit_with(module):
    src = (REPO / "tumorseg_dist" / f"{module}.py").read_text()
    main_block = src.split('if __name__ == "__main__":', 1)[1]
    assert "exit_with(main(" in main_block
