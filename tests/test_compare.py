"""The decoder comparison's quick mode (`scripts/toy_benchmark.py --compare --quick`: the guided
decoder, the fast preset, FeatInv spatial and the hybrid on 6 toy_all targets, 1 seed). Margins
come from measured runs (MEASURED below; the full tables are in docs/trained-decoder.md and
docs/fast-path.md), well inside what was measured and outside what the cheaper decoders give."""
import json

import pytest

import ldm.benchmarks.toy as toy_benchmark

pytestmark = pytest.mark.slow   # a benchmark: minutes

# Measured with --compare --quick (1 thread): cosine guided 0.972, fast preset 0.968, FeatInv
# spatial 0.705, hybrid 0.982 (hybrid - FeatInv 0.277); with the toy decoders of issue 19's recipe
# (1 thread, 2026-12-03): guided 0.984, fast preset 0.958, FeatInv spatial 0.993, hybrid 0.977
# (hybrid - FeatInv -0.016: on these 6 targets the trained decoder alone is as good; on the full
# comparison's 16 x 2 the hybrid is ahead, 0.985 against 0.960, min 0.908 against 0.754). The toy
# benchmark moved by up to 0.25 in attribute accuracy on another machine's kernels, so the bounds
# sit well below these.
COSINE_MIN = {"guided": 0.93, "fast preset": 0.92, "featinv spatial": 0.85, "hybrid": 0.93}
# The fast preset of issue 20 (stride schedule, 1 thread): cosine 0.962, shape 0.67, clean 0.50,
# where the preset before it gave 0.958, shape 0.33, clean 0.17 and the guided decoder 0.984,
# shape 1.00, clean 0.83 (docs/fast-path.md). Its verdict bounds sit one target below what it gave
# and above what the preset before gave.
FAST_SHAPE_MIN, FAST_CLEAN_MIN = 0.5, 0.33
HYBRID_LOSS_MAX = 0.05
GUIDED_ITERATIONS = 260                  # the toy defaults: 10 timesteps x 8 + 90 x 2


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    assert toy_benchmark.main(["--compare", "--quick", "--out", str(out)]) == 0
    assert {"compare.json", "compare.md", "compare.png"} <= {p.name for p in out.iterdir()}
    data = json.loads((out / "compare.json").read_text())
    assert data["n_targets"] == 6 and data["seeds"] == 1
    return {row["decoder"]: row for row in data["rows"]}


def test_the_quick_comparison_runs_the_four_decoders_on_the_same_targets(rows):
    assert set(rows) == {"guided", "fast preset", "featinv spatial", "hybrid"}
    assert {row["extractor"] for row in rows.values()} == {"toy_all"}
    assert {row["targets"] for row in rows.values()} == {6}


def test_costs_are_counted(rows):
    assert rows["guided"]["backward_per_target"] == GUIDED_ITERATIONS
    assert rows["featinv spatial"]["backward_per_target"] == 0           # no extractor gradient
    assert rows["featinv spatial"]["denoiser_per_target"] == 100         # 50 steps x 2 (guidance)
    assert rows["hybrid"]["backward_per_target"] <= GUIDED_ITERATIONS / 4
    assert rows["fast preset"]["gflop_per_inversion"] <= rows["guided"]["gflop_per_inversion"] / 10


def test_fidelity(rows):
    cosine = {name: row["cosine_mean"] for name, row in rows.items()}
    assert cosine["guided"] >= COSINE_MIN["guided"], cosine
    assert cosine["hybrid"] >= COSINE_MIN["hybrid"], cosine
    assert cosine["fast preset"] >= COSINE_MIN["fast preset"], cosine
    assert cosine["featinv spatial"] >= COSINE_MIN["featinv spatial"], cosine
    # The extractor's guidance does not undo the trained decoder the hybrid starts from.
    assert cosine["hybrid"] >= cosine["featinv spatial"] - HYBRID_LOSS_MAX, cosine


def test_the_fast_preset_keeps_the_verdicts(rows):
    fast = rows["fast preset"]
    assert fast["shape_acc"] >= FAST_SHAPE_MIN, fast
    assert fast["clean_rate"] >= FAST_CLEAN_MIN, fast
