"""The shape of the code, checked: functions short enough to read at once, the guided sampling
loop on a screen or two, no import cycle between the modules of `ldm`, scripts that are entry
points only, and one module that knows the log-line format."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 80
SOURCES = sorted([*(REPO / "ldm").rglob("*.py"), *(REPO / "scripts").glob("*.py")])


def functions(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_function_is_longer_than_80_lines(path):
    long = [(name, line, n) for name, line, n in functions(path) if n > MAX_FUNCTION_LINES]
    assert not long, f"{path.relative_to(REPO)}: " + ", ".join(f"{name} (line {line}: {n} lines)"
                                                             for name, line, n in long)


def test_the_guided_loop_is_under_100_lines():
    path = REPO / "ldm" / "models" / "diffusion" / "feature_guidance.py"
    sizes = {name: n for name, _, n in functions(path)}
    assert sizes["_loop"] + sizes["_iteration"] < 100, sizes


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(path: Path) -> set[str]:
    """Modules of `ldm` imported when `path` is imported (not inside functions, not for typing)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for child in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) else []:
            if isinstance(child, ast.Import):
                found |= {a.name for a in child.names if a.name.startswith("ldm")}
            elif isinstance(child, ast.ImportFrom) and (child.module or "").startswith("ldm"):
                names = {f"{child.module}.{a.name}" for a in child.names}
                submodules = {n for n in names if is_module(n)}
                found |= submodules | ({child.module} if names - submodules else set())
    return found


def is_module(name: str) -> bool:
    path = REPO.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def test_no_import_cycle_in_ldm():
    modules = {module_name(p): p for p in (REPO / "ldm").rglob("*.py")}
    graph = {name: {m for m in top_level_imports(path) if m in modules and m != name}
             for name, path in modules.items()}
    state, cycle = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open" and not cycle:
                cycle.extend(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycle, " -> ".join(cycle)


@pytest.mark.parametrize("path", sorted((REPO / "scripts").glob("*.py")), ids=lambda p: p.name)
def test_scripts_are_entry_points(path):
    """A script defines at most its extractor class; its work is one call into the package."""
    tree = ast.parse(path.read_text())
    defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    assert not defs, f"{path.name} defines {', '.join(d.name for d in defs)}: move it into ldm/"


def test_only_the_scorelog_module_knows_the_log_format():
    owners = {REPO / "ldm" / "scorelog.py", Path(__file__), REPO / "tests" / "test_scorelog.py"}
    files = [*(REPO / "ldm").rglob("*.py"), *(REPO / "scripts").glob("*.py"), *(REPO / "tests").glob("*.py")]
    speaking = [str(p.relative_to(REPO)) for p in files if p not in owners and "xy_dists" in p.read_text()]
    assert not speaking, f"these parse or write score lines themselves: {speaking}"


DECODER_NAMES = ("guided", "featinv", "hybrid")


def test_only_ldm_decoders_dispatches_on_the_decoder_kind():
    """A decoder kind is one class in ldm/decoders: no other module compares a kind's name."""
    import re

    compared = re.compile(r"""(==|!=|\bin \(|\bis)\s*["'](%s)["']|["'](%s)["']\s*(==|!=|\bin\b)"""
                          % ("|".join(DECODER_NAMES), "|".join(DECODER_NAMES)))
    files = [p for p in [*(REPO / "ldm").rglob("*.py"), *(REPO / "scripts").glob("*.py")]
             if REPO / "ldm" / "decoders" not in p.parents]
    dispatching = [f"{p.relative_to(REPO)}:{n}" for p in files
                   for n, line in enumerate(p.read_text().splitlines(), 1)
                   if compared.search(line) and not line.strip().startswith("for ")]
    assert not dispatching, f"these test a decoder's name outside ldm/decoders: {dispatching}"


def toy_name_literals(path: Path) -> list[int]:
    """Lines of tuple, list, set or dict literals that name two or more toy extractors."""
    names = {"toy_shape", "toy_colour", "toy_all", "toy:shape", "toy:colour", "toy:all",
             "extractor_shape", "extractor_colour", "extractor_all"}
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        items = node.keys if isinstance(node, ast.Dict) else getattr(node, "elts", None)
        if isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)) and items:
            strings = {i.value for i in items if isinstance(i, ast.Constant) and isinstance(i.value, str)}
            if len(strings & names) >= 2:
                found.append(node.lineno)
    return found


def test_the_toy_extractor_list_is_written_once():
    """The toy extractors are listed in one place: ldm.toy.names.TOY_NETS."""
    files = [*(REPO / "ldm").rglob("*.py"), *(REPO / "scripts").glob("*.py")]
    listing = [f"{p.relative_to(REPO)}:{line}" for p in files for line in toy_name_literals(p)]
    assert listing == ["ldm/toy/names.py:5"], f"the toy extractors listed again (use ldm.toy.names.TOY_NETS): {listing}"


LOWER_LAYERS = {"ldm.toy": ("ldm.cli", "ldm.api", "ldm.decoders", "ldm.featinv", "ldm.benchmarks", "ldm.toy_build"),
                "ldm.extractors": ("ldm.toy", "ldm.cli", "ldm.api", "ldm.decoders", "ldm.featinv", "ldm.benchmarks")}


@pytest.mark.parametrize("layer", sorted(LOWER_LAYERS))
def test_no_import_runs_back_up_the_layers(layer):
    """The toy world and the extractors import nothing of the layers built on them (at any
    depth of the file: a function-level import counts too)."""
    above = LOWER_LAYERS[layer]
    found = []
    for path in (REPO / layer.replace(".", "/")).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.relative_to(REPO)}: {n}" for n in names
                      if any(n == a or n.startswith(a + ".") for a in above)]
    assert not found, found
