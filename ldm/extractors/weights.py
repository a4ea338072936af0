"""Where the extractors' pretrained weights come from, and what to say when they cannot be had.

Order of resolution (shared by every extractor):

1. `weights=PATH` given (`--extractor_weights PATH`): that file, through the safe loader
   (`ldm.checkpoint.load_state_dict`: never runs pickled code).
2. A copy already in the library's cache (see each `*_source` below for the exact paths): loaded
   through the safe loader as well, without touching the network.
3. The library's own download-and-cache path (torchvision `WeightsEnum.get_state_dict`,
   open_clip's Hugging Face download), but only after a short reachability probe of the file's
   URL (`PROBE_TIMEOUT_S`): the libraries retry for a long time when offline (huggingface_hub
   waited ~50 s here for RN50), and we would rather fail at once with instructions.
4. Otherwise `WeightsNotFoundError`, naming the file, its URL, the path where it is picked up
   automatically and the `--extractor_weights` alternative.
"""
from __future__ import annotations

import os
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch

from ldm.checkpoint import CheckpointError, TorchScriptRefused, load_state_dict

PROBE_TIMEOUT_S = 5.0
WEIGHTS_FLAG = "--extractor_weights"
# Keys OpenAI's TorchScript CLIP archives carry besides the weights (open_clip drops them too).
OPENAI_CLIP_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
_TRUE = {"1", "ON", "YES", "TRUE"}


class WeightsNotFoundError(CheckpointError, FileNotFoundError):
    """Pretrained weights are neither given, nor cached, nor downloadable (e.g. offline)."""


@dataclass
class WeightsSource:
    """One pretrained weights file: what it is, where it comes from and where it is cached."""

    model: str                          # e.g. "torchvision resnet50"
    tag: str                            # e.g. "ResNet50_Weights.IMAGENET1K_V1"
    filename: str                       # the file to get
    url: str                            # where it comes from
    drop_in: Path                       # put the file here and it is picked up automatically
    cached: Callable[[], list[Path]]    # existing cached copies, best first
    download: Callable[[], dict[str, torch.Tensor] | str | os.PathLike]
    offline: Callable[[], str | None] = lambda: None  # a reason not to try the network, or None
    notes: list[str] = field(default_factory=list)

    def explain(self, reason: str) -> str:
        lines = [f"{self.model} weights {self.tag} are not available: {reason}.",
                 f"  File needed: {self.filename}",
                 f"    from {self.url}",
                 "  Put it here and it is picked up automatically:",
                 f"    {self.drop_in}",
                 f"  or pass its path: {WEIGHTS_FLAG} PATH"]
        return "\n".join(lines + [f"  {note}" for note in self.notes])


def resolve(source: WeightsSource) -> dict[str, torch.Tensor]:
    """State dict of `source`: cached copy (safe loader), else download, else a clear error."""
    cached = source.cached()
    if cached:
        return load_state_dict(cached[0])
    reason = source.offline() or probe(source.url)
    if reason is None:
        try:
            got = source.download()
        except Exception as e:  # urllib / requests / httpx / huggingface_hub errors all differ
            reason = f"the download failed ({type(e).__name__}: {e})"
        else:
            return got if isinstance(got, dict) else load_state_dict(got)
    raise WeightsNotFoundError(source.explain(reason))


def probe(url: str, timeout: float | None = None) -> str | None:
    """None if the host of `url` answers within `timeout` seconds, else why not."""
    timeout = PROBE_TIMEOUT_S if timeout is None else timeout
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None  # the server answered: the library's own download reports what it says
    except (urllib.error.URLError, OSError, ValueError) as e:  # no DNS, refused, timed out
        why = getattr(e, "reason", e)
        return f"{urlparse(url).netloc or url} is unreachable ({type(why).__name__}: {why})"


def load_weights_file(path, torchscript_hint: str = "") -> dict[str, torch.Tensor]:
    """State dict of a local weights file (`--extractor_weights`), through the safe loader."""
    try:
        return load_state_dict(path, missing_hint=f"{WEIGHTS_FLAG}: file not found: {path}")
    except TorchScriptRefused as e:
        raise TorchScriptRefused(f"{e}. {torchscript_hint}".rstrip(". ") + ".") from None


def _download(url: str, path: Path) -> Path:
    """Download `url` to `path` (checking the hash prefix in its name, as torch.hub does); the
    file is then read by the safe loader, like a cached copy (torch.hub would unpickle it with
    weights_only=False)."""
    match = torch.hub.HASH_REGEX.search(path.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(url, str(path), hash_prefix=match.group(1) if match else None)
    return path


def _cached_file(path: Path) -> list[Path]:
    return [path] if path.is_file() else []


# --- torchvision ------------------------------------------------------------------------------
def torchvision_source(weights, model: str) -> WeightsSource:
    """`weights` is a torchvision WeightsEnum member, e.g. `ResNet50_Weights.IMAGENET1K_V1`.

    Cache: `torch.hub.get_dir()/checkpoints/<file name of the URL>`, i.e.
    `$TORCH_HOME/hub/checkpoints/` (default `~/.cache/torch/hub/checkpoints/`), which is where
    `weights.get_state_dict()` downloads to and looks first."""
    filename = os.path.basename(urlparse(weights.url).path)
    path = Path(torch.hub.get_dir()) / "checkpoints" / filename
    return WeightsSource(
        model=model, tag=f"{type(weights).__name__}.{weights.name}", filename=filename,
        url=weights.url, drop_in=path, cached=lambda: _cached_file(path),
        download=lambda: _download(weights.url, path),
        notes=["(the directory follows $TORCH_HOME: <TORCH_HOME>/hub/checkpoints/)"])


# --- open_clip --------------------------------------------------------------------------------
def hf_hub_cache_dir() -> Path:
    """huggingface_hub's cache directory, read from the environment now (huggingface_hub
    reads it once at import time): $HF_HUB_CACHE, else $HF_HOME/hub, else
    $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.path.expandvars(os.path.expanduser(os.environ["HF_HUB_CACHE"])))
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "huggingface")
    return Path(os.path.expandvars(os.path.expanduser(home))) / "hub"


def open_clip_cache_dir() -> Path:
    """open_clip's own download directory (where it puts files fetched by URL)."""
    return Path(os.path.expanduser("~/.cache/clip"))


def hf_offline() -> str | None:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").upper() in _TRUE:
            return f"{var} is set, so the Hugging Face Hub is not contacted"
    return None


def open_clip_source(model_name: str, tag: str) -> WeightsSource:
    """open_clip's pretrained weights `tag` of `model_name`, from the Hugging Face Hub.

    open_clip (prefer_hf_hub=True) gets `<hf_hub repo>/open_clip_model.safetensors`, falling
    back to `open_clip_pytorch_model.bin`, into the Hugging Face cache. Cached copies are looked
    for there (`hf_hub_cache_dir()`, any snapshot that refs/main points to) and in the drop-in
    folder `~/.cache/clip/<hf repo id>/`. OpenAI's own file (cfg 'url', e.g. RN50.pt) is a
    TorchScript archive that the safe loader refuses; it is only mentioned in the error."""
    import open_clip
    from huggingface_hub import hf_hub_url, try_to_load_from_cache
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
    from open_clip.pretrained import download_pretrained_from_hf, get_pretrained_cfg

    cfg = get_pretrained_cfg(model_name, tag)
    if not cfg or not cfg.get("hf_hub"):
        raise ValueError(f"open_clip has no Hugging Face weights {tag!r} for {model_name!r}")
    repo_id, hub_file = os.path.split(cfg["hf_hub"])  # "org/repo/" or "org/repo/file"
    names = [hub_file] if hub_file else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
    drop_dir = open_clip_cache_dir() / repo_id
    openai_file = os.path.basename(urlparse(cfg.get("url", "")).path)

    def cached() -> list[Path]:
        found = []
        for name in names:
            hit = try_to_load_from_cache(repo_id, name, cache_dir=hf_hub_cache_dir())
            if isinstance(hit, str):
                found.append(Path(hit))
        return found + [drop_dir / n for n in names if (drop_dir / n).is_file()]

    def download():
        return download_pretrained_from_hf(repo_id, filename=hub_file or HF_WEIGHTS_NAME,
                                           cache_dir=str(hf_hub_cache_dir()))

    notes = [f"(also picked up: a copy in the Hugging Face cache {hf_hub_cache_dir()}, e.g. after "
             f"`hf download {repo_id} {names[0]}` on a machine with internet)"]
    if len(names) > 1:
        notes.append(f"({', '.join(names[1:])} from the same repository works as well)")
    if openai_file:
        notes.append(f"(OpenAI's original {openai_file} from {cfg['url']} is a TorchScript "
                     "archive and is refused; use the file above or convert it, see "
                     "ldm/extractors/clip.py)")
        stale = open_clip_cache_dir() / openai_file
        if stale.is_file():
            notes.append(f"(found {stale}, but it is that TorchScript archive)")
    return WeightsSource(
        model=f"open_clip {model_name}", tag=f"pretrained={tag!r} (open_clip "
        f"{open_clip.__version__}, hf-hub:{repo_id})", filename=names[0],
        url=hf_hub_url(repo_id, names[0]), drop_in=drop_dir / names[0],
        cached=cached, download=download, offline=hf_offline, notes=notes)


# --- timm -------------------------------------------------------------------------------------
def timm_source(cfg) -> WeightsSource:
    """timm pretrained weights, described by a `timm.models.PretrainedCfg` (`model.pretrained_cfg`
    of a model built with the tag). Hugging Face Hub weights (`hf_hub_id`) are looked for in the
    Hugging Face cache and the drop-in folder `~/.cache/timm/<hf repo id>/` (model.safetensors,
    else pytorch_model.bin); URL-only weights in `torch.hub.get_dir()/checkpoints/` as timm
    caches them."""
    cfg = cfg if isinstance(cfg, dict) else cfg.to_dict()
    model = f"timm {cfg.get('architecture')}"
    tag = f"{cfg.get('architecture')}.{cfg.get('tag')}"
    if cfg.get("hf_hub_id"):
        from huggingface_hub import hf_hub_download, hf_hub_url, try_to_load_from_cache
        repo_id = cfg["hf_hub_id"]
        names = ([cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename")
                 else ["model.safetensors", "pytorch_model.bin"])
        drop_dir = Path(os.path.expanduser("~/.cache/timm")) / repo_id

        def cached() -> list[Path]:
            hits = [try_to_load_from_cache(repo_id, n, cache_dir=hf_hub_cache_dir()) for n in names]
            return ([Path(h) for h in hits if isinstance(h, str)]
                    + [drop_dir / n for n in names if (drop_dir / n).is_file()])

        def download():
            errors = []
            for name in names:  # the safetensors file first, as timm does
                try:
                    return hf_hub_download(repo_id, name, cache_dir=str(hf_hub_cache_dir()))
                except Exception as e:  # not in this repository: try the next name
                    errors.append(e)
            raise errors[0]

        return WeightsSource(
            model=model, tag=tag, filename=names[0], url=hf_hub_url(repo_id, names[0]),
            drop_in=drop_dir / names[0], cached=cached, download=download, offline=hf_offline,
            notes=[f"(also picked up: a copy in the Hugging Face cache {hf_hub_cache_dir()}, e.g. "
                   f"after `hf download {repo_id} {names[0]}` on a machine with internet)"])
    if cfg.get("url"):
        filename = os.path.basename(urlparse(cfg["url"]).path)
        path = Path(torch.hub.get_dir()) / "checkpoints" / filename
        return WeightsSource(
            model=model, tag=tag, filename=filename, url=cfg["url"], drop_in=path,
            cached=lambda: _cached_file(path),
            download=lambda: _download(cfg["url"], path))
    raise WeightsNotFoundError(f"{model}: timm has no downloadable weights for {tag!r}; pass a "
                               f"local file: {WEIGHTS_FLAG} PATH")


# --- what `weights=` means, and loading it into a model ----------------------------------------
RANDOM = "random"
_WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def weights_kind(weights) -> str:
    """What a `weights` argument is: "default" (None: the library's default weights), "random",
    "file" (path-like, a path separator, a weights suffix, or an existing file) or "tag" (a
    pretrained tag of the library)."""
    if weights is None:
        return "default"
    if weights == RANDOM:
        return "random"
    text = str(weights)
    if (isinstance(weights, os.PathLike) or os.sep in text or "/" in text
            or text.lower().endswith(_WEIGHT_SUFFIXES) or os.path.isfile(text)):
        return "file"
    return "tag"


def build_model(factory: Callable[[], torch.nn.Module], weights, source: Callable[[], WeightsSource],
                *, heads, expected: str, device="cpu", check=None,
                ignorable=(), filter_fn=None, torchscript_hint: str = "") -> torch.nn.Module:
    """`factory()` with its weights, its classifier `heads` (submodule paths, or a function of
    the architecture giving them) replaced by Identity.

    `weights`: None (resolve `source()`: cache, download or WeightsNotFoundError), a local file
    (safe loader; the file may lack the head's keys), or "random" (factory's own init).
    `check(model)` runs on the architecture before any weights are read (e.g. a layer name:
    fail fast, download nothing). `filter_fn(state_dict, model)`, tried when the keys do not
    fit, converts a checkpoint from the model family's original layout (timm's filters)."""
    from ldm.checkpoint import CheckpointMismatchError, check_state_dict, load_into
    try:
        with torch.device("meta"):  # skip the random init: every tensor is loaded below
            model = factory()
    except Exception:  # some inits need real tensors
        model = factory()
    if check is not None:
        check(model)
    heads = tuple(heads(model) if callable(heads) else heads)
    if weights_kind(weights) == "random":
        model = factory() if _on_meta(model) else model
    else:
        state_dict = (load_weights_file(weights, torchscript_hint) if weights_kind(weights) == "file"
                      else resolve(source()))
        own = set(model.state_dict())
        if _on_meta(model):
            if any(n not in own for n, _ in [*model.named_parameters(), *model.named_buffers()]):
                model = factory()  # non-persistent buffers would stay uninitialised
            else:
                model.to_empty(device=device)
        head_keys = [k for k in own if any(k.startswith(h + ".") for h in heads)]
        if head_keys and not any(k in state_dict for k in head_keys):
            for head in heads:
                model.set_submodule(head, torch.nn.Identity())  # a file without the head
        if filter_fn is not None:
            try:
                check_state_dict(model, state_dict, ignorable, expected)
            except CheckpointMismatchError:
                try:
                    state_dict = filter_fn(state_dict, model)
                except Exception:
                    pass  # not that layout either: report the keys of the file as it is
        load_into(model, state_dict, ignorable=ignorable, expected=expected)
    for head in heads:
        model.set_submodule(head, torch.nn.Identity())
    return model.to(device)


def _on_meta(model: torch.nn.Module) -> bool:
    return any(t.is_meta for t in [*model.parameters(), *model.buffers()])
