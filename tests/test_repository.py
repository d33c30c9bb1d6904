"""The repository stays as documented: CI runs exactly the README's quick-start test command,
and the package's imports point one way, down its layers, without circles."""

import ast
import textwrap
from collections.abc import Collection, Mapping, Sequence
from fnmatch import fnmatchcase
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "acert"


def quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = section.split("```bash\n")[1:]
    return [block.split("```", 1)[0].strip() for block in blocks]


def test_quick_start_has_two_commands_and_ci_runs_the_test_one():
    train, tests = quick_start_commands()
    assert train.startswith("python3 -m venv") and train.endswith("acert train")
    assert tests.endswith("pytest")
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci_lines[-1] == tests


# ----------------------------------------------------------------------------- import layers
# The package's layers, top to bottom (docs/ARCHITECTURE.md, "Layers"). A module may import
# modules of its own layer or of a layer below it, never one above, and no import circle is
# allowed, inside a layer either. Names are ``fnmatch`` patterns ("acert.bounds.*").
#
# Every import statement counts wherever it stands: at module level, inside a function, under
# ``if TYPE_CHECKING:``. A lazy import only hides an arrow from the interpreter; the code still
# needs the module to run, and a type-only import still ties the two modules' designs together.
# ``from p import n`` is an arrow to the module p.n when there is one, else to p; importing p.n
# is no arrow to p. ``importlib`` calls are not read (only ``acert/__init__.py``'s lazy
# re-exports use one, and that facade sits at the top).
LAYERS: dict[str, tuple[str, ...]] = {
    "interface": ("acert", "acert.__main__", "acert.api", "acert.cli", "acert.cli.*"),
    "workflows": ("acert.workflows", "acert.workflows.*"),
    "records": ("acert.config", "acert.config.*", "acert.records", "acert.records.*"),
    "methods and evaluation": (
        "acert.methods",
        "acert.methods.*",
        "acert.evaluation",
        "acert.evaluation.*",
    ),
    "radii": ("acert.radius", "acert.radius.*"),
    "bounds": ("acert.bounds", "acert.bounds.*"),
    "models": ("acert.models", "acert.models.*"),
    "foundation": ("acert.foundation", "acert.foundation.*", "acert.data", "acert.data.*"),
}

Graph = dict[str, set[str]]


def package_modules(src: Path, package: str) -> dict[str, Path]:
    """Dotted name -> file of every module of ``package`` under ``src``."""
    modules = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_modules(module: str, path: Path, known: Collection[str]) -> set[str]:
    """The modules of ``known`` that ``module`` (its file ``path``) imports, anywhere in it."""
    here = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[: len(here.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                for alias in node.names
            ]
        else:
            continue
        for name in names:
            while name and name not in known:  # `import acert.x.y` of a module acert.x.y
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def import_graph(src: Path, package: str) -> Graph:
    modules = package_modules(src, package)
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def circles(graph: Graph) -> list[list[str]]:
    """The import circles: strongly connected sets of two or more modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            members = []
            while not members or members[-1] != node:
                members.append(stack.pop())
            if len(members) > 1:
                found.append(sorted(members))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def layer_of(module: str, layers: Mapping[str, Sequence[str]]) -> list[int]:
    """The positions (0 = top) of the layers that place ``module``."""
    return [
        i
        for i, patterns in enumerate(layers.values())
        if any(fnmatchcase(module, pattern) for pattern in patterns)
    ]


def upward_arrows(graph: Graph, layers: Mapping[str, Sequence[str]]) -> list[str]:
    """Every import of a module in a higher layer, as 'importer (layer) -> imported (layer)';
    modules not placed exactly once are left to :func:`misplaced`."""
    names = list(layers)
    placed = {m: found[0] for m in graph if len(found := layer_of(m, layers)) == 1}
    return [
        f"{module} ({names[placed[module]]}) -> {target} ({names[placed[target]]})"
        for module, imported in sorted(graph.items())
        for target in sorted(imported)
        if module in placed and target in placed and placed[target] < placed[module]
    ]


def misplaced(graph: Graph, layers: Mapping[str, Sequence[str]]) -> list[str]:
    """Modules that no layer, or more than one, places."""
    return [m for m in sorted(graph) if len(layer_of(m, layers)) != 1]


def test_every_module_sits_in_exactly_one_layer():
    assert misplaced(import_graph(ROOT / "src", "acert"), LAYERS) == []


def test_the_package_has_no_import_circle():
    found = circles(import_graph(ROOT / "src", "acert"))
    assert found == []


def test_no_import_points_up_the_layers():
    assert upward_arrows(import_graph(ROOT / "src", "acert"), LAYERS) == []


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))


def test_the_checks_report_planted_circles_and_upward_arrows(tmp_path: Path):
    layers = {
        "top": ("pkg", "pkg.radius"),
        "middle": ("pkg.bounds", "pkg.bounds.*"),
        "bottom": ("pkg.models", "pkg.errors"),
    }
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/errors.py": "",
            "pkg/radius.py": "from pkg.bounds import ibp\nimport pkg.errors\n",
            "pkg/bounds/__init__.py": "from . import ibp\nfrom .ibp import rule\n",
            "pkg/bounds/ibp.py": "from ..models import Net\n\ndef rule():\n    pass\n",
            "pkg/bounds/spec.py": "",
            "pkg/models.py": "from pkg.errors import Error\n",
        },
    )
    clean = import_graph(tmp_path, "pkg")
    assert clean == {
        "pkg": set(),
        "pkg.bounds": {"pkg.bounds.ibp"},
        "pkg.bounds.ibp": {"pkg.models"},
        "pkg.bounds.spec": set(),
        "pkg.errors": set(),
        "pkg.models": {"pkg.errors"},
        "pkg.radius": {"pkg.bounds.ibp", "pkg.errors"},
    }
    assert circles(clean) == []
    assert upward_arrows(clean, layers) == []
    assert misplaced(clean, layers) == []

    _write(
        tmp_path,
        {
            # a lazy import: a circle across layers, and its upward arrow
            "pkg/bounds/ibp.py": """\
                from ..models import Net

                def rule():
                    from pkg import radius
            """,
            # a type-only import: a circle inside one layer
            "pkg/errors.py": """\
                from typing import TYPE_CHECKING

                if TYPE_CHECKING:
                    from pkg.models import Net
            """,
            # an upward arrow without a circle
            "pkg/models.py": """\
                from pkg.errors import Error

                def net():
                    from .bounds.spec import margin
            """,
            "pkg/extra.py": "",
        },
    )
    planted = import_graph(tmp_path, "pkg")
    assert circles(planted) == [["pkg.bounds.ibp", "pkg.radius"], ["pkg.errors", "pkg.models"]]
    assert upward_arrows(planted, layers) == [
        "pkg.bounds.ibp (middle) -> pkg.radius (top)",
        "pkg.models (bottom) -> pkg.bounds.spec (middle)",
    ]
    assert misplaced(planted, layers) == ["pkg.extra"]


# ---------------------------------------------------------------------- the documented layout
def layout_entries(architecture: str) -> list[tuple[str, str]]:
    """(layer, file relative to src/acert/) of each file the Layout block of
    docs/ARCHITECTURE.md lists: entries begin with their name (a ``dir/`` nests the lines indented
    under it), a line ``── layer ──`` opens a layer, other lines continue a description."""
    block = architecture.split("## Layout", 1)[1].split("```\n", 1)[1].split("```", 1)[0]
    entries, folders, layer = [], [], ""
    for line in block.splitlines()[1:]:
        name = line.split()[0] if line.strip() else ""
        depth = (len(line) - len(line.lstrip(" "))) // 2
        if name == "──":
            layer = line.strip(" ─")
        elif name.endswith("/"):
            folders = [*folders[: depth - 1], name]
        elif name.endswith(".py"):
            entries.append((layer, "".join(folders[: depth - 1]) + name))
    return entries


def test_the_architecture_layout_lists_every_module_in_its_layer():
    entries = layout_entries((ROOT / "docs" / "ARCHITECTURE.md").read_text())
    files = sorted(str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py"))
    assert sorted(file for _, file in entries) == files
    names = list(LAYERS)
    modules = package_modules(ROOT / "src", "acert")
    by_file = {str(path.relative_to(PACKAGE)): module for module, path in modules.items()}
    misfiled = [
        (file, layer)
        for layer, file in entries
        if [names[i] for i in layer_of(by_file[file], LAYERS)] != [layer]
    ]
    assert misfiled == []


def test_the_architecture_diagram_shows_the_layers_in_order():
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    diagram = text.split("```mermaid\n", 1)[1].split("```", 1)[0]
    positions = [diagram.find(f"<b>{name}</b>") for name in LAYERS]
    assert -1 not in positions and positions == sorted(positions)


# ------------------------------------------------------------------------ folders show floors
def test_the_package_top_holds_folders_and_few_files_none_private():
    entries = sorted(
        p.name for p in PACKAGE.iterdir() if p.name != "__pycache__" and not p.name.endswith(".pyc")
    )
    assert len(entries) <= 15, entries
    private = [name for name in entries if name.startswith("_") and name not in _DUNDER]
    assert private == []


_DUNDER = {"__init__.py", "__main__.py"}


def test_every_layer_but_the_top_is_folders():
    modules = package_modules(ROOT / "src", "acert")
    flat = sorted(m for m in modules if m.count(".") == 1 and not (PACKAGE / f"{m[6:]}").is_dir())
    assert flat == ["acert.__main__", "acert.api"]


def test_an_old_module_path_warns_and_is_the_module_of_the_new_path():
    import subprocess
    import sys

    script = textwrap.dedent(
        """
        import warnings
        warnings.simplefilter("error", DeprecationWarning)
        try:
            import acert.evaluate
        except DeprecationWarning as warning:
            print("warned:", warning)
        warnings.simplefilter("ignore", DeprecationWarning)
        import acert.evaluate as old
        import acert.evaluation.evaluate as new
        from acert.errors import AcertError
        from acert.foundation.errors import AcertError as moved
        print("same:", old is new and AcertError is moved)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert "warned: acert.evaluate moved to acert.evaluation.evaluate" in result.stdout
    assert "same: True" in result.stdout


CROSS_CUTTING_TESTS = {
    "test_api.py",  # the front door (acert/api.py sits at the top of the package too)
    "test_api_graphs.py",  # networks of one's own through acert.fit and acert.certify
    "test_api_inputs.py",
    "test_end_to_end.py",  # a run from the command line to its certificates
    "test_faults.py",  # a killed or failing run, whatever floor it fails in
    "test_input_errors.py",  # bad input at every public entry
    "test_repository.py",
}


def test_the_tests_mirror_the_package_folder_by_folder():
    tests = ROOT / "tests"
    folders = {
        path.relative_to(tests).as_posix()
        for path in tests.rglob("test_*.py")
        if path.parent != tests and path.parts[-2] != "kit"
    }
    folders = {folder.rpartition("/")[0] for folder in folders}
    missing = sorted(f for f in folders if not (PACKAGE / f).is_dir())
    assert missing == [], f"test folders without a package folder of that path: {missing}"
    at_top = sorted(p.name for p in tests.glob("test_*.py"))
    assert sorted(CROSS_CUTTING_TESTS) == at_top
