"""Speed settings on the tiny model: reduced precision, activation checkpointing, channels_last,
torch.compile and the reference-waste switch give the same guidance (within tolerance)."""
import pytest
import torch
import torch.nn.functional as F

from ldm.models.diffusion.feature_guidance import GuidanceSettings, sample_feature_guided
from ldm.models.diffusion.mixed_precision import FP16_LOSS_SCALE, MixedPrecision
from ldm.models.diffusion.mixed_precision import guidance_loss
from ldm.objectives import FeatureDistance
from ldm.performance import checkpointable_blocks, prepare, reference_waste
from tiny_models import TinyExtractor, tiny_model

T = 6
SHAPE = (2, 4, 8, 8)
BACKEND = "aot_eager"


@pytest.fixture(scope="module")
def cond():
    with torch.no_grad():
        return tiny_model(T).get_learned_conditioning([""])


def objective(seed=0):
    extractor = TinyExtractor(seed=seed)
    target = extractor(torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1)
    return FeatureDistance(extractor, target.detach() * 3)


def run(model, cond, obj, **kw):
    settings = GuidanceSettings(forward_guidance=True, num_steps=(2,))
    gens = [torch.Generator().manual_seed(b) for b in range(SHAPE[0])]
    return sample_feature_guided(model, cond, obj, settings, SHAPE, gens, progress=False, **kw)


def guidance_grad(model, cond, obj, precision="fp32", t=3):
    """∂(−Σ dist)/∂z of one guided step, through the sampler's precision wrapper."""
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    tt = torch.full((SHAPE[0],), t)
    if precision != "fp32":
        model = MixedPrecision(model, obj, precision, z.device)
        obj = model.objective
    x = model.decode_first_stage(model.predict_start_from_noise(z, tt, model.apply_model(z, tt, cond)))
    dist, _ = obj(x)
    return torch.autograd.grad(guidance_loss(dist, precision), z)[0], x


def cosines(a, b):
    return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)


# --- precision -------------------------------------------------------------------------------

def test_fp32_is_the_default_and_unchanged(cond):
    model, obj = tiny_model(T), objective()
    default = run(model, cond, obj)
    explicit = run(model, cond, obj, precision="fp32")
    assert torch.equal(default.final_images, explicit.final_images)
    assert torch.equal(default.final_distance, explicit.final_distance)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_gradient_is_finite_nonzero_and_aligned(cond, precision):
    model, obj = tiny_model(T), objective()
    reference, x32 = guidance_grad(model, cond, obj)
    grad, x = guidance_grad(model, cond, obj, precision)
    assert grad.dtype == torch.float32 and x.dtype == torch.float32
    assert torch.isfinite(grad).all()
    assert (grad.flatten(1).norm(dim=1) > 0).all()
    assert cosines(grad, reference).min() > 0.95
    if precision == "bf16":  # fp16 scales each image's loss: only the direction compares
        ratio = grad.flatten(1).norm(dim=1) / reference.flatten(1).norm(dim=1)
        torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0.05, atol=0)
    torch.testing.assert_close(x, x32, rtol=0.05, atol=0.05)


def test_fp16_loss_scale_is_per_image():
    dist = torch.tensor([1e-6, 3.0, 2e4], requires_grad=True)
    (grad,) = torch.autograd.grad(guidance_loss(dist, "fp16"), dist)
    torch.testing.assert_close(grad * dist.detach(), torch.full((3,), -FP16_LOSS_SCALE))
    (grad,) = torch.autograd.grad(guidance_loss(dist, "bf16"), dist)
    assert torch.equal(grad, -torch.ones(3))


def test_bf16_run_is_finite_and_close_to_fp32(cond):
    model, obj = tiny_model(T), objective()
    fp32 = run(model, cond, obj)
    bf16 = run(model, cond, obj, precision="bf16")
    assert bf16.guard_events == [0, 0] and bf16.iterations == fp32.iterations
    assert torch.isfinite(bf16.final_images).all() and bf16.final_images.dtype == torch.float32
    assert torch.isfinite(bf16.final_distance).all()
    # Sampling amplifies rounding differences; the images stay alike on the whole.
    assert cosines(bf16.final_images, fp32.final_images).min() > 0.8


def test_unknown_precision_is_refused(cond):
    with pytest.raises(ValueError, match="unknown 'fp8'.*fp32, bf16, fp16"):
        run(tiny_model(T), cond, objective(), precision="fp8")


# --- prepare ---------------------------------------------------------------------------------

def test_prepare_freezes_and_checkpointing_is_off_by_default():
    model, extractor = tiny_model(T), TinyExtractor()
    model.requires_grad_(True)
    extractor.requires_grad_(True)
    prepare(model, extractor)
    assert not any(p.requires_grad for p in [*model.parameters(), *extractor.parameters()])
    blocks = checkpointable_blocks(model)
    assert len(blocks) > 0 and not any(b.use_checkpoint for b in blocks)
    # UNet blocks and decoder blocks both have the switch
    names = {type(b).__name__ for b in blocks}
    assert {"ResBlock", "BasicTransformerBlock", "ResnetBlock"} <= names


def test_grad_checkpoint_gives_the_same_gradient(cond):
    model, obj = tiny_model(T), objective()
    prepare(model)
    off, _ = guidance_grad(model, cond, obj)
    prepare(model, grad_checkpoint=True)
    assert all(b.use_checkpoint for b in checkpointable_blocks(model))
    on, _ = guidance_grad(model, cond, obj)
    torch.testing.assert_close(on, off, rtol=1e-5, atol=1e-6)


def test_channels_last_gives_the_same_output(cond):
    model, obj = tiny_model(T), objective()
    before, x_before = guidance_grad(model, cond, obj)
    prepare(model, obj.extractor, channels_last=True)
    conv = model.model.diffusion_model.input_blocks[0][0]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    after, x_after = guidance_grad(model, cond, obj)
    torch.testing.assert_close(x_after, x_before, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(after, before, rtol=1e-3, atol=1e-3 * before.abs().max().item())


@pytest.mark.slow
def test_compiled_model_guides_like_eager(cond):
    # aot_eager traces the graphs and their backward as inductor would, without C++ codegen
    # (inductor itself takes minutes to compile even this model on one core).
    model, obj = tiny_model(T), objective()
    eager = run(model, cond, obj)
    prepare(model, obj.extractor, compile=True, compile_backend=BACKEND)
    compiled = run(model, cond, obj)
    torch.testing.assert_close(compiled.final_images, eager.final_images, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(compiled.final_distance, eager.final_distance, rtol=1e-3, atol=1e-4)


def test_reference_waste_same_gradient_with_trainable_unet(cond):
    model, obj = tiny_model(T), objective()
    lean, _ = guidance_grad(model, cond, obj)
    reference_waste(model)
    assert all(p.requires_grad for p in model.model.parameters())
    wasteful, _ = guidance_grad(model, cond, obj)
    torch.testing.assert_close(wasteful, lean, rtol=1e-4, atol=1e-5)
    assert all(p.grad is None for p in model.parameters())  # computed, never kept
