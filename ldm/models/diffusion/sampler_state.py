"""The guided loop's whole state, and the best image it keeps per target.

`SamplerState` is what the loop advances: at every iteration boundary it is complete, so a
snapshot of it is where a run resumes (bit for bit). Its fields say themselves how a batch of
independent targets splits into one state per target and back (`field(metadata=...)`): rows of
a tensor, items of a list, or shared by the whole batch; `split`, `stack` and the file layout
(`to_parts` / `from_parts`, written by ldm/run_folder) are derived from that, not listed by hand.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

import torch

from ldm.scorelog import STAGE_OFFSETS, Score, decode_rec


@dataclass
class BestImage:
    """The best-scoring x̂0 estimate of one target (highest −distance) and where it was made."""

    score: float = -math.inf
    timestep: int = -1
    recurrence: int = -1
    stage: str = "estimate"
    backward_iteration: int | None = None
    cosine: float = float("nan")
    image: torch.Tensor | None = None   # [3, H, W] in [-1, 1], detached, on the CPU
    latent: torch.Tensor | None = None  # its ẑ0, when a cheap decoder made the image (fast path)

    @classmethod
    def of(cls, score: Score, image: torch.Tensor, latent: torch.Tensor | None = None) -> "BestImage":
        cpu = lambda t: None if t is None else t.detach().float().cpu().clone()  # noqa: E731
        return cls(-score.distance, score.timestep, score.recurrence, score.stage,
                   score.backward_iteration, score.cosine, cpu(image), cpu(latent))

    @property
    def distance(self) -> float:
        return -self.score

    def to_json(self) -> dict:
        """The file's record (the reference's coded self-recurrence "rec" and "bk")."""
        rec = self.recurrence + STAGE_OFFSETS[self.stage] if self.image is not None else -1
        bk = -1 if self.backward_iteration is None else self.backward_iteration
        return {"score": self.score, "t": self.timestep, "rec": rec, "bk": bk,
                "cosine": self.cosine, "has_image": self.image is not None}

    @classmethod
    def from_json(cls, record: dict, image: torch.Tensor | None,
                  latent: torch.Tensor | None = None) -> "BestImage":
        if image is None:
            return cls()
        j, stage = decode_rec(float(record["rec"]))
        bk = None if stage not in ("backward", "backward_iteration") else int(record["bk"])
        return cls(float(record["score"]), int(record["t"]), j, stage, bk, float(record["cosine"]),
                   image, latent)


def _count():
    return field(metadata={"count": True})        # a non-negative int, shared by the batch


def _rows(dtype: torch.dtype, ndim: int, finite: bool, like: str | None = None):
    """A tensor, one row per target, of `dtype` and `ndim` dimensions (or of the shape of the
    field `like`), all finite if `finite`: what a state file's tensor is checked against."""
    return field(metadata={"batch": "rows", "dtype": dtype, "ndim": ndim, "finite": finite, "like": like})


def _items(key: str | None = None):
    return field(metadata={"batch": "items", "key": key})   # a list, one item per target


@dataclass
class SamplerState:
    """The next iteration is self-recurrence `j` of the `k`-th visited timestep (`timestep`).
    Tensors live on the sampler's device, generator states (uint8, `Generator.get_state`) and
    best images on the CPU. A snapshot is never changed afterwards."""

    k: int = _count()
    j: int = _count()
    timestep: int = _count()
    iterations: int = _count()            # iterations done
    history_count: int = _count()         # scores pushed into the moving-average ring buffer
    z: torch.Tensor = _rows(torch.float32, 4, True)        # [B, C, h, w] latent entering iteration (k, j)
    history: torch.Tensor = _rows(torch.float32, 2, True)  # [B, Q] moving-average ring buffer (−distance)
    best_prev_score: torch.Tensor = _rows(torch.float32, 1, False)   # [B] best z_prev candidate score
    do_backward: torch.Tensor = _rows(torch.bool, 1, False)  # [B] the backward-guidance gate of this timestep
    best_prev_z: torch.Tensor | None = _rows(torch.float32, 4, True, like="z")  # its latent (select_prev; None before any)
    best: list[BestImage] = _items()
    guard_events: list[int] = _items()    # guidance steps taken without guidance (zero gradient)
    generator_states: list[torch.Tensor] = _items("generator")

    @property
    def batch(self) -> int:
        return len(self.best)

    @property
    def position(self) -> tuple[int, int, int, int]:
        """Where a state stands; states can be batched together only at the same position."""
        return self.k, self.j, self.iterations, self.history_count

    @classmethod
    def counts(cls) -> list[str]:
        """The fields that are non-negative counts."""
        return [f.name for f in fields(cls) if f.metadata.get("count")]

    def row_checks(self) -> list[tuple]:
        """(name, tensor, dtype, shape with None for any size, finite) of each per-target tensor
        present, from the fields' metadata."""
        checks = []
        for f in fields(self):
            meta, value = f.metadata, getattr(self, f.name)
            if meta.get("batch") == "rows" and value is not None:
                like = meta["like"] and getattr(self, meta["like"])
                shape = tuple(like.shape) if isinstance(like, torch.Tensor) else (self.batch,) + (None,) * (meta["ndim"] - 1)
                checks.append((f.name, value, meta["dtype"], shape, meta["finite"]))
        return checks

    def list_lengths(self) -> dict[str, int]:
        """{field: length} of the per-target lists (each should be the batch size)."""
        return {f.name: len(getattr(self, f.name)) for f in fields(self) if f.metadata.get("batch") == "items"}

    def on(self, device) -> "SamplerState":
        """A copy whose per-target tensors live on `device` (lists copied; best images and
        generator states stay on the CPU)."""
        def moved(f):
            value, kind = getattr(self, f.name), f.metadata.get("batch")
            if kind == "rows":
                return None if value is None else value.to(device).clone()
            return list(value) if kind == "items" else value
        return replace(self, **{f.name: moved(f) for f in fields(self)})

    def snapshot(self, generators: list[torch.Generator]) -> "SamplerState":
        """A copy that nothing changes later, with the generators' states of now."""
        copy = {f.name: _copy(getattr(self, f.name)) for f in fields(self)}
        copy["generator_states"] = [g.get_state() for g in generators]
        return replace(self, **copy)

    def split(self) -> list["SamplerState"]:
        """One state per target (each target's folder keeps its own)."""
        def part(f, b):
            value = getattr(self, f.name)
            kind = f.metadata.get("batch")
            if kind == "rows":
                return None if value is None else value[b:b + 1].clone()
            return [value[b]] if kind == "items" else value
        return [SamplerState(**{f.name: part(f, b) for f in fields(self)}) for b in range(self.batch)]

    @classmethod
    def stack(cls, states: list["SamplerState"]) -> "SamplerState":
        """Per-target states at one position → the batch's state (the inverse of `split`)."""
        if any(s.position != states[0].position for s in states):
            raise ValueError("resume states at different positions cannot be batched together")
        def joined(f):
            values = [getattr(s, f.name) for s in states]
            kind = f.metadata.get("batch")
            if kind == "rows":
                if any(v is None for v in values) != all(v is None for v in values):
                    raise ValueError(f"resume states disagree on {f.name}")
                return None if values[0] is None else torch.cat(values)
            return [x for v in values for x in v] if kind == "items" else values[0]
        return cls(**{f.name: joined(f) for f in fields(cls)})

    def to_parts(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON) as a state file holds them: row tensors by name, list items of
        tensors as "<key>.<b>", best images as "best.<b>.image", everything else in the JSON."""
        cpu = lambda t: t.detach().cpu().contiguous().clone()  # noqa: E731
        tensors, meta = {}, {"batch": self.batch}
        for f in fields(self):
            value, kind = getattr(self, f.name), f.metadata.get("batch")
            if kind == "rows" and value is not None:
                tensors[f.name] = cpu(value)
            elif f.name == "best":
                meta["best"] = [b.to_json() for b in value]
                for b, x in enumerate(value):
                    tensors.update({f"best.{b}.{part}": cpu(t) for part, t in
                                    (("image", x.image), ("latent", x.latent)) if t is not None})
            elif kind == "items" and f.metadata.get("key"):
                tensors.update({f"{f.metadata['key']}.{b}": cpu(v) for b, v in enumerate(value)})
            elif kind != "rows":
                meta[f.name] = value
        return tensors, meta

    @classmethod
    def from_parts(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "SamplerState":
        """The inverse of `to_parts` (KeyError/TypeError/ValueError for an incomplete file).
        Files of format 1 held one guard count for the whole batch: it counts for each."""
        batch = int(meta["batch"])
        values = {}
        for f in fields(cls):
            kind, key = f.metadata.get("batch"), f.metadata.get("key")
            if kind == "rows":
                values[f.name] = tensors[f.name] if f.name != "best_prev_z" else tensors.get(f.name)
            elif f.name == "best":
                values[f.name] = [BestImage.from_json(r, tensors[f"best.{b}.image"] if r["has_image"]
                                                      else None, tensors.get(f"best.{b}.latent"))
                                  for b, r in enumerate(meta["best"])]
            elif key:
                values[f.name] = [tensors[f"{key}.{b}"] for b in range(batch)]
            elif f.name == "guard_events" and not isinstance(meta[f.name], list):
                values[f.name] = [int(meta[f.name])] * batch
            else:
                values[f.name] = meta[f.name]
        return cls(**values)


def _copy(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    return list(value) if isinstance(value, list) else value
