"""One batch of targets decoded by the command line: its log lines, resume states, images and
metrics, written into each target's run folder (ldm/run_folder)."""
from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ldm.api import FeatureDecoder
from ldm.cli.options import RunOptions
from ldm.cli.signals import EXIT_SIGNAL, StopOnSignals
from ldm.models.diffusion.device_checks import NumericalFault
from ldm.models.diffusion.feature_guidance import GuidanceSettings, GuidedResult, SamplingStopped
from ldm.models.diffusion.sampler_state import BestImage, SamplerState
from ldm.models.diffusion.trained_decoding import FeatInvStopped
from ldm.run_folder import RunFolder, RunStateError, names
from ldm.run_folder.metrics import image_entry
from ldm.scorelog import Record, format_line
from ldm.targets import Target

EXIT_NUMERICAL_FAULT = 3


class RunStopped(Exception):
    """The run stopped before finishing (signal or numerical fault) after saving what it had
    (`saved`: False for a FeatInv run, which keeps no resume state); `exit_code` is what the
    process should exit with."""

    def __init__(self, message: str, exit_code: int, saved: bool = True):
        super().__init__(message)
        self.exit_code, self.saved = exit_code, saved


@dataclass
class Job:
    """One target of this process: where it goes and what is known before sampling."""

    target: Target
    folder: RunFolder
    status: str                          # of the folder before this run: new / interrupted / finished
    created: list = field(default_factory=list)   # folders made by this run, deepest first
    fingerprint: dict | None = None
    state: SamplerState | None = None    # its resume state (a batch of one)
    saved: dict | None = None            # the bookkeeping saved with that state
    goal: torch.Tensor | None = None     # target features [1, ...]
    hint: torch.Tensor | None = None     # a trained decoder's hint [1, ...]
    book: dict = field(default_factory=dict)   # argv, options, elapsed, resumes of this run


@dataclass
class RunContext:
    """What every batch of a command-line run shares."""

    options: RunOptions
    settings: GuidanceSettings
    decoder: FeatureDecoder
    device: torch.device
    argv: list[str]
    resume_command: str
    stop: StopOnSignals
    prefix: str
    extractor: dict                      # metrics.json's description of the target model

    @property
    def total(self) -> int:
        return self.decoder.total_iterations

    @property
    def save_every(self) -> int:
        return self.options.save_every or max(1, round(0.05 * self.total))


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("torchvision", "open_clip_torch", "transformers", "timm"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


class BatchRun:
    """Decodes `jobs` together; each target's files go to its own folder."""

    def __init__(self, jobs: list[Job], ctx: RunContext):
        self.jobs, self.ctx = jobs, ctx
        self.start = time.perf_counter()

    # --- bookkeeping ------------------------------------------------------------------------
    def begin(self) -> None:
        """Per target: what the first run recorded, the log cut back to the state, the target
        features written, the log opened."""
        ctx = self.ctx
        for job in self.jobs:
            if job.saved is None:
                job.book = {"argv": ctx.argv, "options": str(ctx.options.namespace()), "elapsed": 0.0,
                            "resumes": []}
            else:
                job.book = {"argv": job.saved["argv"], "options": job.saved["run_options"],
                            "elapsed": job.saved["elapsed_s"],
                            "resumes": [*job.saved["resumes"], {"at_iteration": job.state.iterations,
                                                                 "argv": ctx.argv}]}
                job.folder.truncate_log(job.saved["log_bytes"])
            job.folder.save_features(job.goal, {"kind": job.target.kind, "source": job.target.source})
            job.folder.open_log(append=job.saved is not None)

    def elapsed(self, job: Job) -> float:
        return job.book["elapsed"] + time.perf_counter() - self.start

    def on_record(self, record: Record) -> None:
        self.jobs[record.image].folder.log(format_line(record))

    def on_intermediate(self, b: int, stage: str, i: int, j: int, image: torch.Tensor) -> None:
        self.jobs[b].folder.save_png(names.intermediate(stage, i, j), image)

    def write_state(self, state: SamplerState, reason: str) -> None:
        for job, part in zip(self.jobs, state.split()):
            job.folder.write_state(part, {
                "fingerprint": job.fingerprint, "log_bytes": job.folder.sync_log(),
                "argv": job.book["argv"], "run_options": job.book["options"],
                "elapsed_s": self.elapsed(job), "resumes": job.book["resumes"], "reason": reason,
                "total_iterations": self.ctx.total, "resume_command": self.ctx.resume_command})

    def checkpoint(self, state: SamplerState) -> None:
        """A periodic resume state; a failure to write it (a full disk) is reported, not fatal."""
        try:
            self.write_state(state, "periodic")
        except RunStateError as err:
            print(f"warning: {err}; the run goes on", flush=True)

    # --- metrics ----------------------------------------------------------------------------
    def metrics(self, b: int, finished: bool, iterations: int, guards: int) -> dict:
        ctx, job, o = self.ctx, self.jobs[b], self.ctx.options
        record = {
            "finished": finished,
            "target": {"kind": job.target.kind, "source": job.target.source, "label": job.target.label},
            "extractor": ctx.decoder.extractor.name, "extractor_details": ctx.extractor,
            "feature_shape": list(job.goal.shape[1:]),
            **o.metrics(), "settings": asdict(ctx.settings), "device": str(ctx.device),
            "image_size": [o.H, o.W], "batch_size": len(self.jobs),
            "iterations": iterations, "total_iterations": ctx.total, "wall_time_s": self.elapsed(job),
            "guidance_gradient_guards": guards,
            "decoder": ctx.decoder.decoding.describe(),
            "versions": versions(), "argv": job.book["argv"], "resumes": job.book["resumes"],
        }
        record["speed"]["threads"] = torch.get_num_threads()
        return record

    def best_entries(self, bests: list[BestImage]) -> list[dict | None]:
        """Each target's best image saved and its record (scores: `FeatureDecoder.best_scores`)."""
        goals = torch.cat([job.goal for job in self.jobs])
        entries = []
        for job, best, scores in zip(self.jobs, bests, self.ctx.decoder.best_scores(bests, goals)):
            path = job.folder.save_best(best)
            if path is None:
                entries.append(None)
                continue
            where = best.to_json()
            entries.append(image_entry(path.name, scores["loss"], scores["squared_distance"], scores["cosine"],
                                       self.ctx.decoder.measure_png(path, job.goal),
                                       t=where["t"], rec=where["rec"], bk=where["bk"]))
        return entries

    # --- outcomes ---------------------------------------------------------------------------
    def stopped(self, state: SamplerState, stopped: dict, line: str) -> list[dict]:
        """State, best image so far, a log line and metrics.json (finished: false), per target."""
        self.write_state(state, stopped["reason"])
        bests = self.best_entries(state.best)
        out = []
        for b, job in enumerate(self.jobs):
            job.folder.log(line)
            job.folder.sync_log()
            metrics = self.metrics(b, False, state.iterations, state.guard_events[b])
            metrics.update({
                "stopped": {**stopped, "timestep": state.timestep, "self_recurrence": state.j,
                            "iterations_done": state.iterations},
                "resume_state": names.STATE, "resume_command": self.ctx.resume_command,
                "best": bests[b]})
            job.folder.write_metrics(metrics)
            out.append(metrics)
        return out

    def finished(self, result: GuidedResult) -> list[dict]:
        ctx, out = self.ctx, []
        for job in self.jobs:
            job.folder.log(f"Elapsed time = {self.elapsed(job)} sec")
            job.folder.log(f"Run options: {job.book['options']}")
            job.folder.close_log()
        finals = ctx.decoder.final_scores(result, torch.cat([job.goal for job in self.jobs]))
        bests = self.best_entries(result.best)
        for b, job in enumerate(self.jobs):
            final = job.folder.save_png(names.FINAL, result.final_images[b])
            metrics = self.metrics(b, True, result.iterations, result.guard_events[b])
            f = finals[b]
            metrics["final"] = image_entry(final.name, f["loss"], f["squared_distance"], f["cosine"],
                                           ctx.decoder.measure_png(final, job.goal))
            metrics["best"] = bests[b]
            job.folder.write_metrics(metrics)
            job.folder.finish()
            self.report(job, metrics)
            out.append(metrics)
        return out

    def report(self, job: Job, metrics: dict) -> None:
        label = "" if len(self.jobs) == 1 else f"{job.target.label}: "
        for name, pad in (("final", ""), ("best", " ")):
            if metrics[name] is not None:
                print(f"{self.ctx.prefix}{label}{name}:{pad} squared distance {metrics[name]['squared_distance']:.6g}, "
                      f"cosine {metrics[name]['cosine']:.4f} -> {job.folder.path / metrics[name]['file']}")

    # --- the batch ----------------------------------------------------------------------------
    def announce(self, state: SamplerState | None) -> None:
        ctx, first = self.ctx, self.jobs[0]
        what = (f"{first.target.kind} target {first.target.source!r}" if len(self.jobs) == 1
                else f"{len(self.jobs)} targets")
        kind = ctx.decoder.decoding.label(ctx.settings)
        print(f"{ctx.prefix}{'Resuming' if state else 'Decoding'} {what} with {ctx.decoder.extractor.name}: "
              f"{ctx.total} {kind} iterations on {ctx.device}; outputs in {self.where}")
        if state is not None:
            print(f"{ctx.prefix}resuming before timestep {state.timestep}, self-recurrence {state.j} "
                  f"({state.iterations} of {ctx.total} iterations done)")

    @property
    def where(self) -> Path:
        return self.jobs[0].folder.path if len(self.jobs) == 1 else self.jobs[0].folder.path.parent

    def run(self) -> list[dict]:
        """Decode the batch; → each target's metrics. RunStopped after saving a stopped run."""
        ctx = self.ctx
        state = SamplerState.stack([j.state for j in self.jobs]) if self.jobs[0].state else None
        self.begin()
        self.announce(state)
        self.start = time.perf_counter()
        try:
            result = ctx.decoder.decode_batch(
                torch.cat([job.goal for job in self.jobs]), ctx.options.H, ctx.options.W,
                [ctx.options.seed] * len(self.jobs),
                hints=torch.cat([job.hint for job in self.jobs]) if self.jobs[0].hint is not None else None,
                on_record=self.on_record,
                on_intermediate=self.on_intermediate, progress=not ctx.options.no_progress,
                state=state, on_checkpoint=self.checkpoint, checkpoint_every=ctx.save_every,
                should_stop=ctx.stop)
        except SamplingStopped as stop:
            raise self._signal_stop(stop.state) from None
        except FeatInvStopped as stop:
            raise RunStopped(f"stopped by {ctx.stop.name} after FeatInv DDIM step {stop}; a FeatInv run "
                             "keeps no resume state (it is short): run it again", EXIT_SIGNAL[ctx.stop.signum],
                             saved=False) from None
        except NumericalFault as fault:
            raise self._fault_stop(fault) from None
        return self.finished(result)

    def _signal_stop(self, at: SamplerState) -> RunStopped:
        name = self.ctx.stop.name
        saved = self.stopped(at, {"reason": name}, f"Interrupted by {name} before timestep "
                             f"{at.timestep}, {at.j}th self-recurrence")
        best = (f"best image so far: {saved[0]['best']['file']}, "
                if len(self.jobs) == 1 and saved[0]["best"] else "")
        return RunStopped(
            f"stopped by {name} before timestep {at.timestep}, self-recurrence {at.j} "
            f"({at.iterations} of {self.ctx.total} iterations done). Saved in {self.where}: {best}log.txt, "
            f"metrics.json (finished: false) and {names.STATE}.\nTo resume:\n  {self.ctx.resume_command}",
            EXIT_SIGNAL[self.ctx.stop.signum])

    def _fault_stop(self, fault: NumericalFault) -> RunStopped:
        if fault.state is None:   # FeatInv's sampler: no state to keep
            return RunStopped(f"{fault}: the run was stopped rather than writing images of NaNs "
                              "(is --featinv_guidance too large?)", EXIT_NUMERICAL_FAULT, saved=False)
        saved = self.stopped(fault.state, {"reason": "numerical fault", "stage": fault.stage,
                                           "message": str(fault)}, f"Numerical fault: {fault}")
        best = (f"the best image so far ({saved[0]['best']['file']}), "
                if len(self.jobs) == 1 and saved[0]["best"] else "")
        return RunStopped(
            f"{fault}. The run was stopped rather than writing images of NaNs; kept in {self.where}: "
            f"{best}log.txt, metrics.json (finished: false) and the resume state of the start "
            f"of that iteration ({names.STATE}; `--resume` recomputes that iteration, so on the "
            "same device it will most likely fail the same way).", EXIT_NUMERICAL_FAULT)
