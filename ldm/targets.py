"""Targets: what a decoding run tries to match, and how each becomes a feature tensor.

A target is given as a string (the command line's `--prompt`, or the Python API):

- a path to an image file: the extractor's features of that image (the reference's targets);
- a path to a feature file (`.npy`, `.pt`, `.pth`, `.safetensors`): raw features, shaped like
  the extractor's output without the batch dimension (or with a batch dimension of 1);
- an expression over those, e.g. feature arithmetic that steers an image's feature along a
  text direction (CLIP):

      image("cat.jpg") + 0.5 * (text("a photo of a dog") - text("a photo of a cat"))

  with `image(path)`, `text(prompt)`, `features(path)`, numbers, `+`, `-`, `*`, `/` (by a
  number) and parentheses; nothing else is evaluated (the expression is parsed, never run);
- anything else: a text prompt (needs an extractor with a text tower, e.g. CLIP).

A folder stands for the image files in it (sorted by name). Each target gets a `label`, the
name of its output folder when a run has several targets.
"""
from __future__ import annotations

import ast
import hashlib
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm.errors import InputError
from ldm.files import not_a_file
from ldm.images import IMAGE_SUFFIXES, ImageFileError, read_rgb

FEATURE_SUFFIXES = {".npy", ".pt", ".pth", ".safetensors"}
FUNCTIONS = ("image", "text", "features")


class TargetError(InputError):
    """A target that cannot be used: the message names it and says what would work."""


@dataclass(frozen=True)
class Target:
    kind: str        # "image" | "text" | "features" | "expression"
    source: str      # the path, the prompt or the expression
    label: str = ""  # output folder name (several targets per run)

    def leaves(self) -> list[tuple[str, str]]:
        """The (kind, source) pairs this target reads: itself, or an expression's terms."""
        if self.kind != "expression":
            return [(self.kind, self.source)]
        return [(node.func.id, node.args[0].value) for node in ast.walk(_parse(self.source))
                if isinstance(node, ast.Call)]


RESERVED_LABELS = ("index.json",)   # names a multi-target --optim_folder holds besides the targets


def _looks_like_expression(text: str) -> bool:
    return re.search(r"\b(" + "|".join(FUNCTIONS) + r")\s*\(", text) is not None


def _is_file(path: Path) -> bool:
    """Path.is_file, False for strings that cannot name a file (a component over the file
    system's length limit, a NUL byte): those are text, not paths."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except (OSError, ValueError):
        return False


# Bounds of a target expression (Python's parser and our evaluation recurse; numbers become floats).
MAX_EXPRESSION_CHARS, MAX_EXPRESSION_NODES, MAX_EXPRESSION_DEPTH = 20_000, 1_000, 100
MAX_NUMBER = 1e12
MAX_TARGET_LIST_BYTES = 16 * 2 ** 20


def _check_size(expression: str) -> None:
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise TargetError(f"target expression of {len(expression):,} characters: at most "
                          f"{MAX_EXPRESSION_CHARS:,} (average many images into a feature file instead)")


def _check_shape(expression: str, tree: ast.AST) -> None:
    """TargetError for a tree of more than MAX_EXPRESSION_NODES nodes or MAX_EXPRESSION_DEPTH
    levels (walked without recursion)."""
    stack, nodes = [(tree, 1)], 0
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if depth > MAX_EXPRESSION_DEPTH or nodes > MAX_EXPRESSION_NODES:
            raise TargetError(f"target expression {expression[:80]!r}...: more than {MAX_EXPRESSION_DEPTH} "
                              f"levels of nesting or {MAX_EXPRESSION_NODES:,} parts, the most a target "
                              "expression may have (average many images into a feature file instead)")
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))


def _parse_bounded(expression: str) -> ast.Expression:
    """ast.parse of an expression within the bounds above; SyntaxError as ast.parse raises it."""
    _check_size(expression)
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (RecursionError, MemoryError):
        raise TargetError(f"target expression {expression[:80]!r}...: nested too deeply to parse (at "
                          f"most {MAX_EXPRESSION_DEPTH} levels)") from None
    _check_shape(expression, tree)
    return tree


def _parse(expression: str) -> ast.Expression:
    try:
        tree = _parse_bounded(expression)
    except SyntaxError as err:
        raise TargetError(f"target expression {expression!r} does not parse: {err.msg}") from None
    called = {id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and id(node) not in called:
            raise TargetError(f"target expression {expression!r}: {node.id!r} alone is not a term "
                              "(write image(\"path\"), text(\"prompt\") or features(\"path\"))")
        if isinstance(node, ast.Call):
            if not (isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS
                    and len(node.args) == 1 and not node.keywords
                    and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                raise TargetError(f"target expression {expression!r}: {ast.unparse(node)} is not one of "
                                  "image(\"path\"), text(\"prompt\"), features(\"path\") (one quoted string)")
        elif not isinstance(node, (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Constant, ast.Name,
                                   ast.Load, ast.Add, ast.Sub, ast.Mult, ast.Div, ast.USub, ast.UAdd)):
            raise TargetError(f"target expression {expression!r}: {ast.unparse(node)!r} is not allowed "
                              "(only image/text/features terms, numbers, + - * / and parentheses)")
        elif isinstance(node, ast.Constant) and not isinstance(node.value, (int, float, str)):
            raise TargetError(f"target expression {expression!r}: constant {node.value!r} is not a number")
        elif isinstance(node, ast.Constant) and not isinstance(node.value, str) and not abs(node.value) <= MAX_NUMBER:
            raise TargetError(f"target expression {expression[:80]!r}: the number {str(node.value)[:40]} is "
                              f"out of range (at most {MAX_NUMBER:g} in size)")
        elif isinstance(node, ast.Name) and node.id not in FUNCTIONS:
            raise TargetError(f"target expression {expression!r}: unknown name {node.id!r} (terms are "
                              "image(\"path\"), text(\"prompt\"), features(\"path\"))")
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and _number(node.right) == 0:
            raise TargetError(f"target expression {expression!r}: {ast.unparse(node)!r} divides by zero")
    return tree


def _number(node: ast.AST) -> float | None:
    """The value of a sub-expression made of numbers only (None if it has terms)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return float(node.value)
    if isinstance(node, ast.UnaryOp):
        value = _number(node.operand)
        return None if value is None else (-value if isinstance(node.op, ast.USub) else value)
    if isinstance(node, ast.BinOp):
        left, right = _number(node.left), _number(node.right)
        if left is None or right is None or (isinstance(node.op, ast.Div) and right == 0):
            return None
        return {ast.Add: left + right, ast.Sub: left - right, ast.Mult: left * right}.get(
            type(node.op), left / right if isinstance(node.op, ast.Div) else None)
    return None


def _slug(text: str, limit: int = 48) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:limit].strip("._")
    return slug or "target"


def _label(kind: str, source: str) -> str:
    if kind == "image":
        return _slug(Path(source).stem)     # the reference's layout: cat.jpg -> cat/
    if kind == "features":                  # feat.npy and feat.pt stay apart: feat_npy, feat_pt
        return _slug(f"{Path(source).stem}_{Path(source).suffix.lstrip('.')}")
    digest = hashlib.sha256(source.encode()).hexdigest()[:8]
    return f"{'text' if kind == 'text' else 'expr'}_{_slug(source, 40)}_{digest}"


def parse_target(spec: str, text_only: bool = False) -> Target:
    """One target string → Target (see the module docstring). A missing path that looks like an
    image or feature file is an error, not a text prompt."""
    if not isinstance(spec, str) or not spec.strip():
        raise TargetError(f"empty target {spec!r}: give an image path, a feature file, an expression "
                          "or a text prompt")
    try:
        spec.encode("utf-8")
    except UnicodeEncodeError:
        raise TargetError(f"target {spec.encode('utf-8', 'backslashreplace').decode()[:200]!r} is not valid "
                          "UTF-8 (a file name of other bytes): rename the file") from None
    if text_only:
        return Target("text", spec, _label("text", spec))
    if _looks_like_expression(spec):
        try:
            _parse_bounded(spec)
        except SyntaxError as err:   # "a photo of an image (blurry)" is a caption, not Python
            warnings.warn(f"{spec!r} is read as a text prompt: it is not a target expression "
                          f"({err.msg})", stacklevel=2)
            return Target("text", spec, _label("text", spec))
        tree = _parse(spec)
        expression = ast.unparse(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and node.func.id in ("image", "features"):
                _check_file(node.args[0].value, node.func.id)
        return Target("expression", expression, _label("expression", expression))
    path = Path(spec).expanduser()
    suffix = path.suffix.lower()
    if _is_file(path):
        kind = "features" if suffix in FEATURE_SUFFIXES else "image"
        return Target(kind, str(path), _label(kind, str(path)))
    if suffix in IMAGE_SUFFIXES | FEATURE_SUFFIXES:
        what = "an image" if suffix in IMAGE_SUFFIXES else "a feature file"
        problem = not_a_file(path)
        raise TargetError(f"target {spec!r} looks like {what} path, but no such file exists"
                          if problem == "no such file" else f"target {spec!r}: {problem}")
    return Target("text", spec, _label("text", spec))


def _check_file(path: str, kind: str) -> None:
    if not_a_file(Path(path).expanduser()):
        raise TargetError(f"{kind}({path!r}): {not_a_file(Path(path).expanduser())}")


def expand_targets(specs: list[str], text_only: bool = False) -> list[Target]:
    """Target strings (folders expand to their image files, sorted) → Targets with unique labels."""
    targets: list[Target] = []
    for spec in specs:
        if not isinstance(spec, str) or not spec.strip():   # Path("") is the current folder
            raise TargetError(f"empty target {spec!r}: give an image path, a folder, a feature "
                              "file, an expression or a text prompt")
        path = Path(spec).expanduser()
        if not text_only and _is_dir(path):
            images = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise TargetError(f"target folder {spec!r} holds no image files "
                                  f"({', '.join(sorted(IMAGE_SUFFIXES))})")
            targets += [parse_target(str(p)) for p in images]
        else:
            targets.append(parse_target(spec, text_only))
    return unique_labels(targets)


def unique_labels(targets: list[Target], reserved=RESERVED_LABELS) -> list[Target]:
    """Labels that name one folder each: the second cat.jpg becomes cat_2 unless some target
    is called cat_2 already (then cat_3), and a reserved name (index.json) gets a suffix too.
    Labels are compared without case (macOS and Windows folders ignore it)."""
    taken = {name.lower() for name in reserved} | {t.label.lower() for t in targets}
    kept: set[str] = set()
    out = []
    for target in targets:
        label = target.label
        if label.lower() in kept or label.lower() in {n.lower() for n in reserved}:
            k = 2
            while f"{label}_{k}".lower() in taken:
                k += 1
            label = f"{label}_{k}"
            taken.add(label.lower())
        kept.add(label.lower())
        out.append(target if label == target.label else Target(target.kind, target.source, label))
    return out


def read_image(path: str) -> Image.Image:
    """A target image as 8-bit RGB, upright (any mode, 16/32-bit, float, EXIF: `to_rgb`, which
    needs the file's own tags); TargetError naming the file if it is not a readable image."""
    try:
        return read_rgb(path)
    except ImageFileError as err:
        raise TargetError(str(err)) from None


def read_target_list(path: str) -> list[str]:
    """A text file with one target per line (blank lines and lines starting with # skipped)."""
    if not _is_file(Path(path)) or Path(path).stat().st_size > MAX_TARGET_LIST_BYTES:
        raise TargetError(f"the target list {path!r} is not a regular file of at most "
                          f"{MAX_TARGET_LIST_BYTES // 2 ** 20} MiB")
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise TargetError(f"cannot read the target list {path!r}: {err}") from err
    specs = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not specs:
        raise TargetError(f"the target list {path!r} holds no targets")
    return specs


def load_feature_file(path: str) -> torch.Tensor:
    """Raw features from `.npy` (no pickles), `.pt`/`.pth` (a tensor, through torch's
    weights-only loader) or `.safetensors` (a single tensor, or the one named "features")."""
    suffix = Path(path).suffix.lower()
    try:
        if suffix == ".npy":
            value = torch.from_numpy(np.load(path, allow_pickle=False))
        elif suffix == ".safetensors":
            from safetensors.torch import load_file
            tensors = load_file(path)
            if "features" in tensors:
                value = tensors["features"]
            elif len(tensors) == 1:
                value = next(iter(tensors.values()))
            else:
                raise TargetError(f"feature file {path!r} holds several tensors "
                                  f"({', '.join(sorted(tensors))}); name the target one 'features'")
        else:
            value = torch.load(path, map_location="cpu", weights_only=True)
    except TargetError:
        raise
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise TargetError(f"cannot read the feature file {path!r}: {err}") from err
    if isinstance(value, dict) and "features" in value:
        value = value["features"]
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise TargetError(f"feature file {path!r} must hold one floating-point tensor "
                          f"(got {type(value).__name__})")
    if value.layout != torch.strided or value.is_meta or value.device.type != "cpu":
        raise TargetError(f"feature file {path!r} holds a {value.layout} tensor on "
                          f"{value.device}: save a dense tensor on the CPU (tensor.to_dense().cpu())")
    return value.float()


FeatureFn = Callable[[str, str], torch.Tensor]


def target_features(target: Target, leaf: FeatureFn, feature_shape: tuple[int, ...] | None = None
                    ) -> torch.Tensor:
    """The target's feature tensor [1, ...]. `leaf(kind, source)` computes the features of one
    image / text / file term ([1, ...]); an expression combines them. With `feature_shape` (the
    extractor's output shape without the batch dimension), every term must have that shape."""

    def term(kind: str, source: str) -> torch.Tensor:
        value = leaf(kind, source).float()
        if feature_shape is not None:
            if value.dim() == len(feature_shape):
                value = value.unsqueeze(0)
            if tuple(value.shape[1:]) != tuple(feature_shape) or value.shape[0] != 1:
                what = f"{kind}({source!r})"
                raise TargetError(f"{what} gives features of shape {tuple(value.shape)}, but the extractor's "
                                  f"features have shape {(1, *feature_shape)}: a feature file must come "
                                  "from the same model, layer and pooling (--spatial)")
        return value

    if target.kind != "expression":
        return term(target.kind, target.source)

    def evaluate(node):
        if isinstance(node, ast.Expression):
            return evaluate(node.body)
        if isinstance(node, ast.Constant):
            return float(node.value)
        if isinstance(node, ast.Call):
            return term(node.func.id, node.args[0].value)
        if isinstance(node, ast.UnaryOp):
            value = evaluate(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        left, right = evaluate(node.left), evaluate(node.right)
        if isinstance(node.op, ast.Add):
            return _combine(left, right, lambda a, b: a + b, target)
        if isinstance(node.op, ast.Sub):
            return _combine(left, right, lambda a, b: a - b, target)
        if isinstance(node.op, ast.Mult):
            if isinstance(left, torch.Tensor) and isinstance(right, torch.Tensor):
                raise TargetError(f"target expression {target.source!r}: features can only be scaled "
                                  "by numbers, not multiplied by features")
            return left * right
        if isinstance(right, torch.Tensor):
            raise TargetError(f"target expression {target.source!r}: divide features by numbers only")
        if right == 0:
            raise TargetError(f"target expression {target.source!r}: division by zero")
        return left / right

    value = evaluate(_parse(target.source))
    if not isinstance(value, torch.Tensor):
        raise TargetError(f"target expression {target.source!r} holds no image/text/features term")
    return value


def _combine(a, b, op, target: Target):
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        raise TargetError(f"target expression {target.source!r}: features can be added to or subtracted "
                          "from features only, not numbers")
    if a.shape != b.shape:
        raise TargetError(f"target expression {target.source!r}: terms of shapes {tuple(a.shape)} and "
                          f"{tuple(b.shape)} cannot be combined")
    return op(a, b)
