"""Every command-line flag, once: `RunOptions` is the table. Each field is a flag (its name is
the flag's destination) with its help, its default, the sampler setting it sets (`setting`),
and whether it enters the resume fingerprint (`fingerprint`); the parser, the sampler's
`GuidanceSettings`, the fingerprint and metrics.json are derived from it. Nothing below the
command line receives an argparse namespace: it gets a `RunOptions`.

Presets (`--preset paper|fast`, `--paper` for short) replace defaults; flags given on the
command line still win over a preset.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import MISSING, asdict, dataclass, field, fields

from typing import TYPE_CHECKING

from ldm.choices import GRADIENTS, LOSSES, PRECISION_NAMES, SAMPLER_STEPS
from ldm.decoders import DECODER_KINDS, DecoderOptions, decoder_kind
from ldm.errors import SettingError
from ldm.paths import DEFAULT_CKPT, DEFAULT_CONFIG, ROOT, shipped

if TYPE_CHECKING:   # imported where used: --help and `python -m ldm flags` need no torch
    from ldm.models.diffusion.feature_guidance import GuidanceSettings

MAX_SEED = 2 ** 64 - 1
MAX_BATCH = 1024
DEVICE_TYPES = ("cpu", "cuda", "mps")
# The reference's README commands (w = 4, K = 1000 at the 5 noisiest timesteps then 8, clipping
# at 3.0; a per-model script may change the clipping, e.g. 2.0 for ViT-H/14).
PAPER = {"optim_forward_guidance": True, "optim_forward_guidance_wt": 4.0,
         "optim_num_steps": [1000, 8], "optim_early_emp_end": 995,
         "optim_grad_clip_threshold": 3.0, "optim_print": True}
# Where the fast preset looks for the public TAESD SD-v1 decoder (madebyollin/taesd,
# taesd_decoder.safetensors); a script may name another (the toy's ships).
TAESD_SD_DECODER = str(shipped("models/taesd/taesd_decoder.safetensors"))
# The fast path (docs/fast-path.md), chosen on the toy benchmark's tuning targets: the paper's
# guidance on 38 respaced timesteps, K = 4 at the noisiest (>= 900) and 1 after, below timestep
# 500 every third timestep guided and the others one UNet step; the gradient with respect to
# ẑ0, without the second decode, through a tiny decoder.
FAST = {**PAPER, "optim_print": False, "optim_timesteps": 38, "optim_num_steps": [4, 1],
        "optim_early_emp_end": 900, "guidance_stride": 3, "stride_below": 500,
        "skip_guided_decode": True, "guidance_gradient": "z0", "gradient_decoder": TAESD_SD_DECODER}
# The hybrid decoder (docs/trained-decoder.md): the paper's forward guidance on a short schedule,
# the trained decoder as the denoiser. Chosen on the toy benchmark; `--decoder hybrid` applies it
# when no --preset is given.
HYBRID = {**PAPER, "optim_print": False, "optim_timesteps": 60, "optim_num_steps": [1],
          "optim_early_emp_end": -1, "decoder": "hybrid"}
PRESETS = {"paper": PAPER, "fast": FAST, "hybrid": HYBRID}
# Flags the reference parses but never uses (so never accepted here).
DROPPED_REFERENCE_FLAGS = (
    "--laion400m", "--fixed_code", "--ddim_eta", "--n_iter", "--C", "--f", "--n_samples", "--steps",
    "--mode", "--epochs", "--save_image_folder", "--optim_mask_type", "--optim_original_conditioning",
    "--optim_do_forward_guidance_norm", "--optim_tv_loss", "--optim_warm_start", "--optim_aug",
    "--optim_mask_fraction", "--text", "--text_type", "--batches",
)


# How a flag enters the resume fingerprint (ldm/run_folder/fingerprint.py): its value, or the
# identity of what it names; "file if set" flags are absent while unset (they came later).
FINGERPRINTS = {"value": "value_entry", "weights": "weights_entry", "config": "config_entry",
                "file": "checkpoint_entry", "file if set": "checkpoint_entry"}


def option(help: str, default=None, *, group: str = "general", setting: str | None = None,
           fingerprint: str | None = None, metric: str | None = None, shown: str | None = None,
           **argparse_kwargs):
    """A field of the table: `fingerprint` one of FINGERPRINTS (or None: not in it); `metric`
    where metrics.json records it ("section.key" or "key"); `shown` is how --help shows a
    default that needs words."""
    meta = {"help": help, "group": group, "setting": setting, "fingerprint": fingerprint,
            "metric": metric, "shown": shown, "argparse": argparse_kwargs}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def flag(name: str) -> str:
    return f"--{name}"


@dataclass
class RunOptions:
    # --- targets, model, output ------------------------------------------------------------
    prompt: list[str] = option(
        "targets: image paths, folders of images, feature files (.npy .pt .safetensors), feature "
        "arithmetic such as 'image(\"a.jpg\") + 0.5 * (text(\"a dog\") - text(\"a cat\"))', or "
        "text prompts (text needs a text tower, e.g. CLIP); several targets are decoded in "
        "batches, one subfolder each", [str(shipped("data/examples/chelsea.jpg"))], nargs="+")
    prompt_file: str | None = option("a text file with one more target per line (# comments)")
    batch_size: int = option("targets decoded together (a target's result does not depend on "
                             "its batch mates)", 4, type=int)
    H: int = option("image height in pixels", 512, type=int, fingerprint="value")
    W: int = option("image width in pixels", 512, type=int, fingerprint="value")
    config: str = option("latent diffusion model config (YAML)", DEFAULT_CONFIG, fingerprint="config",
                         metric="model.config")
    ckpt: str = option("latent diffusion checkpoint (.ckpt or .safetensors), or a diffusers folder of SD v1 "
                       "(then no --config; docs/installation.md)", DEFAULT_CKPT, fingerprint="file",
                       metric="model.ckpt")
    seed: int = option("random seed (the same seed on the same device and thread count gives "
                       "the same images)", 42, type=int, fingerprint="value", metric="seed")
    device: str | None = option("torch device: cpu, cuda, cuda:N or mps", shown="cuda when available, else cpu")
    threads: int | None = option("CPU threads of torch (on a loaded machine 1 is often much faster "
                                 "than the default)", type=int, shown="torch's default")
    extractor_weights: str | None = option(
        "weights of the target model: a pretrained tag of its library (IMAGENET1K_V2, a1_in1k, "
        "laion2b_s34b_b79k), a local file, or \"random\" (timing only)", fingerprint="weights",
        shown="the paper's weights, or the library's default, from its download cache")
    weights_tag: str | None = option(
        "the pretrained tag a local --extractor_weights file holds (e.g. IMAGENET1K_V1), so that "
        "it gets that tag's preprocessing; torchvision's own file names are recognised without it",
        fingerprint="value",
        shown="the tag of the file's name, or the library's default")
    overwrite: bool = option("start again in a folder that holds a finished or interrupted run (its "
                             "outputs are replaced once the new run has loaded)", False, action="store_true")
    resume: bool = option("continue the interrupted run in --optim_folder from its resume state "
                          "(same flags)", False, action="store_true")
    save_every: int | None = option("write the resume state every N guided iterations", type=int,
                                    shown="5%% of the run's iterations")
    no_progress: bool = option("no progress bar", False, action="store_true")
    preset: str | None = option("settings of a preset (flags given still win): paper = the paper's "
                                "README commands; fast = the paper's guidance at a tenth of the compute "
                                "(docs/fast-path.md); hybrid = --decoder hybrid with its schedule",
                                choices=tuple(PRESETS), shown="none")
    # --- the decoder -------------------------------------------------------------------------
    decoder: str = option(
        "guided: the paper's guided sampler; featinv: a trained FeatInv decoder sampled by DDIM, no "
        "extractor gradient (needs --featinv_decoder); hybrid: the guided sampler with the trained "
        "decoder as its denoiser (without --preset: the hybrid preset's schedule; docs/trained-decoder.md)",
        "guided", choices=DECODER_KINDS, group="decoder")   # the live registry
    featinv_decoder: str | None = option(
        "the trained decoder of --decoder featinv/hybrid (.safetensors of scripts/train_featinv.py); "
        "it steers the model of --config/--ckpt", group="decoder",
        shown="the script's (the toy ships one per extractor), else none")
    featinv_steps: int = option("DDIM steps of --decoder featinv", 50, type=int, group="decoder")
    featinv_guidance: float = option(
        "classifier-free guidance scale of the trained decoder: over the prompt for a text-conditioned "
        "base (FeatInv: 1.75), over the hint for an unconditional one (the toy: 5)", 1.75, type=float,
        group="decoder")
    # --- feature and loss ------------------------------------------------------------------
    layer: str | None = option("decode the output of this submodule of the target model instead of "
                               "its final embedding (e.g. layer3); a wrong name lists the valid ones",
                               group="feature and loss")
    spatial: bool = option("keep the layer's spatial map (C x H x W, compared position by position) "
                           "instead of pooling it to a vector", False, action="store_true",
                           group="feature and loss", fingerprint="value", metric="objective.spatial")
    channels: str | None = option("compare only these channels (dimension 1 of the feature): e.g. "
                                  "0:64,100", group="feature and loss", fingerprint="value", shown="all", metric="objective.channels")
    loss: str = option("squared Euclidean distance (the reference) or 1 - cosine similarity",
                       "squared", choices=LOSSES, group="feature and loss", fingerprint="value", metric="objective.loss")
    # --- speed -----------------------------------------------------------------------------
    precision: str = option("autocast precision of the UNet, decoder and target model (fp32 "
                            "reproduces the reference; bf16 is the fast choice on recent GPUs)",
                            "fp32", choices=PRECISION_NAMES, group="speed", fingerprint="value",
                            metric="precision")
    compile: bool = option("torch.compile the networks (pays off on long GPU runs)", False,
                           action="store_true", group="speed", metric="speed.compile")
    grad_checkpoint: bool = option("recompute activations in the backward pass: less memory, about "
                                   "30%% slower", False, action="store_true", group="speed", metric="speed.grad_checkpoint")
    # --- the fast path (docs/fast-path.md; off by default: the reference's numbers) -------------
    skip_guided_decode: bool = option(
        "do not decode the guided estimate at every iteration only to score it: the scores and the "
        "best image come from the estimate the gradient is taken at (the guided estimate is still "
        "decoded where an image is written and at the last iteration)", False, action="store_true",
        group="fast path", setting="skip_guided_decode")
    guidance_gradient: str = option(
        "unet: the gradient with respect to the noisy latent, through the UNet (the reference); z0: "
        "with respect to the estimate of z0, mapped to the noise by the DDPM relation (no UNet "
        "backward pass)", "unet", choices=GRADIENTS, group="fast path", setting="gradient")
    sampler_step: str = option(
        "the step from the guided estimate to the next timestep: ancestral (the reference's DDPM step) "
        "or ddim (deterministic, η = 0)", "ancestral", choices=SAMPLER_STEPS, group="fast path",
        setting="step")
    guidance_stride: int = option(
        "below --stride_below, guide every n-th visited timestep (counted from the last, which is "
        "always guided); the others take one unguided step (a UNet forward pass only)", 1, type=int,
        group="fast path", setting="guidance_stride")
    stride_below: int | None = option(
        "the timestep below which --guidance_stride applies", type=int, group="fast path",
        shown="everywhere", setting="stride_below")
    gradient_decoder: str | None = option(
        "a tiny decoder (TAESD layout, .safetensors or .pth) that carries the guidance gradient instead "
        "of the full first-stage decoder; the full decoder still renders every image that is kept "
        "('none': the full decoder, e.g. to run --preset fast without the file)",
        group="fast path", shown="the first stage's decoder", fingerprint="file if set")
    # --- guidance (the reference's --optim_* flags) ------------------------------------------
    optim_forward_guidance: bool = option("turn on forward guidance (without it the samples are "
                                          "unguided)", False, action="store_true", group="guidance",
                                          setting="forward_guidance")
    optim_forward_guidance_wt: float = option("guidance weight w_g", 5.0, type=float, group="guidance",
                                              setting="forward_guidance_wt")
    optim_grad_clip_threshold: float = option("clip the rescaled gradient to mean ± thr·std (off "
                                              "when <= 0)", -1.0, type=float, group="guidance",
                                              setting="grad_clip_threshold")
    optim_num_steps: list[int] = option("self-recurrences K: the first value for timesteps >= "
                                        "--optim_early_emp_end, the second (if given) after", [1],
                                        type=int, nargs="+", group="guidance", setting="num_steps")
    optim_early_emp_end: int = option("early-step-emphasis boundary E, a timestep index (-1: the "
                                      "first K everywhere)", -1, type=int, group="guidance",
                                      setting="early_emp_end")
    optim_backward_guidance: bool = option("turn on backward guidance (Adam on z0)", False,
                                           action="store_true", group="guidance",
                                           setting="backward_guidance")
    optim_lr: float = option("backward guidance: Adam learning rate", 1e-2, type=float,
                             group="guidance", setting="lr")
    optim_max_iters: int = option("backward guidance: Adam iterations", 1, type=int, group="guidance",
                                  setting="max_iters")
    optim_loss_cutoff: float = option("backward guidance: stop below this distance", 1e-5, type=float,
                                      group="guidance", setting="loss_cutoff")
    optim_avg_sim_to_start_backward: float = option(
        "backward guidance starts once the moving-average distance is below this", 0.1, type=float,
        group="guidance", setting="avg_sim_to_start_backward")
    optim_sim_queue_size: int = option("length of that moving average", 80, type=int, group="guidance",
                                       setting="sim_queue_size")
    optim_select_prev: bool = option("keep the best z_{t-1} candidate", False, action="store_true",
                                     group="guidance", setting="select_prev")
    optim_timesteps: int | None = option("respaced schedule: visit this many of the model's timesteps, "
                                         "evenly spaced", type=int, group="guidance", setting="timesteps",
                                         shown="all of them (1000 for SD), as in the reference")
    optim_print: bool = option("save intermediate images every 10 timesteps", False, action="store_true",
                               group="guidance", setting="save_intermediates")
    optim_folder: str = option("output folder (parents are created)", "./results/", group="guidance")
    # --- added by the script ---------------------------------------------------------------
    extractor: str | None = option("target model: library:model[@layer], e.g. torchvision:resnet50, "
                                   "torchvision:resnet50@layer3, open_clip:RN50, timm:convnext_tiny")

    def __post_init__(self):
        if self.gradient_decoder == "none":
            self.gradient_decoder = None

    def settings(self) -> GuidanceSettings:
        """The sampler's settings; a bad value raises SettingError naming its flag."""
        from ldm.models.diffusion.feature_guidance import GuidanceSettings
        values = {f.metadata["setting"]: getattr(self, f.name) for f in fields(self) if f.metadata["setting"]}
        values["num_steps"] = tuple(values["num_steps"])
        try:
            return GuidanceSettings(**values)
        except SettingError as err:
            raise SettingError(flag(SETTING_FLAGS[err.parameter]), err.problem) from None

    def check(self) -> None:
        """The checks that need nothing but the flags (SettingError naming the flag)."""
        counts = {"batch_size": (1, MAX_BATCH), "save_every": (1, 10 ** 12), "threads": (1, 4096),
                  "seed": (0, MAX_SEED), "H": (1, 8192), "W": (1, 8192)}
        for name, (low, high) in counts.items():
            value = getattr(self, name)
            if value is not None and not low <= value <= high:
                raise SettingError(flag(name), f"{value} is not from {low} to {high:,}")
        if self.channels is not None:
            from ldm.objectives import parse_channels
            try:
                parse_channels(self.channels)
            except ValueError as err:
                raise SettingError("--channels", str(err)) from None
        if self.resume and self.overwrite:
            raise SettingError("--resume", "continues the run in --optim_folder and --overwrite "
                               "deletes it: give one of them")
        if not 1 <= self.featinv_steps <= 1000:
            raise SettingError("--featinv_steps", f"{self.featinv_steps} is not from 1 to 1,000")
        if not math.isfinite(self.featinv_guidance) or self.featinv_guidance < 0:
            raise SettingError("--featinv_guidance", f"{self.featinv_guidance} is not a finite number >= 0")
        if decoder_kind(self.decoder).needs_file and not self.featinv_decoder:
            raise SettingError("--featinv_decoder", f"--decoder {self.decoder} needs a trained decoder: "
                               "give --featinv_decoder FILE (train one with scripts/train_featinv.py)")
        if self.device is not None and self.device.partition(":")[0] not in DEVICE_TYPES:
            raise SettingError("--device", f"{self.device!r} is not one of {', '.join(DEVICE_TYPES)} "
                               "(cuda:N for a GPU by number)")
        self.settings()

    def metrics(self) -> dict:
        """metrics.json's record of the options (each field's `metric` place, in table order)."""
        record: dict = {}
        for f in fields(self):
            if f.metadata["metric"]:
                section, _, key = f.metadata["metric"].rpartition(".")
                (record.setdefault(section, {}) if section else record)[key] = getattr(self, f.name)
        return record

    def decoder_options(self) -> DecoderOptions:
        return DecoderOptions(self.decoder, self.featinv_decoder, self.featinv_steps, self.featinv_guidance,
                              self.extractor_weights)

    def fingerprinted(self) -> dict:
        """{flag: fingerprint entry} of the flags that enter the fingerprint besides the settings."""
        from ldm.run_folder import fingerprint as fp

        entries = {}
        for f in fields(self):
            kind, value = f.metadata["fingerprint"], getattr(self, f.name)
            if kind and not (kind == "file if set" and value is None):
                entries[flag(f.name)] = getattr(fp, FINGERPRINTS[kind])(value)
        return entries

    def namespace(self) -> argparse.Namespace:
        """The options as the reference printed them ("Run options: Namespace(...)")."""
        return argparse.Namespace(**asdict(self))


SETTING_FLAGS = {f.metadata["setting"]: f.name for f in fields(RunOptions) if f.metadata["setting"]}


def preset_options(name: str, script_presets: dict | None = None, defaults: dict | None = None) -> RunOptions:
    """The options of preset `name` (with a script's changes to it) over a script's `defaults`
    over the table's, as the command line resolves them."""
    return RunOptions(**{**(defaults or {}), **PRESETS[name], **(script_presets or {}).get(name, {})})


def flags_markdown() -> str:
    """docs/flags.md's table: every flag of the table, by group, with its default and help."""
    lines = ["| flag | default | meaning | resume fingerprint |", "|---|---|---|---|"]
    for f in fields(RunOptions):
        default = f.default if f.default is not MISSING else f.default_factory()
        shown = f.metadata["shown"] or (" ".join(map(str, default)) if isinstance(default, list) else default)
        shown = "off" if f.metadata["argparse"].get("action") == "store_true" else shown
        # shipped files relative to the repository; "%%" is argparse's escape of "%"
        shown = str(shown).removeprefix(f"{ROOT}/").replace("%%", "%") if shown is not None else None
        help_ = f.metadata["help"].replace("%%", "%").replace("|", "\\|")
        fingerprinted = "yes" if f.metadata["fingerprint"] or f.metadata["setting"] else ""
        lines.append(f"| `--{f.name}` | {shown if shown is not None else 'none'} | {help_} | {fingerprinted} |")
    lines.append("| `--paper` | | short for `--preset paper` | |")
    return "\n".join(lines) + "\n"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        dropped = [f for f in DROPPED_REFERENCE_FLAGS if f in message.split()]
        if dropped:
            message += (f" ({', '.join(dropped)}: the reference parses these but never uses them, "
                        "so this tool does not take them; leave them out)")
        super().error(message)


def _help(f, default) -> str:
    if f.metadata["argparse"].get("action") == "store_true":
        return f.metadata["help"]
    words = f.metadata["shown"] and default == f.default   # a script's own default shows as is
    shown = f.metadata["shown"] if default is None or words else default
    shown = " ".join(map(str, shown)) if isinstance(shown, list) else shown
    return f"{f.metadata['help']} (default: {shown if shown is not None else 'none'})"


def build_parser(description: str, defaults: dict | None = None, *, extractor: dict | str | None = None
                 ) -> argparse.ArgumentParser:
    """The parser of a script: every field of `RunOptions` (the --extractor flag only when
    `extractor` is a dict of choices, or "any" for a registry name), with `defaults` (a
    script's own) replacing the table's."""
    parser = _Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {}
    defaults = defaults or {}
    for f in fields(RunOptions):
        if f.name == "extractor" and extractor is None:
            continue
        default = defaults.get(f.name, f.default if f.default is not MISSING else f.default_factory())
        group = groups.get(f.metadata["group"])
        if group is None:
            group = groups[f.metadata["group"]] = (parser if f.metadata["group"] == "general"
                                                    else parser.add_argument_group(f.metadata["group"]))
        kwargs = dict(f.metadata["argparse"])
        if f.name == "extractor" and isinstance(extractor, dict):
            kwargs["choices"], default = list(extractor), next(iter(extractor))
        elif f.name == "extractor":
            kwargs["required"] = True
        group.add_argument(flag(f.name), dest=f.name, default=default, help=_help(f, default), **kwargs)
    parser.add_argument("--paper", dest="preset", action="store_const", const="paper",
                        help="short for --preset paper")
    return parser


def parse_options(parser: argparse.ArgumentParser, argv: list[str], presets: dict | None = None
                  ) -> RunOptions:
    """RunOptions from the command line: a preset's values replace the defaults, then the flags
    given replace those (argparse exits with 2 and a usage message for malformed flags)."""
    first = parser.parse_args(argv)
    preset = first.preset or decoder_kind(first.decoder).default_preset
    if preset:
        parser.set_defaults(**{**PRESETS[preset], **(presets or {}).get(preset, {})})
        first = parser.parse_args(argv)
    values = {f.name: getattr(first, f.name, None) for f in fields(RunOptions)}
    return RunOptions(**values)
