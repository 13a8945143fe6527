"""The project's modules import each other without a cycle: each file can be read (and imported)
after the ones it depends on, whether an import sits at the top of a file or inside a function."""
import ast
import os

from conftest import ROOT


def project_modules() -> dict[str, str]:
    """Module name -> file, for every .py file of the repository (data/chat.py is data.chat)."""
    modules = {}
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
        for name in files:
            if name.endswith(".py"):
                parts = os.path.relpath(os.path.join(folder, name), ROOT)[:-len(".py")].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                modules[".".join(parts)] = os.path.join(folder, name)
    return modules


def imported_names(path: str, module: str) -> set[str]:
    """Every module name an import statement anywhere in the file could mean: `import a.b` -> a, a.b;
    `from a import b` -> a, a.b (b may be a module); relative imports resolved against `module`."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    package = module.split(".")[:-1] if not path.endswith("__init__.py") else module.split(".")
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            base = ".".join(base + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{alias.name}" if base else alias.name for alias in node.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return names


def import_graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports. A name is looked up from the repository
    root (as the scripts run) and from the importing file's own folder (as a script there runs:
    tests import conftest, bench scripts each other)."""
    modules = project_modules()
    graph = {}
    for module, path in modules.items():
        folder = os.path.relpath(os.path.dirname(path), ROOT).replace(os.sep, ".")
        prefixes = [""] + ([f"{folder}."] if folder != "." else [])
        graph[module] = {prefix + name for name in imported_names(path, module) for prefix in prefixes
                         if prefix + name in modules and prefix + name != module}
        # a package's __init__ runs before its modules; importing data.x also imports data, never a cycle by itself
        graph[module] = {m for m in graph[module] if not module.startswith(m + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None: a depth-first search that meets a module still on its path."""
    state, path = {}, []

    def visit(module):
        state[module] = "on path"
        path.append(module)
        for dep in sorted(graph[module]):
            if state.get(dep) == "on path":
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_the_project_modules_import_each_other_without_a_cycle():
    graph = import_graph()
    assert {"common", "export_hf", "hf_import", "model", "data.tokenizer"} <= graph.keys()
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_hugging_face_import_sits_below_the_core_and_the_export():
    graph = import_graph()
    assert "hf_import" in graph["common"] and "hf_import" in graph["export_hf"]
    assert "common" in graph["export_hf"]


def test_the_cycle_search_finds_a_cycle_through_an_import_inside_a_function(tmp_path):
    # the search itself: two modules that import each other, one of them only inside a function
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from a import g\n")
    graph = {m: {n for n in imported_names(str(tmp_path / f"{m}.py"), m) if n in ("a", "b") and n != m}
             for m in ("a", "b")}
    assert find_cycle(graph) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
