"""DDIM with classifier-free guidance (ldm/models/diffusion/ddim.py), against a plain DDIM loop
written here from Song et al. (2021) and CompVis' DDIMSampler."""
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ldm.models.diffusion.controlled_ddpm import HintedDenoiser
from ldm.models.diffusion.ddim import make_ddim_timesteps, sample_ddim
from ldm.models.loading import build_model
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
T = 100
SHAPE = (2, 4, 8, 8)


@pytest.fixture(scope="module")
def model():
    return tiny_model(timesteps=T)


@pytest.fixture(scope="module")
def conditions(model):
    with torch.no_grad():
        return (model.get_learned_conditioning(["a red circle"] * 2),
                model.get_learned_conditioning([""] * 2))


def generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def reference_ddim(model, shape, cond, uncond, steps, scale, seeds):
    """DDIM at η = 0, step by step in float64 where the schedule is concerned."""
    abar = model.alphas_cumprod.double().numpy()
    taus = np.arange(0, model.num_timesteps, model.num_timesteps // steps) + 1
    x = torch.stack([torch.randn(shape[1:], generator=torch.Generator().manual_seed(s))
                     for s in seeds])
    for k in range(len(taus) - 1, -1, -1):
        a = abar[taus[k]]
        a_prev = abar[taus[k - 1]] if k > 0 else abar[0]
        t = torch.full((shape[0],), int(taus[k]), dtype=torch.long)
        e_u, e_c = model.apply_model(x, t, uncond), model.apply_model(x, t, cond)
        e = e_u + scale * (e_c - e_u)
        x0 = (x - float(np.sqrt(1 - a)) * e) / float(np.sqrt(a))
        x = float(np.sqrt(a_prev)) * x0 + float(np.sqrt(1 - a_prev)) * e
    return x


def test_ddim_timesteps_are_compvis_uniform():
    assert make_ddim_timesteps(1000, 50) == list(range(1, 1000, 20))
    assert make_ddim_timesteps(20, 5) == [1, 5, 9, 13, 17]
    assert len(make_ddim_timesteps(1000, 30)) == 31        # CompVis: T // steps = 33
    assert make_ddim_timesteps(1000, 3) == [1, 334, 667]   # CompVis' 1000 is past the end
    with pytest.raises(ValueError, match="DDIM steps must be in 1..20"):
        make_ddim_timesteps(20, 21)


@torch.no_grad()
def test_matches_a_plain_ddim_loop(model, conditions):
    cond, uncond = conditions
    ours = sample_ddim(model, SHAPE, cond, uncond, steps=10, guidance_scale=1.75,
                       generators=generators([5, 6]))
    theirs = reference_ddim(model, SHAPE, cond, uncond, 10, 1.75, [5, 6])
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    unguided = sample_ddim(model, SHAPE, cond, uncond, steps=10, guidance_scale=1.0,
                           generators=generators([5, 6]))
    assert not torch.allclose(unguided, ours, atol=1e-3)


def test_eta_zero_and_no_guidance_is_deterministic(model, conditions):
    cond, _ = conditions
    runs = [sample_ddim(model, SHAPE, cond, steps=5, guidance_scale=1.0,
                        generators=generators([1, 2])) for _ in range(2)]
    assert torch.equal(*runs)
    noisy = sample_ddim(model, SHAPE, cond, steps=5, guidance_scale=1.0, eta=1.0,
                        generators=generators([1, 2]))
    assert not torch.allclose(noisy, runs[0], atol=1e-3)


def test_an_image_does_not_depend_on_its_batch_mates(model, conditions):
    cond, uncond = conditions
    pair = sample_ddim(model, SHAPE, cond, uncond, steps=5, eta=0.5,
                       generators=generators([3, 4]))
    alone = sample_ddim(model, (1, *SHAPE[1:]), cond[:1], uncond[:1], steps=5, eta=0.5,
                        generators=generators([4]))
    torch.testing.assert_close(alone[0], pair[1], rtol=1e-5, atol=1e-5)


def test_callback_sees_every_step(model, conditions):
    cond, uncond = conditions
    seen = []
    final = sample_ddim(model, SHAPE, cond, uncond[:1], steps=4, generators=generators([0, 1]),
                        callback=seen.append)
    assert [s["i"] for s in seen] == [0, 1, 2, 3]
    assert [s["t"] for s in seen] == make_ddim_timesteps(T, 4)[::-1]
    assert all(s["x0_hat"].shape == SHAPE for s in seen)
    assert torch.equal(seen[-1]["x"], final)


def test_hint_is_bound_to_both_branches():
    controlled = build_model(OmegaConf.load("configs/tiny/featinv-tiny.yaml"))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in controlled.parameters():
            p.normal_(0, 0.1)
        cond, uncond = (controlled.get_learned_conditioning([p] * 2) for p in ("a cat", ""))
    hint = torch.randn(2, 16, 2, 2)
    direct = sample_ddim(controlled, SHAPE, cond, uncond, hint, steps=3,
                         generators=generators([7, 8]))
    bound = sample_ddim(HintedDenoiser(controlled, hint), SHAPE, cond, uncond, steps=3,
                        generators=generators([7, 8]))
    assert torch.equal(direct, bound)
    other = sample_ddim(controlled, SHAPE, cond, uncond, hint * 0, steps=3,
                        generators=generators([7, 8]))
    assert not torch.allclose(direct, other, atol=1e-3)


def test_guidance_without_an_unconditional_branch_is_refused(model, conditions):
    with pytest.raises(ValueError, match="needs an unconditional condition"):
        sample_ddim(model, SHAPE, conditions[0], steps=2, guidance_scale=1.75,
                    generators=generators([0, 1]))
    with pytest.raises(ValueError, match="one generator per image"):
        sample_ddim(model, SHAPE, conditions[0], steps=2, guidance_scale=1,
                    generators=generators([0]))
