"""A command-line run after parsing: every check that can run before a model loads, the targets'
folders planned and taken, the models loaded, the batches decoded. Under `torchrun`, each
process decodes its share of the targets (ldm/sharding.py)."""
from __future__ import annotations

import hashlib
import json
import shlex
import sys
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from ldm.api import FeatureDecoder, load_decoder_models, unguided_warning
from ldm.checkpoint import CheckpointNotFoundError
from ldm.decoders import DecoderKind, make_decoding
from ldm.cli.batch import BatchRun, Job, RunContext, RunStopped
from ldm.cli.options import SETTING_FLAGS, TAESD_SD_DECODER, RunOptions, flag
from ldm.cli.signals import StopOnSignals
from ldm.errors import InputError, SettingError
from ldm.extractors import (FeatureExtractor, build_extractor, check_spec, parse_spec,
                            register_extractor)
from ldm.extractors.weights import weights_kind
from ldm.files import check_path_name, not_a_file
from ldm.models.diffusion.feature_guidance import GuidanceSettings, check_state
from ldm.models.loading import config_source, image_multiple, load_config
from ldm.performance import prepare
from ldm.run_folder import RunFolder, RunStateError, fingerprint as fp, names, peek_run
from ldm.run_folder.metrics import write_index
from ldm.run_folder.state_file import run_problems
from ldm.sharding import Shard, barrier, current_shard, from_rank0, gather, init_group, leave_group
from ldm.targets import Target, TargetError, expand_targets, read_image, read_target_list


class UsageError(InputError):
    """A problem with the command line or its inputs; printed without a traceback."""


@dataclass
class ExtractorSource:
    """The target model of a run, known before it is built."""

    name: str
    build: object               # device → FeatureExtractor
    supports_text: bool

    @classmethod
    def of(cls, extractor, options: RunOptions) -> "ExtractorSource":
        """A registry name or a script's own class (registered under its name), checked on the
        meta device (nothing read or loaded) where the model can be built there."""
        spec = extractor if isinstance(extractor, str) else register_extractor()(extractor).name
        if options.layer:
            if "@" in spec:
                raise UsageError(f"--layer {options.layer!r}: the extractor {spec!r} already names a layer")
            spec = f"{spec}@{options.layer}"
        check_spec(spec, options.spatial)
        return cls(spec, lambda device: build_extractor(
            spec, weights=options.extractor_weights, weights_tag=options.weights_tag,
            device=device, spatial=options.spatial), parse_spec(spec).supports_text)


def pick_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except Exception as err:  # RuntimeError, AssertionError ("not compiled with CUDA"), ...
        raise UsageError(f"--device {name!r} is not available here: {str(err).splitlines()[0]}") from None
    return device


def target_list(options: RunOptions, text_only: bool) -> list[Target]:
    """The targets, every image among them readable (before any model loads); warnings (a
    caption read as text rather than an expression) are printed."""
    specs = [options.prompt] if isinstance(options.prompt, str) else list(options.prompt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if options.prompt_file:
                specs += read_target_list(options.prompt_file)
            targets = expand_targets(specs, text_only)
            for target in targets:
                for kind, source in target.leaves():
                    if kind == "image":
                        read_image(source)
        except TargetError as err:
            raise UsageError(f"--prompt {err}") from None
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    return targets


def _missing_gradient_decoder(options: RunOptions) -> str:
    where = f"--gradient_decoder {options.gradient_decoder!r}: {not_a_file(options.gradient_decoder)}"
    if options.preset == "fast":
        where += " (--preset fast carries the guidance gradient through this tiny decoder)"
    return (f"{where}. SD v1's is taesd_decoder.safetensors of https://github.com/madebyollin/taesd "
            f"(put it at {TAESD_SD_DECODER} or give --gradient_decoder FILE); the toy's ships as "
            "models/toy/taesd_decoder.safetensors; --gradient_decoder none runs with the full decoder")


def check_model_files(options: RunOptions, settings: GuidanceSettings, ckpt_hint: str) -> tuple:
    """The config read (as data) and checked against the flags, the weight files present;
    → (the latent shape of one image (channels, h, w), the visited timesteps)."""
    config = load_config(config_source(options.config, options.ckpt))
    first_stage, whole = image_multiple(config)
    for name in ("H", "W"):
        value = getattr(options, name)
        if value % whole:
            raise UsageError(f"--{name} {value} must be a multiple of {whole} (the first stage "
                             f"down-samples by {first_stage}, the UNet by {whole // first_stage} more): "
                             f"e.g. {max(whole, value // whole * whole)}")
    num_timesteps = int(config.model.params.get("timesteps", 1000))
    try:
        settings.check_for(num_timesteps)
    except SettingError as err:
        raise SettingError(flag(SETTING_FLAGS[err.parameter]), err.problem) from None
    if not Path(options.ckpt).exists():
        raise CheckpointNotFoundError(ckpt_hint.format(path=options.ckpt))
    weights = options.extractor_weights
    if weights_kind(weights) == "file" and not_a_file(weights):
        raise UsageError(f"--extractor_weights {weights!r}: {not_a_file(weights)}")
    if options.gradient_decoder and not_a_file(options.gradient_decoder):
        raise UsageError(_missing_gradient_decoder(options))
    latent = (int(config.model.params.get("channels", 4)), options.H // first_stage, options.W // first_stage)
    return latent, settings.schedule(num_timesteps)


def check_decoding(options: RunOptions, source: ExtractorSource) -> DecoderKind:
    """The decoder of --decoder, its files checked for the run's target model (a trained
    decoder's record: its safetensors metadata only)."""
    decoding = make_decoding(options.decoder_options())
    try:
        decoding.check(source.name)
    except FileNotFoundError as err:
        raise UsageError(f"--featinv_decoder {err}") from None
    except ValueError as err:
        raise UsageError(f"--featinv_decoder: {err}") from None
    return decoding


def resume_command(argv: list[str]) -> str:
    given = lambda a, name: len(a) > 3 and a.startswith("--") and name.startswith(a)  # noqa: E731
    args = [a for a in argv if not given(a, "--overwrite")]
    if not any(given(a, "--resume") for a in args):
        args.append("--resume")
    return shlex.join(["python", sys.argv[0], *args])


@dataclass
class Plan:
    """What a command-line run knows before any model loads, every input checked."""

    options: RunOptions
    settings: GuidanceSettings
    device: torch.device
    source: ExtractorSource
    decoding: DecoderKind
    targets: list[Target]
    latent: tuple                 # one image's latent shape (channels, h, w)
    timesteps: list[int]          # the visited schedule
    argv: list[str]
    ckpt_hint: str
    resume_command: str
    shard: Shard

    @property
    def single(self) -> bool:
        return len(self.targets) == 1

    @property
    def prefix(self) -> str:
        return self.shard.prefix()


def make_plan(extractor, options: RunOptions, *, text_only: bool, ckpt_hint: str, argv: list[str],
              resume_hint: str | None = None) -> Plan:
    """Every check that can run before a model loads: flags, device, target model and layer
    (on the meta device), targets, config, weight files."""
    options.check()
    check_path_name(options.optim_folder, "--optim_folder")
    settings = options.settings()
    if options.threads:
        torch.set_num_threads(options.threads)
    try:
        shard = current_shard()
    except ValueError as err:
        raise UsageError(str(err)) from None
    device = pick_device(shard.device(options.device))
    source = ExtractorSource.of(extractor, options)
    targets = target_list(options, text_only)
    text = next((s for t in targets for kind, s in t.leaves() if kind == "text"), None)
    if text is not None and not source.supports_text:
        raise UsageError(f"--prompt {text!r} is not an image file, and {source.name} supports image "
                         "targets only (text targets need a text tower, e.g. scripts/clip_guided2.py)")
    latent, timesteps = check_model_files(options, settings, ckpt_hint)
    decoding = check_decoding(options, source)
    if decoding.guided and unguided_warning(settings):
        print(f"note: {unguided_warning(settings)}", file=sys.stderr)
    return Plan(options, settings, device, source, decoding, targets, latent, timesteps, argv, ckpt_hint,
                resume_hint or resume_command(argv), shard)


def run(extractor, options: RunOptions, *, text_only: bool = False, ckpt_hint: str,
        argv: list[str], resume_hint: str | None = None) -> list[dict]:
    """Everything after parsing: → the metrics of each target decoded by this process. Raises
    `RunStopped` after saving an interrupted run (signal or numerical fault). `resume_hint`:
    the command that continues the run, when it is not this one with --resume."""
    plan = make_plan(extractor, options, text_only=text_only, ckpt_hint=ckpt_hint, argv=argv,
                     resume_hint=resume_hint)
    root = Path(options.optim_folder)
    created_group = init_group(plan.shard, plan.device)
    try:
        if plan.shard.distributed:
            _check_same_targets(plan.shard, plan.targets)
        metrics = _run_jobs(plan, _my_jobs(plan.shard, plan.targets, root, options))
        barrier(plan.shard)
        if not plan.single and plan.shard.rank == 0:
            write_index(root, plan.targets)
        return metrics
    finally:
        leave_group(created_group)


def _check_same_targets(shard: Shard, targets: list[Target]) -> None:
    digest = hashlib.sha256(json.dumps([[t.kind, t.source] for t in targets]).encode()).hexdigest()
    digests = gather(shard, digest)
    different = [rank for rank, d in enumerate(digests) if d != digests[0]]
    if different:
        raise UsageError(f"processes {different} of this torchrun job see other targets than process 0 "
                         "(different working directory, files or flags?)")


def _my_jobs(shard: Shard, targets: list[Target], root: Path, options: RunOptions) -> list[Job]:
    """This process's targets left to do. One target: the folder is --optim_folder itself (the
    reference's layout); several: a subfolder each, finished ones skipped (a rerun does what is
    left), every other one's folder status checked up front."""
    if len(targets) == 1:
        if (root / names.INDEX).is_file():
            raise UsageError(f"{root} holds a run of several targets ({names.INDEX}); a single target "
                             "would mix its files into that folder: give it its own --optim_folder, or "
                             "add it to the study's --prompt list")
        return [Job(targets[0], RunFolder(root), "")]
    if RunFolder(root).status()[0] != "new":
        raise UsageError(f"{root} holds the run of a single target ({RunFolder(root).status()[1]}); "
                         "several targets would mix their folders into it: choose another --optim_folder")
    jobs, skipped, blocked = [], [], []
    for target in targets:
        folder = RunFolder(root / target.label, subfolder=True)
        status, detail = folder.status()
        if status == "finished" and not options.overwrite:
            skipped.append(target.label)
        else:
            if status == "interrupted" and not (options.resume or options.overwrite):
                blocked.append(f"{folder.path} ({detail})")
            jobs.append(Job(target, folder, status))
    if blocked:
        raise UsageError("interrupted runs of these targets: " + ", ".join(blocked) + "; pass --resume "
                         "to continue them (finished targets are skipped) or --overwrite to start again")
    labels = from_rank0(shard, [job.target.label for job in jobs])
    by_label = {job.target.label: job for job in jobs}
    if skipped:
        print(f"{shard.prefix()}skipping {len(skipped)} finished target(s) in {root} (pass --overwrite "
              f"to decode them again): {', '.join(skipped)}")
    return [by_label[label] for label in shard.take(labels) if label in by_label]


def _fingerprint(plan: Plan, job: Job) -> dict:
    """Every setting (by its flag), the fingerprinted flags, the target and the model files."""
    options, settings = plan.options, plan.settings
    entries = {}
    defaults = GuidanceSettings()
    for f in fields(GuidanceSettings):
        value = getattr(settings, f.name)
        listed = list(value) if isinstance(value, tuple) else value
        name = flag(SETTING_FLAGS[f.name]) if f.name in SETTING_FLAGS else "the intermediate-image interval"
        entries[name] = fp.entry(listed, " ".join(map(str, listed)) if isinstance(listed, list) else None,
                                 default=value == getattr(defaults, f.name))
    entries.update(options.fingerprinted())
    entries["--device"] = fp.entry(plan.device.type)
    files = [s for kind, s in job.target.leaves() if kind in ("image", "features")]
    entries["the target (--prompt)"] = fp.target_entry(job.target.kind, job.target.source, files)
    entries["the target model"] = fp.entry(plan.source.name)
    for name, value in plan.decoding.fingerprinted().items():   # likewise for the trained decoders
        entries[flag(name)] = fp.checkpoint_entry(str(value)) if isinstance(value, Path) else fp.entry(value)
    return entries


def _take_folder(job: Job, options: RunOptions, single: bool) -> None:
    """Check the job's folder against the flags, create it and lock it. An interrupted
    --overwrite's set-aside outputs come back first."""
    folder, resume = job.folder, options.resume and (single or job.status == "interrupted")
    folder.check_writable_names()
    job.created = folder.create()
    folder.lock()
    folder.restore_set_aside()
    status, detail = folder.status()
    if status == "partial" and not options.overwrite:
        raise UsageError(f"{folder.path} holds {detail}; pass --overwrite to replace them, or choose "
                         "another --optim_folder")
    if status == "finished" and not options.overwrite:
        raise UsageError(f"the run in {folder.path} is finished ({detail}); there is nothing to resume "
                         "(pass --overwrite instead of --resume to run it again)" if resume else
                         f"{folder.path} already holds a finished run ({detail}); choose another "
                         "--optim_folder or pass --overwrite")
    if status == "interrupted" and not (options.overwrite or resume):
        raise UsageError(f"{folder.path} holds an interrupted run ({detail}{_stopped_at(folder)}); pass "
                         "--resume to continue it or --overwrite to start again")
    if status == "new" and resume:
        raise UsageError(f"no resume state in {folder.path} ({names.STATE} does not exist): nothing "
                         "to resume; run without --resume to start")
    job.status = status


def _stopped_at(folder: RunFolder) -> str:
    try:
        sampler = peek_run(folder / names.STATE)["sampler"]
        return f", stopped at timestep {sampler['timestep']} after {sampler['iterations']} iterations"
    except (OSError, RunStateError, KeyError, TypeError):
        return ""


def _load_resume_state(job: Job, plan: Plan) -> None:
    """The job's resume state, validated in full before anything in its folder changes."""
    where = "" if plan.single else f" {job.folder.path}"
    again = " (pass --overwrite instead of --resume to start again)"
    try:
        state, saved = job.folder.read_state()
    except RunStateError as err:
        raise UsageError(f"cannot resume{where}: {err}{again}") from None
    if run_problems(saved):
        raise UsageError(f"cannot resume{where}: {names.STATE} is a damaged resume state: "
                         + "; ".join(run_problems(saved)) + again)
    differences = fp.differences(saved.get("fingerprint") or {}, job.fingerprint)
    if differences:
        raise UsageError(f"cannot resume{where}: " + "; ".join(differences) + " (resume with the "
                         "original flags, or pass --overwrite instead of --resume to start again)")
    try:
        check_state(state, plan.settings, plan.timesteps, (1, *plan.latent))
    except ValueError as err:
        raise UsageError(f"cannot resume{where}: {err}{again}") from None
    if saved["log_bytes"] > job.folder.log_length():
        raise UsageError(f"cannot resume{where}: {names.LOG} is shorter than when the resume state "
                         f"was saved (its earlier lines are missing){again}")
    job.state, job.saved = state, saved


def _load_models(plan: Plan, jobs: list[Job]) -> FeatureDecoder:
    """The diffusion model first (a broken checkpoint fails before anything else is built), the
    target model, the targets' features; → the decoder."""
    o = plan.options
    torch.manual_seed(o.seed)
    model, extractor = load_decoder_models(plan.decoding, plan.source.build, o.config, o.ckpt, plan.device,
                                           missing_hint=plan.ckpt_hint)
    model, extractor = prepare(model, extractor, compile=o.compile, grad_checkpoint=o.grad_checkpoint)
    tiny = None
    if o.gradient_decoder:
        from ldm.models.taesd import TinyFirstStage, check_fits, load_taesd_decoder
        tiny = TinyFirstStage(load_taesd_decoder(o.gradient_decoder, device=plan.device))
        check_fits(tiny.decoder.config, model.channels, model.latent_downsample_factor, o.gradient_decoder)
    decoder = FeatureDecoder(model, extractor, plan.settings, loss=o.loss, channels=o.channels,
                             precision=o.precision, gradient_decoder=tiny, decoding=plan.decoding)
    for job in jobs:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")   # e.g. a text prompt truncated to CLIP's 77 tokens
            try:
                job.goal = decoder.features(job.target)
                job.hint = decoder.hint(job.target, job.goal)
            except (TargetError, ValueError) as err:
                raise UsageError(f"--prompt {err}") from None
        for warning in caught:
            print(f"warning: {warning.message}", file=sys.stderr)
    return decoder


def _release(jobs: list[Job], failed: bool) -> None:
    """Unlock every folder taken; a run that failed before writing leaves no empty folder (nor
    the parents it made: the last job's first, so that a shared parent is empty by the end; only
    where it held the folder: two runs may both have seen it missing)."""
    held = [job.folder.unlock() for job in jobs]
    for job, holding in reversed(list(zip(jobs, held))):
        if failed and holding and job.created and [p.name for p in job.folder.path.iterdir()] == [names.LOCK]:
            (job.folder / names.LOCK).unlink()
            for path in job.created:
                if any(path.iterdir()):
                    break
                path.rmdir()


def _run_jobs(plan: Plan, jobs: list[Job]) -> list[dict]:
    """Take the jobs' folders (and their resume states), load the models, decode."""
    if not jobs:
        print(f"{plan.prefix}nothing to decode")
        return []
    failed = True
    try:
        for job in jobs:
            job.fingerprint = _fingerprint(plan, job)
            _take_folder(job, plan.options, plan.single)
            if plan.options.resume and job.status == "interrupted":
                _load_resume_state(job, plan)
        metrics = _decode_all(plan, jobs, _load_models(plan, jobs))
        failed = False
        return metrics
    finally:
        _release(jobs, failed)


def extractor_details(extractor: FeatureExtractor, options: RunOptions) -> dict:
    """metrics.json's record of the target model: its weights (the argument, the resolved tag,
    the file's identity) and the preprocessing its targets and generated images get. Random
    weights record no tag: the tag names only the preprocessing they ran with."""
    weights = options.extractor_weights
    return {"name": extractor.name, "weights": weights,
            "weights_tag": None if weights_kind(weights) == "random" else extractor.weights_tag,
            "weights_file": (fp.quick_file_id(Path(weights)) if weights_kind(weights) == "file"
                             else None),
            "preprocessing": extractor.preprocessing.to_json()}


def _decode_all(plan: Plan, jobs: list[Job], decoder: FeatureDecoder) -> list[dict]:
    """Resumed targets continue in batches of the same position; new ones start together."""
    options = plan.options
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.state.position if job.state is not None else (), []).append(job)
    batches = [group[i:i + options.batch_size] for key in sorted(groups, key=lambda k: k == ())
               for group in [groups[key]] for i in range(0, len(group), options.batch_size)]
    metrics = []
    with StopOnSignals() as stop, ExitStack() as replacing:
        for job in jobs:   # --overwrite: the old outputs go aside now that everything has loaded
            if options.overwrite and job.status != "new":
                replacing.enter_context(job.folder.replacing_outputs(kept=lambda e: isinstance(e, RunStopped) and e.saved))
        ctx = RunContext(options, plan.settings, decoder, plan.device, plan.argv, plan.resume_command,
                         stop, plan.prefix, extractor_details(decoder.extractor, options))
        for n, batch in enumerate(batches):
            if len(batches) > 1:
                print(f"{plan.prefix}batch {n + 1} of {len(batches)}: "
                      f"{', '.join(j.target.label for j in batch)}")
            metrics += BatchRun(batch, ctx).run()
    return metrics
