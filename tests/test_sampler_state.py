"""The loop state: how a batch's state splits into one per target and back, and how it maps to
the resume file's tensors and JSON (derived from the dataclass's fields)."""
import pytest
import torch

from ldm.models.diffusion.sampler_state import BestImage, SamplerState
from ldm.scorelog import Score


def state(batch: int, prev: bool) -> SamplerState:
    g = torch.Generator().manual_seed(0)
    return SamplerState(
        k=3, j=1, timestep=7, iterations=11, history_count=9, z=torch.randn(batch, 4, 2, 2, generator=g),
        history=torch.randn(batch, 5, generator=g), best_prev_score=torch.randn(batch, generator=g),
        do_backward=torch.rand(batch, generator=g) > 0.5,
        best_prev_z=torch.randn(batch, 4, 2, 2, generator=g) if prev else None,
        best=[BestImage.of(Score(b, 9, 0, "guided", float(b), 0.5), torch.full((3, 2, 2), float(b)))
              for b in range(batch)],
        guard_events=list(range(batch)), generator_states=[torch.Generator().manual_seed(b).get_state()
                                                           for b in range(batch)])


def same(a: SamplerState, b: SamplerState) -> bool:
    tensors = ("z", "history", "best_prev_score", "do_backward")
    return (all(torch.equal(getattr(a, n), getattr(b, n)) for n in tensors)
            and (a.best_prev_z is None) == (b.best_prev_z is None)
            and (a.best_prev_z is None or torch.equal(a.best_prev_z, b.best_prev_z))
            and [x.to_json() for x in a.best] == [x.to_json() for x in b.best]
            and a.guard_events == b.guard_events and a.position == b.position
            and all(torch.equal(x, y) for x, y in zip(a.generator_states, b.generator_states)))


@pytest.mark.parametrize("prev", [True, False])
def test_states_split_stack_and_round_trip_through_their_file_parts(prev):
    whole = state(3, prev)
    parts = whole.split()
    assert [p.batch for p in parts] == [1, 1, 1] and parts[2].guard_events == [2]
    assert same(SamplerState.stack(parts), whole)
    tensors, meta = whole.to_parts()
    assert set(tensors) == ({"z", "history", "best_prev_score", "do_backward", *(["best_prev_z"] * prev)}
                            | {f"generator.{b}" for b in range(3)} | {f"best.{b}.image" for b in range(3)})
    assert same(SamplerState.from_parts(tensors, meta), whole)
    with pytest.raises(ValueError, match="different positions"):
        SamplerState.stack([parts[0], SamplerState(**{**vars(parts[1]), "iterations": 12})])


def test_files_of_format_one_with_one_guard_count_for_the_batch():
    tensors, meta = state(2, False).to_parts()
    meta["guard_events"] = 4          # format 1 kept one count for the whole batch
    assert SamplerState.from_parts(tensors, meta).guard_events == [4, 4]
