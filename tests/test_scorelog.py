"""The one module that knows the reference's log-line format: records become the reference's
lines byte for byte, and those lines parse back into the same records."""
import math

import pytest
import torch

from ldm.models.diffusion.sampler_state import BestImage
from ldm.scorelog import Guarded, Improved, Score, decode_rec, format_line, parse_line, stop_message

REFERENCE_LINES = [   # as the reference's scripts (and log.txt files of earlier runs) write them
    (Score(0, 999, 0, "estimate", 12.5, 0.25), "999th timestep, 0th self-recurrence -> xy_dists:12.5, xy_cossim:0.25"),
    (Score(0, 999, 3, "guided", 1.0, 0.5), "999th timestep, 3.5th self-recurrence -> xy_dists:1.0, xy_cossim:0.5"),
    (Score(0, 10, 2, "backward_iteration", 0.5, 0.9, 0),
     "10th timestep, 2.7th self-recurrence, 0th backward iteration -> xy_dists:0.5, xy_cossim:0.9"),
    (Score(0, 10, 2, "backward", 0.25, 0.95, 3),
     "10th timestep, 2.9th self-recurrence, 3th backward iteration -> xy_dists:0.25, xy_cossim:0.95"),
    (Score(0, 10, 1, "z_prev", 0.75, 0.8), "10th timestep, 1th self-recurrence (z_prev) -> xy_dists:0.75, xy_cossim:0.8"),
    (Score(0, -1, None, "final", 0.125, 0.99), "-1th timestep (FINAL) -> xy_dists:0.125, xy_cossim:0.99"),
    (Improved(0, -math.inf, -12.5), "!!! Found a better image (-inf -> -12.5)"),
    (Improved(0, -1.0, -0.75, "z_prev"), "!!! Found a better z_prev (-1.0 -> -0.75)"),
]


@pytest.mark.parametrize("record, line", REFERENCE_LINES, ids=[r.__class__.__name__ for r, _ in REFERENCE_LINES])
def test_records_are_the_reference_lines_and_back(record, line):
    assert format_line(record) == line
    assert parse_line(line) == record


def test_without_cosine_and_lines_without_records():
    score = Score(0, 5, 0, "estimate", 3.0, None)
    assert format_line(Score(0, 5, 0, "estimate", 3.0, 0.5), cosine=False) == "5th timestep, 0th self-recurrence -> xy_dists:3.0"
    assert parse_line(format_line(score)) == score
    guard = format_line(Guarded(0, 7, 2))
    assert guard.startswith("7th timestep, 2th self-recurrence: guidance gradient is zero")
    for line in ("Elapsed time = 1.5 sec", "Run options: Namespace(seed=42)", guard,
                 "Interrupted by SIGINT before timestep 3, 0th self-recurrence"):
        assert parse_line(line) is None


def test_coded_recurrences_decode_at_any_j():
    for j in (0, 1, 9, 10, 999):
        for stage, offset in (("estimate", 0), ("guided", 0.5), ("backward_iteration", 0.7), ("backward", 0.9)):
            assert decode_rec(j + offset) == (j, stage)
    with pytest.raises(ValueError, match="j, j \\+ 0.5"):
        decode_rec(1.3)


def test_stop_message_is_the_last_stop_unless_the_run_went_on(tmp_path):
    path = tmp_path / "log.txt"
    stopped = "Interrupted by SIGTERM before timestep 9, 0th self-recurrence"
    path.write_text(format_line(REFERENCE_LINES[0][0]) + "\n" + stopped + "\n")
    assert stop_message(path) == stopped
    path.write_text(path.read_text() + format_line(REFERENCE_LINES[1][0]) + "\n")
    assert stop_message(path) is None


def test_best_image_records_keep_the_reference_coding():
    best = BestImage.of(Score(0, 10, 2, "backward", 0.25, 0.95, 3), torch.zeros(3, 4, 4))
    record = best.to_json()
    assert (record["t"], record["rec"], record["bk"], record["score"]) == (10, 2.9, 3, -0.25)
    again = BestImage.from_json(record, best.image)
    assert (again.timestep, again.recurrence, again.stage, again.backward_iteration) == (10, 2, "backward", 3)
    assert BestImage.from_json(BestImage().to_json(), None).image is None
