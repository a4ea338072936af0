"""Long toy work shows progress: the toy benchmark's runs go through a tqdm bar on stderr."""
import pytest

import ldm.benchmarks.toy as toy_benchmark


@pytest.mark.slow
def test_a_sweep_shows_a_bar_over_its_settings(tmp_path, capsys, one_thread):
    assert toy_benchmark.main(["--sweep", "--n", "1", "--timesteps", "2", "--sweep_extractors", "toy_shape",
                               "--sweep_timesteps", "2", "--sweep_num_steps", "1", "--out", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "sweep: 100%" in err and "2/2" in err       # the guided setting and the unguided baseline
    assert "toy_shape N=2 K=1" in out                  # each setting's line, printed above the bar
