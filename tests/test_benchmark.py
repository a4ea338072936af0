"""The speed benchmark (ldm/benchmarks/speed.py, scripts/benchmark.py) end to end on the tiny
SD-shaped model and the toy model: every configuration is measured and the JSON has its fields
(nothing is asserted about time)."""
import json
import math
from pathlib import Path

import pytest

import ldm.benchmarks.speed as speed

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def benchmark():
    return speed


@pytest.mark.slow
def test_small_run_writes_every_field(benchmark, tmp_path, capsys):
    out = tmp_path / "results.json"
    benchmark.run(["--models", "sd", "toy", "--config", str(REPO / "configs/tiny/sd-v1-tiny.yaml"),
                    "--sizes", "16", "--extractors", "resnet50", "--precisions", "fp32", "bf16",
                    "--batch", "1", "--iters", "2", "--warmup", "1", "--device", "cpu",
                    "--out", str(out), "--strict"])
    table = capsys.readouterr().out
    data = json.loads(out.read_text())
    env, records = data["environment"], data["records"]
    assert env["reference_iterations"] == 12_960 and env["device"] == "cpu" and env["threads"] >= 1
    assert env["fast_preset_iterations"] == benchmark.FAST_ITERATIONS < 12_960 / 10
    configs = [(r["config"]["model"], r["config"]["precision"], r["config"]["fast"], r["config"]["waste"])
               for r in records]
    assert configs == [("sd-v1-tiny", "fp32", False, False), ("sd-v1-tiny", "bf16", False, False),
                       ("sd-v1-tiny", "fp32", True, False), ("sd-v1-tiny", "bf16", True, False),
                       ("toy", "fp32", False, False), ("toy", "bf16", False, False),
                       ("toy", "fp32", True, False), ("toy", "bf16", True, False),
                       ("sd-v1-tiny", "fp32", False, True)]
    for r in records:
        assert r["error"] is None
        assert len(r["s_per_iter_all"]) == 2 and r["s_per_iter"] > 0
        assert r["flops_per_iter"] > 0 and r["achieved_tflops"] > 0
        assert r["peak_memory_gib"] > 0 and "RSS" in r["peak_memory_kind"]
        assert r["device_peak_tflops"] is None and r["fraction_of_peak"] is None  # CPU
        iterations = benchmark.FAST_ITERATIONS if r["config"]["fast"] else 12_960
        assert r["run_iterations"] == iterations
        assert math.isclose(r["run_s"], iterations * r["s_per_iter"])
        assert r["ideal_run_h100_s"] > 0
    lean, waste = records[0], records[-1]
    # the fast preset's iteration does less work (no second decode, the tiny decoder)
    assert records[2]["flops_per_iter"] < lean["flops_per_iter"]
    assert records[6]["flops_per_iter"] < records[4]["flops_per_iter"]
    # the reference's checkpointing recomputes the UNet blocks: more FLOPs per iteration
    assert waste["flops_per_iter"] > lean["flops_per_iter"]
    assert lean["speedup_vs_reference_waste"] > 0 and records[4]["speedup_vs_reference_waste"] is None
    rows = [line for line in table.splitlines() if line.startswith("|")]
    assert len(rows) == len(records) + 2  # header, separator and one row per record


def test_gpu_peaks_and_defaults(benchmark):
    args = benchmark.parse_args(["--device", "cpu"])
    assert args.sizes == [256] and args.precisions == ["fp32", "bf16"] and args.waste
    quick = benchmark.parse_args(["--quick", "--device", "cpu"])
    assert (quick.sizes, quick.extractors, quick.iters, quick.warmup, quick.waste) == ([64], ["resnet50"], 2, 1, False)
    assert benchmark.parse_args(["--quick", "--sizes", "32"]).sizes == [32]
    assert benchmark.GPU_PEAKS["H100"]["bf16"] > benchmark.GPU_PEAKS["A100"]["bf16"]
