"""The SD-size FLOP count of a whole inversion (ldm/benchmarks/inversion_cost.py), on the meta
device: its parts add up as the sampler runs them, and the presets' runs are counted by kind."""
from dataclasses import replace

import pytest

from ldm.benchmarks import inversion_cost as cost
from ldm.cli.options import preset_options


@pytest.fixture(scope="module")
def parts():
    return cost.count_parts("resnet50")


def test_parts_are_counted_without_weights(parts):
    # Frozen weights: the backward pass is the input gradient only, about one more forward.
    assert 1.8 < parts.unet_backward / parts.unet < 2.5
    assert 1.8 < parts.decoder_backward / parts.decoder < 2.5
    assert parts.tiny_backward < parts.decoder_backward / 10
    assert parts.extractor_backward > parts.extractor > 0


def test_the_paper_iteration_is_the_sum_of_its_parts(parts):
    paper = preset_options("paper").settings()
    run = cost.inversion(parts, paper, tiny=False)
    assert (run["guided"], run["plain"]) == (12_960, 0)
    assert run["iteration"] == pytest.approx(parts.unet_backward + parts.decoder_backward + parts.extractor_backward
                                             + parts.decoder + parts.extractor)
    assert run["flops"] == pytest.approx(12_960 * run["iteration"])


def test_the_fast_preset_counts_its_unguided_steps_as_unet_forwards(parts):
    fast = preset_options("fast").settings()
    run = cost.inversion(parts, fast, tiny=True)
    assert run["guided"] + run["plain"] == fast.total_iterations(1000) and run["plain"] > 0
    assert run["iteration"] == pytest.approx(parts.unet + parts.tiny_backward + parts.extractor_backward)
    unstrided = cost.inversion(parts, replace(fast, guidance_stride=1), tiny=True)
    assert unstrided["plain"] == 0 and unstrided["flops"] > run["flops"]
