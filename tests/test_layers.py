"""genfast's import graph follows the layers written in CONTRIBUTING.md section 1 (read from that file, so the
document and this test cannot drift apart).

Every import of every module under genfast/ is read with ``ast``: at module level and inside functions, absolute
and relative, and ``importlib.import_module`` with a literal name. A module belongs to a *part*: the first name
under genfast/ (``genfast/ops/attention.py`` -> ``ops``, ``genfast/_io.py`` -> ``_io``, ``genfast/__init__.py`` ->
``__init__``), so a new file is placed by its package, never by a list of files. The test fails on:
- a part that the layer list does not name (a new package must be given a place);
- an import of a part in a higher layer, or of another part of the same layer (parts on one line are peers that
  do not know each other);
- an import of the repository's other top-level code (benchmarks/, tests/), which an installed genfast lacks;
- an import loop between modules, even one closed by an import inside a function.
Implicit imports of parent packages (``import genfast.ops.attention`` runs ``genfast/__init__.py`` first) are not
edges: every module would otherwise depend on the package's ``__init__``, which sits above the kernel library.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIR = REPO / "genfast"
CONTRIBUTING = REPO / "CONTRIBUTING.md"

# The layer list: the numbered items that follow this line in section 1; each item starts with its parts in
# backticks, separated by commas, then a colon.
LAYERS_MARKER = "Layers, bottom to top"
_ITEM = re.compile(r"^\d+\.\s+((?:`[\w.]+`\s*,\s*)*`[\w.]+`)\s*:")
_NAME = re.compile(r"`([\w.]+)`")


def parse_layers(text: str) -> list[list[str]]:
    """The layers of CONTRIBUTING.md's section 1, bottom first, each a list of part names."""
    section = re.search(r"^## 1\..*?(?=^## )", text, flags=re.S | re.M)
    if section is None:
        raise AssertionError("CONTRIBUTING.md has no section '## 1.'")
    lines = section.group(0).splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(LAYERS_MARKER)]
    if len(starts) != 1:
        raise AssertionError(f"CONTRIBUTING.md section 1 needs exactly one line starting {LAYERS_MARKER!r}")
    layers: list[list[str]] = []
    for line in lines[starts[0] + 1:]:
        if not line.strip() and not layers:
            continue
        item = _ITEM.match(line)
        if item:
            layers.append(_NAME.findall(item.group(1)))
        elif line.strip() and (line.startswith(" ") or not layers):
            continue  # an item's continuation line
        else:
            break  # a blank line or prose after the list ends it
    if not layers:
        raise AssertionError(f"CONTRIBUTING.md section 1: no numbered layer items after {LAYERS_MARKER!r}")
    return layers


# ------------------------------------------------------------------------------------------- the import graph
def _modules(package_dir: Path) -> dict[str, Path]:
    """Dotted name -> source file of every module of the package (a package is its __init__.py)."""
    root = package_dir.name
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join((root, *parts))] = path
    return modules


def _bound_names(path: Path) -> set[str]:
    """Names a package's __init__.py binds at module level (so ``from pkg import name`` may be an attribute)."""
    names = set()
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def _imports(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported module, line) for every import in the file, wherever it stands."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:
                # ``from P import N``: the submodule P.N when there is one; else an attribute of P, which is an
                # import of P. In a package, a name its __init__ does not bind is a submodule without a .py file
                # (the compiled extension _C).
                sub = f"{source}.{alias.name}"
                is_package = source in modules and modules[source].name == "__init__.py"
                if sub in modules or (is_package and alias.name != "*"
                                      and alias.name not in _bound_names(modules[source])):
                    found.append((sub, node.lineno))
                else:
                    found.append((source, node.lineno))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.args[0].value, node.lineno))
    return found


def _part(module: str) -> str:
    names = module.split(".")
    return names[1] if len(names) > 1 else "__init__"


def _first_party(package_dir: Path) -> set[str]:
    """The repository's other importable top-level names (benchmarks, tests, ...): not in an installed genfast."""
    names = set()
    for entry in package_dir.parent.iterdir():
        if entry == package_dir or entry.name.startswith("."):
            continue
        if entry.suffix == ".py" and entry.stem != "setup":
            names.add(entry.stem)
        elif entry.is_dir() and any(entry.glob("*.py")):
            names.add(entry.name)
    return names


def _loops(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    loops = []

    def visit(node: str) -> None:
        # Recursion depth is bounded by the number of modules (a few hundred).
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                loops.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return loops


def check_layers(package_dir: Path, layers: list[list[str]]) -> list[str]:
    """Every breach of the layer rules in the package, one line each (empty: the package follows them)."""
    root = package_dir.name
    level = {part: i for i, parts in enumerate(layers) for part in parts}
    modules = _modules(package_dir)
    others = _first_party(package_dir)
    problems = []
    for module in modules:
        if _part(module) not in level:
            problems.append(f"{module}: its part {_part(module)!r} is not in the layer list of CONTRIBUTING.md "
                            f"section 1; give it a layer there")
    graph: dict[str, set[str]] = {module: set() for module in modules}
    for module, path in modules.items():
        where = f"{path.relative_to(package_dir.parent)}"
        for target, line in _imports(module, path, modules):
            top = target.split(".")[0]
            if top in others:
                problems.append(f"{where}:{line}: imports {target}, which lives outside the package ({top}/ is not "
                                f"installed with {root})")
                continue
            if top != root or target == module:
                continue
            if target in modules:
                graph[module].add(target)
            mine, theirs = _part(module), _part(target)
            if mine == theirs or mine not in level:
                continue
            if theirs not in level:
                problems.append(f"{where}:{line}: imports {target}, whose part {theirs!r} has no layer")
            elif level[theirs] > level[mine]:
                problems.append(f"{where}:{line}: {mine} (layer {level[mine] + 1}) imports {target} from the higher "
                                f"layer {level[theirs] + 1} ({theirs})")
            elif level[theirs] == level[mine]:
                problems.append(f"{where}:{line}: {mine} imports {target}, but {mine} and {theirs} are peers in "
                                f"layer {level[mine] + 1} and must not import each other")
    for loop in _loops(graph):
        problems.append("import loop between " + ", ".join(loop))
    return problems


# ----------------------------------------------------------------------------------------------------- tests
def test_genfast_follows_the_layers_of_contributing():
    layers = parse_layers(CONTRIBUTING.read_text())
    assert check_layers(PACKAGE_DIR, layers) == []


def test_the_layer_list_is_read_from_contributing():
    layers = parse_layers(CONTRIBUTING.read_text())
    order = [part for parts in layers for part in parts]
    assert len(order) == len(set(order)), f"a part is listed twice: {order}"
    for lower, upper in (("_io", "kernels"), ("kernels", "ops"), ("ops", "nn"), ("nn", "models"),
                         ("models", "recipes"), ("recipes", "cli")):
        assert order.index(lower) < order.index(upper), (lower, upper)


# The checker itself, on a tiny package: clean, then with one breach planted at a time.
_LAYERS_DOC = """# Contributing
## 1. Layout

Layers, bottom to top:

1. `_io`, `_C`: bottom
2. `kernels`: kernels
   over two lines
3. `ops`: ops
4. `nn`, `diffusion`: peers
5. `__init__`: the surface
6. `models`: top

More prose.

## 2. Next
"""

_CLEAN = {
    "__init__.py": "from pkg import ops\nfrom pkg.nn import Thing\n",
    "_io.py": "import os\n",
    "kernels/__init__.py": "",
    "kernels/attention.py": "from pkg import _io\nfrom pkg import _C\nfrom .common import x\n",
    "kernels/common.py": "x = 1\n",
    "ops/__init__.py": "from pkg.ops.attention import attend\n",
    "ops/attention.py": "from . import _checks\nfrom ..kernels import attention\n\n\ndef attend():\n"
                        "    from pkg.kernels.common import x\n",
    "ops/_checks.py": "",
    "nn/__init__.py": "from pkg.nn.layer import Thing\n",
    "nn/layer.py": "from pkg import ops\n\n\nclass Thing:\n    pass\n",
    "nn/act.py": "",
    "diffusion/__init__.py": "import pkg.ops._checks\n\n\ndef schedule():\n    pass\n",
    "models/__init__.py": "import importlib\n\n\ndef load():\n    return importlib.import_module('pkg.models.gpt')\n",
    "models/gpt.py": "import pkg\nfrom pkg.nn import Thing\n",
    "models/vae.py": "",
}


def _write(tmp_path: Path, files: dict[str, str]) -> Path:
    package = tmp_path / "repo" / "pkg"
    for name, text in files.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    (tmp_path / "repo" / "benchmarks").mkdir(exist_ok=True)
    (tmp_path / "repo" / "benchmarks" / "run.py").write_text("")
    return package


def test_layer_list_parsing():
    assert parse_layers(_LAYERS_DOC) == [["_io", "_C"], ["kernels"], ["ops"], ["nn", "diffusion"], ["__init__"],
                                         ["models"]]
    with pytest.raises(AssertionError, match="Layers, bottom to top"):
        parse_layers(_LAYERS_DOC.replace("Layers, bottom to top", "Layers"))


def test_checker_passes_a_clean_package(tmp_path):
    assert check_layers(_write(tmp_path, _CLEAN), parse_layers(_LAYERS_DOC)) == []


@pytest.mark.parametrize("file, text, expected", [
    # (The targets import nothing that leads back, so each breach is the only problem.)
    # upward, at module level, absolute
    ("kernels/attention.py", "from pkg.ops import _checks\n", r"pkg/kernels/attention.py:4: kernels \(layer 2\) "
                                                              r"imports pkg.ops._checks from the higher layer 3"),
    # upward, inside a function
    ("ops/_checks.py", "def f():\n    import pkg.nn.act\n", r"ops \(layer 3\) imports pkg.nn.act from the higher"),
    # upward, relative
    ("ops/_checks.py", "def f():\n    from ..models import vae\n", r"imports pkg.models.vae from the higher"),
    # upward through a name that a package's __init__ defines (an import of the package)
    ("_io.py", "from pkg.diffusion import schedule\n", r"_io \(layer 1\) imports pkg.diffusion from the higher"),
    # upward through importlib with a literal name
    ("ops/_checks.py", "import importlib\nimportlib.import_module('pkg.models.vae')\n", r"imports pkg.models.vae from"),
    # to the package's __init__ from below it
    ("nn/act.py", "import pkg\n", r"nn \(layer 4\) imports pkg from the higher layer 5 \(__init__\)"),
    # between peers
    ("diffusion/__init__.py", "from pkg.nn import act\n", r"diffusion imports pkg.nn.act, but diffusion and nn are "
                                                           r"peers in layer 4"),
    # outside the package
    ("ops/_checks.py", "def f():\n    from benchmarks.run import main\n", r"benchmarks/ is not installed"),
    # a loop inside one part, closed inside a function
    ("kernels/common.py", "def f():\n    from pkg.kernels import attention\n",
     r"^import loop between pkg.kernels.attention, pkg.kernels.common$"),
    # a loop through a package's __init__
    ("ops/_checks.py", "from pkg.ops import attend\n", r"^import loop between pkg.ops, pkg.ops._checks, "
                                                       r"pkg.ops.attention$"),
    # a new part with no layer
    ("training/loop.py", "", r"pkg.training.loop: its part 'training' is not in the layer list"),
])
def test_checker_fails_on_a_planted_breach(tmp_path, file, text, expected):
    package = _write(tmp_path, {**_CLEAN, file: _CLEAN.get(file, "") + text})
    problems = check_layers(package, parse_layers(_LAYERS_DOC))
    assert len(problems) == 1, problems
    assert re.search(expected, problems[0]), problems[0]


if __name__ == "__main__":
    for problem in check_layers(PACKAGE_DIR, parse_layers(CONTRIBUTING.read_text())):
        print(problem)
