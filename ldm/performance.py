"""Speed settings of a guided run: memory layout, compilation and activation checkpointing.

    model, extractor = prepare(model, extractor)                          # frozen, no waste
    model, extractor = prepare(model, extractor, compile=True)            # + torch.compile
    model, extractor = prepare(model, extractor, grad_checkpoint=True)    # when memory is short

The precision (autocast) is a sampler argument: `sample_feature_guided(..., precision="bf16")`.

`reference_waste(model)` puts back what the reference wasted (trainable UNet parameters whose
gradients every checkpointed block computes, checkpointing forced on); it exists only so that
`scripts/benchmark.py` can measure what removing it bought.
"""
from __future__ import annotations

import types

import torch
from torch import nn


def _device_of(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")


def checkpointable_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of the UNet and the first-stage decoder that can be checkpointed (those with a
    `use_checkpoint` switch): UNet ResBlocks and transformer blocks, decoder ResnetBlocks and
    attention blocks."""
    parts = [model.model.diffusion_model, model.first_stage_model.decoder]
    return [m for part in parts for m in part.modules() if hasattr(m, "use_checkpoint")]


def set_grad_checkpoint(model: nn.Module, enabled: bool) -> nn.Module:
    """Activation checkpointing of the UNet and decoder blocks on or off: on, the activations of
    each block are recomputed in the backward pass instead of being kept (about a third more
    compute for much less memory)."""
    for block in checkpointable_blocks(model):
        block.use_checkpoint = bool(enabled)
    return model


def _convolutional_parts(model: nn.Module, extractor: nn.Module | None) -> list[nn.Module]:
    parts = [model.model, model.first_stage_model]
    return parts + ([extractor] if extractor is not None else [])


def prepare(model: nn.Module, extractor: nn.Module | None = None, *,
            channels_last: bool | None = None, compile: bool = False,
            grad_checkpoint: bool = False,
            compile_backend: str = "inductor") -> tuple[nn.Module, nn.Module | None]:
    """Make a latent diffusion model (and a feature extractor) ready for fast guided sampling,
    in place; → (model, extractor).

    - Parameters are frozen (`requires_grad=False`): guidance needs the gradient with respect
      to the latent only.
    - `grad_checkpoint`: activation checkpointing of the UNet and decoder blocks (off by
      default: it recomputes every block's forward pass; turn it on when memory is short).
    - `channels_last`: the UNet, the first stage and the extractor in NHWC memory layout; None
      chooses it on CUDA (where cuDNN's reduced-precision convolutions want it) and not on the
      CPU (where it measured no faster: see scripts/benchmark.py).
    - `compile`: `torch.compile` of the UNet, the decoder and the extractor's forward passes
      with `compile_backend` (the first iterations pay the compilation, minutes for SD v1;
      worth it only for long runs).
    """
    device = _device_of(model)
    model.requires_grad_(False)
    if extractor is not None:
        extractor.requires_grad_(False)
    set_grad_checkpoint(model, grad_checkpoint)
    if channels_last is None:
        channels_last = device.type == "cuda"
    if channels_last:
        for part in _convolutional_parts(model, extractor):
            part.to(memory_format=torch.channels_last)
    if compile:
        model.model.diffusion_model.compile(backend=compile_backend)
        model.first_stage_model.decoder.compile(backend=compile_backend)
        if extractor is not None:
            extractor.compile(backend=compile_backend)
    return model, extractor


# --- the reference's waste, for the benchmark's comparison --------------------------------------

class _CompVisCheckpoint(torch.autograd.Function):
    """The reference's (CompVis) checkpoint: forward without a graph; backward recomputes the
    block and takes the gradients of its inputs *and of all its parameters*."""

    @staticmethod
    def forward(ctx, fn, n_inputs, *args):
        ctx.fn = fn
        ctx.inputs, ctx.params = list(args[:n_inputs]), list(args[n_inputs:])
        with torch.no_grad():
            return fn(*ctx.inputs)

    @staticmethod
    def backward(ctx, *grad_out):
        inputs = [x.detach().requires_grad_(x.requires_grad) if torch.is_tensor(x) else x
                  for x in ctx.inputs]
        with torch.enable_grad():
            out = ctx.fn(*inputs)
        wrt = [x for x in inputs if torch.is_tensor(x) and x.requires_grad] + ctx.params
        grads = iter(torch.autograd.grad(out, wrt, grad_out, allow_unused=True))
        input_grads = [next(grads) if torch.is_tensor(x) and x.requires_grad else None
                       for x in inputs]
        return (None, None, *input_grads, *grads)


def _compvis_forward(block: nn.Module, *args, **kwargs):
    args = (*args, *kwargs.values())  # block(x, context=c) → _forward(x, c)
    params = [p for p in block.parameters() if p.requires_grad]
    if not torch.is_grad_enabled():
        return block._forward(*args)
    return _CompVisCheckpoint.apply(block._forward, len(args), *args, *params)


def reference_waste(model: nn.Module) -> nn.Module:
    """Reproduce the reference's wasted work, in place (for benchmarks only): UNet parameters
    trainable, and every UNet ResBlock and transformer block checkpointed the CompVis way
    (recomputed in the backward pass, which also computes every parameter gradient, unused).
    The decoder is left as the reference had it (not checkpointed). Run it in fp32."""
    unet = model.model.diffusion_model
    unet.requires_grad_(True)
    for block in unet.modules():
        if hasattr(block, "use_checkpoint") and hasattr(block, "_forward"):
            block.forward = types.MethodType(_compvis_forward, block)
    return model
