"""The layout list of docs/architecture.md names every module of the package, and nothing that does not exist."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _listed() -> list[str]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text[text.index("## Layout\n") :]
    return re.findall(r"^    (aft_jax/\S+)", section, re.M)


def test_layout_list_matches_the_package():
    listed = _listed()
    folders = [entry for entry in listed if entry.endswith("/")]
    modules = {
        str(p.relative_to(ROOT))
        for p in (ROOT / "aft_jax").rglob("*.py")
        if p.name != "__init__.py" or p.parent == ROOT / "aft_jax"
    } - {"aft_jax/__init__.py"}
    unlisted = {m for m in modules if m not in listed and not any(m.startswith(f) for f in folders)}
    missing = [entry for entry in listed if not (ROOT / entry).exists()]
    assert not unlisted, f"modules missing from the layout list of docs/architecture.md: {sorted(unlisted)}"
    assert not missing, f"docs/architecture.md layout entries with no such file: {missing}"
    assert len(listed) == len(set(listed)), "an entry is listed twice"


def _module_of(entry: str) -> str:
    return entry.removesuffix(".py").removesuffix("/").replace("/", ".")


def test_each_module_imports_only_layers_listed_before_it():
    import ast

    order = [_module_of(e) for e in _listed()]

    def position(module: str) -> int:
        matches = [i for i, m in enumerate(order) if module == m or module.startswith(m + ".")]
        return matches[0] if matches else -1

    wrong = []
    for path in (ROOT / "aft_jax").rglob("*.py"):
        own = _module_of(str(path.relative_to(ROOT)))
        if own.endswith("__init__"):
            continue
        folder = own.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("aft_jax."):
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                target = next((t for t in reversed(targets) if position(t) >= 0), node.module)
                same_folder = target.rpartition(".")[0] == folder or target.startswith(folder + ".")
                if not same_folder and position(target) > position(own):
                    wrong.append(f"{own} imports {target}")
    assert not wrong, "imports of a layer listed later in the docs/architecture.md layout: " + "; ".join(sorted(wrong))
