"""The package's folders follow the flow: no stage imports a later one (docs/design.md §1).

Stages, in order: data, models, activations, architectures, evaluation, training,
analysis, interventions. Beside them: the side modules every stage may use, ``formats``
(SAE files; it knows the architectures), and the two front ends, ``cli/`` (which may use
everything) and ``serve/`` (the explorer page: everything but the CLI). One side
reaches into a stage: ``config`` finds each architecture's config class in the registry of
``sae.architectures`` (the run config's sae section is one of them).
"""

import ast
from pathlib import Path

SAE = Path(__file__).parent.parent / "sae"
STAGES = [
    "data",
    "models",
    "activations",
    "architectures",
    "evaluation",
    "training",
    "analysis",
    "interventions",
]
SIDES = {"config", "errors", "atomic_io", "folder_lock", "distributed", "hub"}


def imports_of(path: Path) -> set[str]:
    """Every ``sae.*`` module ``path`` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sae":
            found |= (
                {f"sae.{a.name}" for a in node.names} if node.module == "sae" else {node.module}
            )
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "sae"}
    return found


def place(module: str) -> str:
    """The stage or side a module belongs to: its first name under sae."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "sae"


def may_import(importer: str, imported: str) -> bool:
    if imported in SIDES or importer == imported:
        return True
    if importer == "config":
        return imported == "architectures"
    if importer in SIDES:
        return False
    if importer == "cli":
        return True
    if importer == "serve":
        return imported != "cli"
    if importer == "formats":
        return imported == "architectures"
    if imported == "formats":
        return STAGES.index(importer) >= STAGES.index("architectures")
    return imported in STAGES and STAGES.index(imported) <= STAGES.index(importer)


def test_no_stage_imports_a_later_one():
    broken = []
    for path in sorted(SAE.rglob("*.py")):
        module = ".".join(path.relative_to(SAE.parent).with_suffix("").parts).removesuffix(
            ".__init__"
        )
        if module == "sae":
            continue  # the package's lazy re-exports
        for imported in imports_of(path):
            if not may_import(place(module), place(imported)):
                broken.append(f"{module} imports {imported}")
    assert broken == []


def test_every_module_sits_in_a_stage_or_a_side():
    top = {p.stem for p in SAE.glob("*.py")} - {"__init__"}
    folders = {p.name for p in SAE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert top <= SIDES, top - SIDES
    beside = {"formats", "cli", "serve"}
    assert folders == set(STAGES) | beside, folders ^ (set(STAGES) | beside)


def test_the_hooks_load_without_the_datasets_library():
    """Hooking a model needs no dataset: a script that only captures activations should not
    pay for importing `datasets` (nor depend on it)."""
    import subprocess
    import sys

    code = "import sys, sae.activations.hooks, sae.models.loading; print('datasets' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


def test_no_function_is_longer_than_60_lines():
    """The style rule, counted from ``def`` to the last line (decorators not included)."""
    long = []
    for path in sorted(SAE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    long.append(
                        f"{path.relative_to(SAE.parent)}:{node.lineno} {node.name} ({lines} lines)"
                    )
    assert long == []
