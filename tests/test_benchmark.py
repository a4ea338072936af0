"""scripts/benchmark.py end to end on the tiny SD-shaped model and the toy model: every
configuration is measured and the JSON has its fields (nothing is asserted about time)."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("benchmark", REPO / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmark"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("benchmark", None)


def test_small_run_writes_every_field(benchmark, tmp_path, capsys):
    out = tmp_path / "results.json"
    benchmark.main(["--models", "sd", "toy", "--config", str(REPO / "configs/tiny/sd-v1-tiny.yaml"),
                    "--sizes", "16", "--extractors", "resnet50", "--precisions", "fp32", "bf16",
                    "--batch", "1", "--iters", "2", "--warmup", "1", "--device", "cpu",
                    "--out", str(out), "--strict"])
    table = capsys.readouterr().out
    data = json.loads(out.read_text())
    env, records = data["environment"], data["records"]
    assert env["reference_iterations"] == 12_960 and env["device"] == "cpu" and env["threads"] >= 1
    configs = [(r["config"]["model"], r["config"]["precision"], r["config"]["waste"]) for r in records]
    assert configs == [("sd-v1-tiny", "fp32", False), ("sd-v1-tiny", "bf16", False),
                       ("toy", "fp32", False), ("toy", "bf16", False), ("sd-v1-tiny", "fp32", True)]
    for r in records:
        assert r["error"] is None
        assert len(r["s_per_iter_all"]) == 2 and r["s_per_iter"] > 0
        assert r["flops_per_iter"] > 0 and r["achieved_tflops"] > 0
        assert r["peak_memory_gib"] > 0 and "RSS" in r["peak_memory_kind"]
        assert r["device_peak_tflops"] is None and r["fraction_of_peak"] is None  # CPU
        assert math.isclose(r["reference_run_s"], 12_960 * r["s_per_iter"])
        assert r["ideal_reference_run_h100_s"] > 0
    lean, waste = records[0], records[-1]
    # the reference's checkpointing recomputes the UNet blocks: more FLOPs per iteration
    assert waste["flops_per_iter"] > lean["flops_per_iter"]
    assert lean["speedup_vs_reference_waste"] > 0 and records[2]["speedup_vs_reference_waste"] is None
    rows = [line for line in table.splitlines() if line.startswith("|")]
    assert len(rows) == len(records) + 2  # header, separator and one row per record


def test_gpu_peaks_and_defaults(benchmark):
    args = benchmark.parse_args(["--device", "cpu"])
    assert args.sizes == [256] and args.precisions == ["fp32", "bf16"] and args.waste
    quick = benchmark.parse_args(["--quick", "--device", "cpu"])
    assert (quick.sizes, quick.extractors, quick.iters, quick.warmup, quick.waste) == ([64], ["resnet50"], 2, 1, False)
    assert benchmark.parse_args(["--quick", "--sizes", "32"]).sizes == [32]
    assert benchmark.GPU_PEAKS["H100"]["bf16"] > benchmark.GPU_PEAKS["A100"]["bf16"]
