"""The quick toy benchmark: the decoder keeps what each toy feature encodes and not the rest.

Margins come from measured runs of `scripts/toy_benchmark.py --quick` (12 targets, 50
timesteps; see docs/toy-world.md), not from hopes: each bound sits well inside
what was measured and well outside what chance or the unguided baseline give."""
import json

import pytest

import ldm.benchmarks.toy as toy_benchmark

pytestmark = pytest.mark.slow   # a benchmark: minutes

# Measured with --quick (2 threads): cosine 0.986 / 1.000 / 0.982; shape net shape 1.00, colour
# 0.17 (chance 0.17); colour net colour 1.00, shape 0.42 (unguided 0.17, chance 0.25); all net
# shape 0.92, colour 0.92. Full benchmark (50 targets): 0.92 / 0.16, 0.98 / 0.40, 0.92 / 0.70.
COSINE_MIN = {"toy_shape": 0.95, "toy_colour": 0.95, "toy_all": 0.95}
SHAPE_NET_SHAPE_MIN, SHAPE_NET_COLOUR_MAX = 0.75, 0.5
COLOUR_NET_COLOUR_MIN, COLOUR_NET_SHAPE_MAX = 0.83, 0.67
ALL_NET_SHAPE_MIN, ALL_NET_COLOUR_MIN = 0.67, 0.58
# Encoded attribute, guided minus unguided accuracy: measured 0.42 to 0.83 here, but 0.17 for
# toy_all's colour on CI's machine (other CPU kernels, another trajectory): guidance must get at
# least one more of the 12 targets right.
GAIN_OVER_UNGUIDED = 1 / 12 - 1e-9


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert toy_benchmark.main(["--quick", "--out", str(out)]) == 0
    assert {"results.json", "results.md", "mosaic.png"} <= {p.name for p in out.iterdir()}
    return json.loads((out / "results.json").read_text())


def guided(results, name):
    return results["extractors"][name]["guided"]["final"]


def unguided(results, name):
    return results["extractors"][name]["unguided"]["final"]


def test_features_are_matched(results):
    for name in ("toy_shape", "toy_colour", "toy_all"):
        assert guided(results, name)["cosine_mean"] >= COSINE_MIN[name]
        assert guided(results, name)["cosine_mean"] > unguided(results, name)["cosine_mean"]


def test_shape_feature_keeps_shape_not_colour(results):
    r = guided(results, "toy_shape")
    assert r["shape_acc"] >= SHAPE_NET_SHAPE_MIN
    assert r["colour_acc"] <= SHAPE_NET_COLOUR_MAX


def test_colour_feature_keeps_colour_not_shape(results):
    r = guided(results, "toy_colour")
    assert r["colour_acc"] >= COLOUR_NET_COLOUR_MIN
    assert r["shape_acc"] <= COLOUR_NET_SHAPE_MAX


def test_all_attribute_feature_keeps_shape_and_colour(results):
    r = guided(results, "toy_all")
    assert r["shape_acc"] >= ALL_NET_SHAPE_MIN and r["colour_acc"] >= ALL_NET_COLOUR_MIN


def test_guidance_beats_the_unguided_baseline_on_encoded_attributes(results):
    for name, attribute in (("toy_shape", "shape_acc"), ("toy_colour", "colour_acc"),
                            ("toy_all", "shape_acc"), ("toy_all", "colour_acc")):
        gain = guided(results, name)[attribute] - unguided(results, name)[attribute]
        assert gain >= GAIN_OVER_UNGUIDED, (name, attribute, gain)


def test_sweep_plumbing(tmp_path, capsys):
    """--sweep on a tiny grid: one row per (N, K) plus the unguided baseline, the iteration
    counts of the respaced schedules, the same targets everywhere; a rerun into the same folder
    only runs the settings it lacks; another target count is refused."""
    bench = toy_benchmark
    common = ["--sweep", "--n", "2", "--timesteps", "3", "--sweep_extractors", "toy_shape", "--out", str(tmp_path)]
    assert bench.main(common + ["--sweep_timesteps", "4", "--sweep_num_steps", "1", "2 1"]) == 0
    assert {"sweep.json", "sweep.md", "sweep.png"} <= {p.name for p in tmp_path.iterdir()}
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    rows = {(r["timesteps"], tuple(r["num_steps"]), r["guided"]): r for r in sweep["runs"]}
    # E = 900 is a timestep index: of the 4 timesteps 999, 666, 333, 0 only 999 gets the early K.
    assert {key: r["iterations"] for key, r in rows.items()} == {
        (4, (1,), True): 4, (4, (2, 1), True): 5, (3, (1,), False): 3}
    for r in rows.values():
        assert r["extractor"] == "toy_shape" and len(r["cosines"]) == 2
        assert 0 <= r["frac_cosine_goal"] <= 1 and 0 <= r["shape_acc"] <= 1 and r["seconds"] >= 0
    assert "| toy_shape | 4 | 2,1 | 5 |" in (tmp_path / "sweep.md").read_text()
    capsys.readouterr()

    assert bench.main(common + ["--sweep_timesteps", "4", "2", "--sweep_num_steps", "1"]) == 0
    assert "1 settings to run (2 already in" in capsys.readouterr().out
    again = json.loads((tmp_path / "sweep.json").read_text())
    assert len(again["runs"]) == 4
    assert [r for r in again["runs"] if r["timesteps"] == 4 and r["num_steps"] == [2, 1]] == \
        [rows[(4, (2, 1), True)]]
    assert bench.main(["--sweep", "--n", "3", "--out", str(tmp_path)]) == 2
