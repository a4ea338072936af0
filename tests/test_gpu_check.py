"""The GPU check (ldm/benchmarks/gpu_check.py): its CPU quick mode end to end, its refusals and
verdicts; the CUDA comparison itself runs only where there is a GPU."""
import json

import pytest
import torch

from ldm.benchmarks import gpu_check, speed


def test_quick_cpu_run_writes_the_table_and_json(tmp_path, one_thread, capsys):
    assert gpu_check.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    checks = {c["check"]: c for c in data["correctness"]}
    assert checks["fp32 cpu vs cpu"]["max_abs_diff"] == 0 and all(c["passed"] for c in checks.values())
    assert {"bf16 cpu finishes without NaN", "fp16 cpu finishes without NaN"} <= set(checks)
    records = data["records"]
    assert [r["config"]["fast"] for r in records] == [False, True]
    assert all(r["error"] is None and r["s_per_iter"] > 0 for r in records)
    paper, fast = records
    assert fast["flops_per_iter"] < paper["flops_per_iter"]
    assert (paper["run_iterations"], fast["run_iterations"]) == (12_960, speed.FAST_ITERATIONS)
    assert all(g["status"] == "not measured" for g in data["goals"])   # no GPU targets on a CPU
    table = (tmp_path / "gpu_check.md").read_text()
    assert table.startswith("# GPU check: cpu") and "## Correctness" in table and "## Targets" in table
    training, = data["featinv_training"]   # --quick: the tiny stand-in, batch 1
    assert training["batch"] == 1 and training["images_per_s"] > 0 and "## FeatInv training" in table


def test_without_cuda_the_cuda_check_says_what_to_do(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.parse_args([])
    assert exit_info.value.code == 2
    assert "--device cpu --quick" in capsys.readouterr().err


def test_spent_budget_skips_the_remaining_configurations():
    configs = gpu_check.speed_configs(quick=True)
    records = gpu_check.measure_speed(torch.device("cpu"), configs, 1, 0, deadline=0)
    assert [r.error for r in records] == ["skipped: time budget spent"] * len(configs)


def test_goals_are_met_or_not_on_a_gpu():
    fast = speed.Config("sd-v1", 512, "resnet50", "bf16", 1, fast=True)
    paper4 = speed.Config("sd-v1", 512, "resnet50", "bf16", 4)
    records = [speed.Record(fast, s_per_iter=0.05, peak_memory_gib=30.0, run_s=13.0),
               speed.Record(paper4, s_per_iter=0.5, fraction_of_peak=0.5)]
    status = [g["status"] for g in gpu_check.goals(records, on_gpu=True)]
    assert status == ["met", "not met", "met"]


def test_full_check_covers_the_issue_grid():
    configs = gpu_check.speed_configs(quick=False)
    assert {c.extractor for c in configs} == set(speed.EXTRACTORS) and {c.size for c in configs} == {512}
    assert {(c.batch, c.precision, c.fast) for c in configs} == {
        (b, p, f) for b in (1, 4) for p in ("fp32", "bf16") for f in (False, True)}


@pytest.mark.gpu
def test_cuda_matches_the_cpu():
    rows = gpu_check.correctness(torch.device("cuda"), iterations=5)
    assert all(r["passed"] for r in rows), rows
