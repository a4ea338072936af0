"""Stable Diffusion v1 as a diffusers folder (`model_index.json`, `unet/`, `vae/`,
`text_encoder/`, `scheduler/`), or a Hugging Face cache folder of one
(`models--CompVis--stable-diffusion-v1-4/` or its `snapshots/<rev>/`).

The architecture comes from the components' config.json files, read as data (nothing from the
folder is imported or run); the weights are read with safetensors or the weights-only loader
(ldm/checkpoint.py) and their keys renamed to our CompVis layout. Folders of other models
(SD 2, SD XL, v-prediction, inpainting) are refused with a message saying which they are.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ldm.checkpoint import CheckpointError, load_state_dict

_SD_V1 = "pass an SD v1 folder (e.g. CompVis/stable-diffusion-v1-4, stable-diffusion-v1-5) or an SD v1 .ckpt"
# scheduler/scheduler_config.json of SD v1: what our DDPM schedule computes (ε-prediction).
SD_V1_SCHEDULE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                  "num_train_timesteps": 1000, "prediction_type": "epsilon"}
# Weight files of each component, in order of preference (full precision first).
WEIGHT_FILES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
             "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
            "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin", "model.fp16.safetensors",
                     "pytorch_model.fp16.bin"),
}
TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "max_position_embeddings", "hidden_act", "layer_norm_eps")
# Where each component's keys live in our model.
OUR_PREFIX = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
              "text_encoder": "cond_stage_model.transformer.text_model."}
UNET_RESNET = (("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."),
               ("time_emb_proj.", "emb_layers.1."), ("norm2.", "out_layers.0."),
               ("conv2.", "out_layers.3."), ("conv_shortcut.", "skip_connection."))
VAE_RESNET = (("conv_shortcut.", "nin_shortcut."),)
# diffusers' attention names, new and old (older saves such as v1-4's use query/key/value).
VAE_ATTENTION = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                 ("to_out.0.", "proj_out."), ("query.", "q."), ("key.", "k."), ("value.", "v."),
                 ("proj_attn.", "proj_out."))


class NotStableDiffusionV1Error(CheckpointError):
    """A diffusers folder of a model other than SD v1."""


# --- finding the folder -----------------------------------------------------------------------

def pipeline_folder(path: str | Path) -> Path | None:
    """The diffusers pipeline folder that `path` stands for (itself, or the snapshot of a Hugging
    Face cache folder); None when `path` is not a folder."""
    path = Path(path)
    if not path.is_dir():
        return None
    if (path / "snapshots").is_dir():
        path = _snapshot(path)
    if not (path / "unet" / "config.json").is_file():
        raise CheckpointError(
            f"{path} is a folder but not a diffusers Stable Diffusion pipeline (no unet/config.json): "
            "pass the pipeline folder (model_index.json, unet/, vae/, text_encoder/, scheduler/), "
            "its Hugging Face cache folder, or a .ckpt/.safetensors file")
    return path


def _snapshot(repo: Path) -> Path:
    """The snapshot a Hugging Face cache folder's refs/main names (or its only snapshot)."""
    ref = repo / "refs" / "main"
    name = ref.read_text().strip() if ref.is_file() else ""
    if name and Path(name).name == name and (repo / "snapshots" / name).is_dir():
        return repo / "snapshots" / name
    snapshots = sorted(p for p in (repo / "snapshots").iterdir() if p.is_dir())
    if len(snapshots) == 1:
        return snapshots[0]
    raise CheckpointError(f"{repo}: {len(snapshots)} snapshots and no refs/main naming one; "
                          f"pass one of them: {', '.join(str(p) for p in snapshots) or 'none'}")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path} not found: a diffusers SD v1 folder has unet/, vae/, "
                              "text_encoder/ and scheduler/ with their config files")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not readable JSON ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return data


# --- the architecture ---------------------------------------------------------------------------

def _configs(folder: Path) -> dict[str, dict]:
    index = folder / "model_index.json"
    return {"index": _read_json(index) if index.is_file() else {},
            "unet": _read_json(folder / "unet" / "config.json"),
            "vae": _read_json(folder / "vae" / "config.json"),
            "text_encoder": _read_json(folder / "text_encoder" / "config.json"),
            "scheduler": _read_json(folder / "scheduler" / "scheduler_config.json")}


def _other_kind(c: dict[str, dict]) -> str | None:
    """What the folder holds when it is a known model other than SD v1."""
    unet, scheduler = c["unet"], c["scheduler"]
    if ("text_encoder_2" in c["index"] or unet.get("addition_embed_type") == "text_time"
            or unet.get("cross_attention_dim") == 2048):
        return "Stable Diffusion XL (two text encoders, cross_attention_dim 2048)"
    if unet.get("cross_attention_dim") == 1024 or c["text_encoder"].get("hidden_size") == 1024:
        return "Stable Diffusion 2 (OpenCLIP ViT-H text encoder, cross_attention_dim 1024)"
    if scheduler.get("prediction_type", "epsilon") != "epsilon":
        return f"a {scheduler['prediction_type']} model (SD v1 predicts the noise, epsilon)"
    if unet.get("in_channels", 4) != 4:
        return f"an inpainting or depth model (UNet in_channels {unet['in_channels']}, SD v1 has 4)"
    return None


def _require(ok: bool, folder: Path, what: str) -> None:
    if not ok:
        raise NotStableDiffusionV1Error(f"{folder}: {what}, which is not Stable Diffusion v1's; {_SD_V1}")


def _unet_params(unet: dict, folder: Path) -> dict:
    channels, down, up = unet["block_out_channels"], unet["down_block_types"], unet["up_block_types"]
    attention = [kind == "CrossAttnDownBlock2D" for kind in down]
    heads = unet.get("num_attention_heads") or unet["attention_head_dim"]
    _require(set(down) <= {"CrossAttnDownBlock2D", "DownBlock2D"}
             and up == [("CrossAttnUpBlock2D" if a else "UpBlock2D") for a in reversed(attention)]
             and unet.get("mid_block_type", "UNetMidBlock2DCrossAttn") == "UNetMidBlock2DCrossAttn",
             folder, f"unet/config.json has the blocks {down} / {up}")
    _require(isinstance(heads, int) and isinstance(unet.get("transformer_layers_per_block", 1), int)
             and all(c % channels[0] == 0 for c in channels), folder,
             f"unet/config.json has attention heads {heads} and widths {channels}")
    _require(not unet.get("use_linear_projection") and not unet.get("upcast_attention")
             and unet.get("class_embed_type") is None and unet.get("time_cond_proj_dim") is None,
             folder, "unet/config.json uses linear projections, upcast attention or extra embeddings")
    return {"in_channels": unet["in_channels"], "out_channels": unet["out_channels"],
            "model_channels": channels[0], "channel_mult": [c // channels[0] for c in channels],
            "attention_resolutions": [2 ** i for i, a in enumerate(attention) if a],
            "num_res_blocks": unet["layers_per_block"], "num_heads": heads,
            "use_spatial_transformer": True,
            "transformer_depth": unet.get("transformer_layers_per_block", 1),
            "context_dim": unet["cross_attention_dim"], "use_checkpoint": False, "legacy": False}


def _vae_params(vae: dict, folder: Path) -> dict:
    channels = vae["block_out_channels"]
    _require(set(vae["down_block_types"]) == {"DownEncoderBlock2D"}
             and set(vae["up_block_types"]) == {"UpDecoderBlock2D"}
             and all(c % channels[0] == 0 for c in channels)
             and vae.get("use_quant_conv", True) and vae.get("use_post_quant_conv", True),
             folder, f"vae/config.json has the blocks {vae['down_block_types']} and widths {channels}")
    return {"embed_dim": vae["latent_channels"], "ddconfig": {
        "double_z": True, "z_channels": vae["latent_channels"], "resolution": vae["sample_size"],
        "in_channels": vae["in_channels"], "out_ch": vae["out_channels"], "ch": channels[0],
        "ch_mult": [c // channels[0] for c in channels], "num_res_blocks": vae["layers_per_block"],
        "attn_resolutions": [], "dropout": 0.0}}


def _check_schedule(scheduler: dict, folder: Path) -> None:
    found = {"prediction_type": "epsilon", **scheduler}   # diffusers' default prediction
    wrong = {k: found.get(k) for k, v in SD_V1_SCHEDULE.items() if found.get(k) != v}
    _require(not wrong and found.get("trained_betas") is None, folder,
             f"scheduler/scheduler_config.json has {wrong or 'trained_betas'} (SD v1: {SD_V1_SCHEDULE})")


def folder_config(folder: Path):
    """The model config (as ldm/models/loading.py builds it) of the SD v1 pipeline in `folder`."""
    c = _configs(folder)
    kind = _other_kind(c)
    if kind:
        raise NotStableDiffusionV1Error(f"{folder} holds {kind}; this project decodes with Stable "
                                        f"Diffusion v1 only: {_SD_V1}")
    try:
        unet, vae = _unet_params(c["unet"], folder), _vae_params(c["vae"], folder)
        text = {k: c["text_encoder"][k] for k in TEXT_FIELDS}
    except (KeyError, TypeError) as err:
        raise NotStableDiffusionV1Error(f"{folder}: a component config lacks or mistypes {err}; "
                                        f"{_SD_V1}") from None
    _require(unet["context_dim"] == text["hidden_size"], folder,
             f"the UNet's cross_attention_dim {unet['context_dim']} differs from the text "
             f"encoder's hidden_size {text['hidden_size']}")
    _check_schedule(c["scheduler"], folder)
    return OmegaConf.create({"model": {
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "linear_start": SD_V1_SCHEDULE["beta_start"], "linear_end": SD_V1_SCHEDULE["beta_end"],
            "timesteps": SD_V1_SCHEDULE["num_train_timesteps"],
            "image_size": c["unet"].get("sample_size", 64), "channels": unet["in_channels"],
            "conditioning_key": "crossattn", "scale_factor": c["vae"].get("scaling_factor", 0.18215),
            "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                            "params": unet},
            "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": vae},
            "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                                  "params": {"text_config": text}}}}})


# --- the weights ---------------------------------------------------------------------------------

def _unet_renames(unet: dict) -> list[tuple[str, str, tuple]]:
    """(diffusers prefix, our prefix, renames inside) for every block of the UNet."""
    per_level, levels = unet["layers_per_block"] + 1, len(unet["block_out_channels"])
    renames = [("time_embedding.linear_1.", "time_embed.0.", ()),
               ("time_embedding.linear_2.", "time_embed.2.", ()),
               ("conv_in.", "input_blocks.0.0.", ()), ("conv_norm_out.", "out.0.", ()),
               ("conv_out.", "out.2.", ()), ("mid_block.attentions.0.", "middle_block.1.", ())]
    renames += [(f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.", UNET_RESNET) for j in range(2)]
    for i in range(levels):
        for j in range(per_level - 1):
            block = per_level * i + j + 1
            renames += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{block}.0.", UNET_RESNET),
                        (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{block}.1.", ())]
        for j in range(per_level):
            block = per_level * i + j
            renames += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{block}.0.", UNET_RESNET),
                        (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{block}.1.", ())]
        if i < levels - 1:
            after = 2 if unet["up_block_types"][i] == "CrossAttnUpBlock2D" else 1
            renames += [(f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{per_level * (i + 1)}.0.op.", ()),
                        (f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{per_level * i + per_level - 1}.{after}.", ())]
    return renames


def _vae_renames(vae: dict) -> list[tuple[str, str, tuple]]:
    per_level, levels = vae["layers_per_block"] + 1, len(vae["block_out_channels"])
    renames = []
    for side in ("encoder", "decoder"):
        renames += [(f"{side}.conv_norm_out.", f"{side}.norm_out.", ()),
                    (f"{side}.mid_block.attentions.0.", f"{side}.mid.attn_1.", VAE_ATTENTION)]
        renames += [(f"{side}.mid_block.resnets.{j}.", f"{side}.mid.block_{j + 1}.", VAE_RESNET)
                    for j in range(2)]
    for i in range(levels):
        up = levels - 1 - i   # diffusers counts the decoder's levels from the bottom
        renames += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", VAE_RESNET)
                    for j in range(per_level - 1)]
        renames += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{up}.block.{j}.", VAE_RESNET)
                    for j in range(per_level)]
        if i < levels - 1:
            renames += [(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.", ()),
                        (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{up}.upsample.", ())]
    return renames


def _rename(key: str, renames) -> str:
    """`key` in our layout; keys no rule names stay as they are (the strict load lists them)."""
    for theirs, ours, inside in renames:
        if key.startswith(theirs):
            rest = key[len(theirs):]
            for old, new in inside:
                if rest.startswith(old):
                    return ours + new + rest[len(old):]
            return ours + rest
    return key


def _component_weights(folder: Path, component: str) -> dict[str, torch.Tensor]:
    for name in WEIGHT_FILES[component]:
        if (folder / component / name).is_file():
            return load_state_dict(folder / component / name)
    raise CheckpointError(f"{folder / component}: no weights file (expected one of "
                          f"{', '.join(WEIGHT_FILES[component])})")


def folder_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The UNet, VAE and text encoder weights of the pipeline in `folder`, in our layout (the
    DDPM schedule buffers are not in a diffusers folder: the model computes them)."""
    c = _configs(folder)
    renames = {"unet": _unet_renames(c["unet"]), "vae": _vae_renames(c["vae"]), "text_encoder": ()}
    state = {}
    for component, rules in renames.items():
        for key, tensor in _component_weights(folder, component).items():
            ours = OUR_PREFIX[component] + _rename(key.removeprefix("text_model."), rules)
            if ".mid.attn_1." in ours and tensor.ndim == 2:   # linear in diffusers, 1x1 conv in ours
                tensor = tensor[:, :, None, None]
            state[ours] = tensor
    return state
