"""benchmarks/throughput.py: every stage runs for 2 steps at 64 px on CPU and writes the JSON
fields RESULTS.md is built from. Timings are never asserted (only that they were measured)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, TORCHRUN, run_cli

# Run as a script, throughput.py finds its helpers (_provenance, naive_loader) in its own folder,
# which Python puts on sys.path; loaded from a file here, the test does the same.
sys.path.insert(0, str(REPO / "benchmarks"))
spec = importlib.util.spec_from_file_location("throughput", REPO / "benchmarks" / "throughput.py")
tp = importlib.util.module_from_spec(spec)
sys.modules["throughput"] = tp  # its dataclass (the flags) is looked up by module name
spec.loader.exec_module(tp)

TINY = ["--device", "cpu", "--size", "64", "--in-channels", "1", "--encoder", "resnet18",
        "--batch-size", "4", "--steps", "2", "--warmup", "1", "--workers", "0"]
PROVENANCE = {"device", "date", "git_commit", "command", "versions", "settings"}


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_provenance(row: dict, argv: list[str]) -> None:
    assert PROVENANCE <= set(row)
    assert row["device"].startswith("cpu") and row["versions"]["torch"] == torch.__version__
    assert row["command"].startswith("python benchmarks/throughput.py ")
    assert all(a in row["command"] for a in argv[:4])
    assert row["settings"]["size"] == 64 and row["settings"]["encoder"] == "resnet18"


def test_model_stage_row_with_flops_memory_and_trace(tmp_path):
    out = tmp_path / "model.jsonl"
    argv = ["--stage", "model", *TINY, "--json", str(out), "--profile", str(tmp_path / "prof")]
    doc = tp.main(argv)
    (row,) = rows_of(out)
    check_provenance(row, argv)
    assert row["stage"] == "model" and row["status"] == "ok" and row["world_size"] == 1
    assert row["batch_size"] == row["per_rank_batch_size"] == 4 and row["steps"] == 2
    assert row["amp"] == "off" and row["channels_last"] is True and row["engine"] == "ddp"
    assert row["images_per_s"] > 0 and row["step_ms"] > 0 and row["last_loss"] == row["last_loss"]
    assert row["flops_per_image_fwd_bwd"] == row["flops_per_image_fwd"] + row["flops_per_image_bwd"] > 0
    assert row["achieved_tflops"] >= 0 and "mfu" not in row   # no peak for a CPU
    assert row["peak_memory_mib"] > 0 and row["peak_memory_kind"] == "process_peak_rss"
    assert row["engine_memory_bytes"]["optimizer_state_bytes"] == 2 * row["engine_memory_bytes"]["param_bytes"]
    trace = json.loads(Path(row["profile_trace"]).read_text())
    assert any(e.get("name") == "step_0" for e in trace["traceEvents"])
    assert doc["results"][0]["images_per_s"] == row["images_per_s"]


def test_data_and_train_stages_on_packed_shards(tmp_path, synthetic_shards):
    for stage in ("data", "train"):
        out = tmp_path / f"{stage}.jsonl"
        tp.main(["--stage", stage, *TINY, "--data", str(synthetic_shards), "--loader", "torch,naive",
                 "--json", str(out)])
        (row,) = rows_of(out)   # naive needs the synthetic PNG folders: skipped with --data
        assert row["stage"] == stage and row["loader"] == "torch" and row["codec"] == "png"
        assert row["data"] == str(synthetic_shards) and row["images_per_s"] > 0
        if stage == "train":
            assert row["last_loss"] > 0 and row["flops_per_image_fwd_bwd"] > 0


def test_all_stage_ratio_and_breakdown(tmp_path, capsys):
    out = tmp_path / "all.jsonl"
    tp.main(["--stage", "all", *TINY, "--synthetic", "--loader", "dali", "--source-size", "64",
             "--samples", "12", "--data-dir", str(tmp_path / "bench"), "--amp", "bf16", "--json", str(out)])
    rows = rows_of(out)
    assert [r["stage"] for r in rows] == ["data", "model", "train", "breakdown"]
    data, model, train, bd = rows
    assert model["amp"] == train["amp"] == "bf16"
    assert train["train_over_model"] == pytest.approx(train["images_per_s"] / model["images_per_s"], rel=1e-3)
    assert set(bd["phases_ms"]) == set(tp.PHASES) and bd["steps"] == 2 and bd["loader"] == "dali"
    ph = bd["phases_ms"]
    assert ph["h2d"] is None and ph["all_reduce"] is None   # CPU, one rank
    assert all(ph[k] > 0 for k in ("forward", "backward", "optimizer")) and ph["data_wait"] >= 0
    assert bd["sum_ms"] == pytest.approx(sum(v for v in ph.values() if v is not None), abs=0.01)
    assert bd["train_step_ms"] == train["step_ms"]
    table = capsys.readouterr().out
    assert "step breakdown (dali" in table and "train/model" in table


def test_throughput_uses_only_public_names_and_the_real_loader_factory():
    import ast
    src = (REPO / "benchmarks" / "throughput.py").read_text()
    tree = ast.parse(src)
    private = sorted({n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                      and n.attr.startswith("_") and not n.attr.startswith("__")})
    imported = sorted({a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                       and (n.module or "").startswith("tumorseg_dist") for a in n.names if a.name.startswith("_")})
    assert private == [] and imported == []
    for name in ("sys.path.insert", "LoaderSpec", "TorchLoader", "DaliLoader", ".ds.", ".net(", ".scaler"):
        assert name not in src, name
    assert "build_loader(" in src


def test_flop_counter_matches_design_number():
    """The planned figure: U-Net/ResNet34 at 640x640, 3 channels: 291 GFLOP per image forward+backward."""
    fl = tp.flops_per_image("unet", "resnet34", 3, 640)
    assert fl["flops_per_image_fwd_bwd"] / 1e9 == pytest.approx(291, rel=0.005)
    assert fl["flops_per_image_bwd"] == pytest.approx(2 * fl["flops_per_image_fwd"], rel=0.02)


def test_peak_table_and_compute_dtype():
    assert tp.peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert tp.peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert tp.peak_tflops("NVIDIA H200", "fp16") == 989.4
    assert tp.peak_tflops("NVIDIA L40S", "bf16") == 362.1 and tp.peak_tflops("NVIDIA L4", "bf16") == 121.0
    assert tp.peak_tflops("NVIDIA A100-SXM4-80GB", "tf32") == 156.0
    assert tp.peak_tflops("Some Future GPU", "bf16") is None
    assert tp.peak_tflops("Tesla V100-SXM2-16GB", "bf16") is None
    assert tp.compute_dtype("bf16", torch.device("cpu")) == "bf16"
    assert tp.compute_dtype("off", torch.device("cpu")) == "fp32"


def test_out_of_memory_becomes_the_limit_and_other_errors_raise():
    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    (row,) = tp.guarded(oom, "model", torch.device("cpu"))
    assert row["status"] == "oom" and "Tried to allocate" in row["error"]
    (row,) = tp.guarded(lambda: (_ for _ in ()).throw(RuntimeError("DefaultCPUAllocator: can't allocate memory")),
                        "model", torch.device("cpu"))
    assert row["status"] == "oom"
    with pytest.raises(ValueError):
        tp.guarded(lambda: (_ for _ in ()).throw(ValueError("shape mismatch")), "model", torch.device("cpu"))
    rows = [{"status": "ok", "sweep": {"batch_size": 8}}, {"status": "ok", "sweep": {"batch_size": 16}},
            {"status": "oom", "sweep": {"batch_size": 32}}]
    s = tp.sweep_summary("batch_size", rows)
    assert s["ran"] == [8, 16] and s["out_of_memory"] == [32] and s["limit"] == "largest batch_size that fits: 16"


def test_sweep_runs_each_value(tmp_path):
    args = tp.parse(TINY)
    assert tp.parse_sweep("batch-size=2,4", args) == ("batch_size", [2, 4])
    assert tp.parse_sweep("channels_last=false,true", args) == ("channels_last", [False, True])
    with pytest.raises(SystemExit):
        tp.parse_sweep("nonsense=1,2", args)
    out = tmp_path / "sweep.jsonl"
    doc = tp.main(["--stage", "model", *TINY, "--sweep", "channels_last=false,true", "--no-flops",
                   "--steps", "1", "--warmup", "0", "--size", "32", "--json", str(out)])
    rows = rows_of(out)
    assert [(r["sweep"]["channels_last"], r["channels_last"]) for r in rows] == [(False, False), (True, True)]
    assert doc["sweep_summary"]["limit"] == "every value fits"


def test_bad_arguments_are_clear_errors(tmp_path):
    p = run_cli([tp.sys.executable, "benchmarks/throughput.py", "--data", str(tmp_path), "--device", "cpu"],
                cwd=REPO, check=False, timeout=120)
    assert p.returncode == 2 and "no manifest.json" in p.stderr


def test_two_ranks_report_per_rank_aggregate_and_scaling(tmp_path):
    out = tmp_path / "dist.jsonl"
    run_cli([TORCHRUN, "--nproc-per-node", "2", "benchmarks/throughput.py", "--stage", "model", *TINY,
             "--json", str(out)], cwd=REPO, timeout=300)
    (row,) = rows_of(out)
    assert row["world_size"] == 2 and row["per_rank_batch_size"] == 2
    assert len(row["per_rank_images_per_s"]) == 2 and all(v > 0 for v in row["per_rank_images_per_s"])
    assert row["images_per_s"] == pytest.approx(sum(row["per_rank_images_per_s"]), abs=0.01)
    assert row["single_rank_images_per_s"] > 0
    assert row["scaling_efficiency"] == pytest.approx(
        row["images_per_s"] / (2 * row["single_rank_images_per_s"]), rel=1e-3)
    assert row["command"].startswith("torchrun --nproc-per-node 2 --nnodes 1 ")


# ---------------------------------------------------------------- GPU checks
# Skipped without CUDA; benchmarks/gpu_check.sh runs them on a lent GPU machine.

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh)")
GPU = ["--device", "cuda", "--size", "64", "--in-channels", "1", "--encoder", "resnet18",
       "--batch-size", "8", "--steps", "3", "--warmup", "2", "--workers", "2"]


@cuda
def test_gpu_fused_loss_matches_reference_and_is_used():
    from tumorseg_dist.losses import dice_bce_loss, reference_dice_bce
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4, 1, 640, 640, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
    t = (torch.rand(4, 1, 640, 640, device="cuda", generator=g) > 0.7).float()
    fused = dice_bce_loss(x, t, fused="on")
    (gf,) = torch.autograd.grad(fused, x)
    ref = reference_dice_bce(x, t)
    (gr,) = torch.autograd.grad(ref, x)
    assert fused.dtype == torch.float32 and fused.item() == pytest.approx(ref.item(), rel=1e-4)
    torch.testing.assert_close(gf.float(), gr.float(), rtol=2e-2, atol=1e-6)


@cuda
def test_gpu_model_stage_bf16_channels_last_reports_mfu(tmp_path):
    out = tmp_path / "gpu-model.jsonl"
    tp.main(["--stage", "model", *GPU, "--amp", "bf16", "--channels-last", "--json", str(out)])
    (row,) = rows_of(out)
    assert row["device"] == torch.cuda.get_device_name() and row["amp"] == "bf16"
    assert row["peak_memory_kind"] == "cuda_max_allocated" and row["peak_memory_mib"] > 0
    assert row["compute_dtype"] == "bf16" and row["achieved_tflops"] > 0
    if tp.peak_tflops(row["device"], "bf16") is not None:
        assert 0 < row["mfu"] < 1


@cuda
def test_gpu_all_stage_dali_mixed_decode(tmp_path):
    pytest.importorskip("nvidia.dali")
    out = tmp_path / "gpu-all.jsonl"
    tp.main(["--stage", "all", *GPU, "--synthetic", "--loader", "dali,torch", "--source-size", "96",
             "--samples", "32", "--data-dir", str(tmp_path / "bench"), "--json", str(out)])
    rows = rows_of(out)
    bd = next(r for r in rows if r["stage"] == "breakdown")
    assert bd["timer"] == "cuda_events" and bd["phases_ms"]["h2d"] is not None
    assert all(r["train_over_model"] > 0 for r in rows if r["stage"] == "train")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (nccl)")
def test_gpu_two_ranks_nccl(tmp_path):
    out = tmp_path / "gpu-dist.jsonl"
    run_cli([TORCHRUN, "--nproc-per-node", "2", "benchmarks/throughput.py", "--stage", "model", *GPU,
             "--json", str(out)], cwd=REPO, timeout=600)
    (row,) = rows_of(out)
    assert row["world_size"] == 2 and row["scaling_efficiency"] > 0
