"""A run records what ran, and a run that fails before writing leaves no folder behind."""
import pytest

from ldm.cli.command import extractor_details
from ldm.cli.options import RunOptions
from ldm.extractors import build_extractor
from tiny_models import run_cli, tiny_args, write_tiny_sd

IMAGES = ("data/examples/chelsea.jpg", "data/examples/coffee.jpg")


@pytest.fixture(scope="module")
def sd_files(tmp_path_factory):
    return write_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


def test_random_weights_are_recorded_as_random_with_no_tag():
    extractor = build_extractor("torchvision:mobilenet_v2", weights="random")
    assert extractor.weights_tag == "IMAGENET1K_V2"      # its preprocessing's tag, not its weights
    details = extractor_details(extractor, RunOptions(extractor_weights="random"))
    assert details["weights"] == "random" and details["weights_tag"] is None
    assert details["preprocessing"]["input_size"] == 224


@pytest.mark.parametrize("prompt", [IMAGES[:1], IMAGES], ids=["one target", "two targets"])
def test_weights_not_found_leave_no_folder(empty_caches, sd_files, capsys, prompt):
    """open_clip's weights, offline with empty caches: not found once the models load."""
    runs = empty_caches / "runs"
    code, _, err = run_cli("open_clip:RN50", tiny_args(sd_files, runs / "new" / "run", prompt=prompt), capsys)
    assert code == 2 and "are not available: HF_HUB_OFFLINE is set" in err
    assert not runs.exists()


def test_the_speed_benchmark_writes_under_outputs_by_default(capsys):
    from ldm.benchmarks.speed import main as benchmark

    with pytest.raises(SystemExit):
        benchmark(["--help"])
    assert "(default: outputs/benchmark_results.json)" in " ".join(capsys.readouterr().out.split())
