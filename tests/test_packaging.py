"""Every third-party module jreml imports is a declared dependency (a fresh `pip install .` must work)."""

import ast
import pathlib
import re
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
# distribution name -> import name where they differ
IMPORT_NAMES = {"jaxlib": "jaxlib"}


def declared_modules() -> set[str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!~\[ ;]", d, maxsplit=1)[0].strip().lower() for d in deps}
    return {IMPORT_NAMES.get(n, n).replace("-", "_") for n in names}


def imported_modules() -> dict[str, str]:
    found = {}
    for path in (ROOT / "jreml").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return found


def test_third_party_imports_are_declared_dependencies():
    declared = declared_modules()
    missing = {
        mod: where
        for mod, where in imported_modules().items()
        if mod not in sys.stdlib_module_names and mod != "jreml" and mod not in declared
    }
    assert not missing, f"imported but not in [project].dependencies: {missing}"
