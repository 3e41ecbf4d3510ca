"""The package's layering is a contract: `lint-imports` (import-linter, contracts in setup.cfg)
must find no import that runs back up and no circle."""
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def test_every_import_points_down():
    exe = Path(sys.executable).with_name("lint-imports")
    cmd = [str(exe if exe.exists() else shutil.which("lint-imports")), "setup.cfg"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-2000:]
    assert "0 broken" in p.stdout, p.stdout[-3000:]
