"""Shard verification (--verify-shards): a flipped byte is refused by train and evaluate, the
hash cache spares a second start, a touched mtime re-verifies, `off` skips, ranks agree."""
from __future__ import annotations

import json
import os
import shutil
import socket
import tarfile
from pathlib import Path

import pytest

from conftest import PY, TINY, TORCHRUN, run_cli
from inference_testing import make_checkpoint, tiny_config
from tumorseg_dist import evaluate, predict
from tumorseg_dist.data.shards import ShardError, read_manifest
from tumorseg_dist.data.verify import cache_path, verify_local


@pytest.fixture
def shards(tmp_path, synthetic_shards, monkeypatch) -> Path:
    """A private copy of the packed set (it gets damaged) and a private hash cache."""
    monkeypatch.setenv("TUMORSEG_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "shards" / "synthetic"
    shutil.copytree(synthetic_shards, out)
    return out


def flip_json_byte(shard: Path) -> int:
    """Flip one bit inside a sample's JSON member (the case of a letter of "synthetic"): the
    tar and every sample still decode, so only the checksum can tell."""
    with tarfile.open(shard) as tf:
        mem = next(m for m in tf.getmembers() if m.name.endswith(".json"))
        offset = mem.offset_data + tf.extractfile(mem).read().index(b"synthetic")
    with open(shard, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x20]))
    return offset


def all_shards(d: Path) -> list[str]:
    m = read_manifest(d)
    return sorted(sh["name"] for s in m["splits"].values() for sh in s["shards"])


def test_flipped_byte_stops_training_before_anything_is_written(tmp_path, shards):
    flip_json_byte(shards / "train-000000.tar")
    run = tmp_path / "run"
    p = run_cli([PY, "-m", "tumorseg_dist.train", *TINY, "--data", str(shards), "--out", str(run),
                 "--epochs", "1"], cwd=tmp_path, env={"TUMORSEG_CACHE_DIR": str(tmp_path / "cache")}, check=False)
    assert p.returncode == 2, p.stderr
    want = read_manifest(shards)["splits"]["train"]["shards"][0]["sha256"]
    err = p.stderr.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert "train-000000.tar is corrupt" in err and f"records {want}" in err
    assert "python -m tumorseg_dist.pack --format synthetic" in err and "--overwrite" in err
    assert not run.exists()


def test_evaluate_refuses_a_flipped_byte_and_off_skips_the_check(tmp_path, shards, capsys):
    flip_json_byte(shards / "val-000000.tar")
    ckpt = make_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt", tiny_config(size=32, data=shards))
    args = ["--checkpoint", str(ckpt), "--split", "val", "--workers", "0", "--cases", "0",
            "--out", str(tmp_path / "ev")]
    assert evaluate.main(args) == 2
    err = capsys.readouterr().err
    assert "val-000000.tar is corrupt: sha256 " in err and "re-pack" in err
    assert not (tmp_path / "ev").exists()
    assert evaluate.main(args + ["--verify-shards", "off"]) == 0
    assert "not verified (--verify-shards off)" in capsys.readouterr().out
    assert (tmp_path / "ev" / "metrics.json").is_file()
    assert evaluate.main(args + ["--verify-shards", "full"]) == 2


def test_predict_on_shards_refuses_a_flipped_byte_in_a_chosen_split_only(tmp_path, shards, capsys):
    """predict reads packed splits too: a chosen split's bad shard stops it before any mask is
    written; a split not asked for is not hashed."""
    flip_json_byte(shards / "val-000000.tar")
    ckpt = make_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt", tiny_config(size=32, data=shards))
    base = ["--checkpoint", str(ckpt), str(shards), "--workers", "0"]
    assert predict.main(base + ["--split", "val", "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("predict: error: ") and "val-000000.tar is corrupt: sha256 " in err and "re-pack" in err
    assert not (tmp_path / "p").exists()
    assert predict.main(base + ["--split", "test", "--out", str(tmp_path / "t")]) == 0
    assert "match manifest.json" in capsys.readouterr().out
    assert predict.main(base + ["--split", "val", "--verify-shards", "off", "--out", str(tmp_path / "o")]) == 0
    assert "not verified (--verify-shards off)" in capsys.readouterr().out


def test_second_start_reads_the_cache_and_a_touch_rehashes_only_that_shard(shards):
    splits = ("train", "val", "test")
    first = verify_local(shards, splits, "quick")
    assert sorted(first.hashed) == all_shards(shards) and first.cached == 0
    entries = json.loads(cache_path(shards).read_text())["entries"]
    tar = shards / "val-000000.tar"
    st = tar.stat()
    assert entries[str(tar.resolve())] == [st.st_size, st.st_mtime_ns, read_manifest(shards)["splits"]["val"]
                                           ["shards"][0]["sha256"]]
    second = verify_local(shards, splits, "quick")
    assert second.hashed == [] and second.cached == len(all_shards(shards))
    os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))   # same bytes, new mtime
    third = verify_local(shards, splits, "quick")
    assert third.hashed == ["val-000000.tar"] and third.cached == len(all_shards(shards)) - 1
    assert verify_local(shards, splits, "quick").hashed == []             # re-cached under the new mtime
    assert sorted(verify_local(shards, splits, "full").hashed) == all_shards(shards)


def test_quick_catches_a_change_the_cache_has_not_seen_and_full_catches_bit_rot(shards):
    splits = ("train", "val", "test")
    verify_local(shards, splits, "quick")
    tar = shards / "test-000000.tar"
    st = tar.stat()
    flip_json_byte(tar)                                           # an edit: mtime moves
    with pytest.raises(ShardError, match="test-000000.tar is corrupt"):
        verify_local(shards, splits, "quick")
    os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns))            # bit rot: size and mtime as cached
    assert verify_local(shards, splits, "quick").hashed == []     # quick trusts the cache (documented)
    with pytest.raises(ShardError, match="test-000000.tar is corrupt"):
        verify_local(shards, splits, "full")


def test_truncated_shard_fails_on_its_size_without_hashing(shards):
    tar = shards / "train-000000.tar"
    size = tar.stat().st_size
    with open(tar, "r+b") as f:
        f.truncate(size - 512)
    with pytest.raises(ShardError, match=rf"train-000000.tar is {size - 512} bytes but manifest.json records {size}"):
        verify_local(shards, ["train"], "quick")


def test_off_writes_no_cache_and_a_read_only_cache_dir_falls_back_beside_the_shards(shards, tmp_path, monkeypatch):
    r = verify_local(shards, ["train"], "off")
    assert r.hashed == [] and r.shards == 0 and not (tmp_path / "cache").exists()
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("TUMORSEG_CACHE_DIR", str(tmp_path / "afile" / "sub"))   # cannot be created
    assert cache_path(shards) == shards / ".shard-hashes.json"
    assert verify_local(shards, ["train"], "quick").hashed == ["train-000000.tar"]
    assert verify_local(shards, ["train"], "quick").hashed == []


RANKS_PROBE = """
import json, sys
from pathlib import Path
from tumorseg_dist import dist as d
from tumorseg_dist.data import verify
info = d.init("cpu")
calls = []
real = verify.verify_local
verify.verify_local = lambda *a, **k: calls.append(1) or real(*a, **k)   # count, do not change
try:
    r = verify.verify_shards(sys.argv[1], ["train", "val", "test"], "quick", info, log=None)
    out = {"ok": True, "hashed": len(r.hashed)}
except verify.ShardError as e:
    out = {"ok": False, "error": str(e)}
out["calls"] = len(calls)
Path(sys.argv[2], f"rank{info.rank}.json").write_text(json.dumps(out))
d.cleanup()
"""


def test_two_ranks_hash_once_per_node_and_fail_together(tmp_path, shards):
    probe = tmp_path / "probe.py"
    probe.write_text(RANKS_PROBE)
    env = {"TUMORSEG_CACHE_DIR": str(tmp_path / "cache")}

    def ranks() -> list[dict]:
        with socket.socket() as s:   # a free port: other suites may run torchrun at the same time
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        run_cli([TORCHRUN, "--nproc_per_node=2", f"--master_port={port}", str(probe), str(shards), str(tmp_path)],
                cwd=tmp_path, env=env)
        return [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1)]

    r0, r1 = ranks()
    assert r0 == {"ok": True, "hashed": len(all_shards(shards)), "calls": 1}
    assert r1["ok"] and r1["calls"] == 0   # local rank 1 waited for local rank 0's verdict
    flip_json_byte(shards / "val-000000.tar")
    r0, r1 = ranks()
    assert not r0["ok"] and not r1["ok"] and r0["error"] == r1["error"]
    assert "val-000000.tar is corrupt" in r1["error"]
