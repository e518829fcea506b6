"""The README's layout list names every module of the package, and nothing that does not exist."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _listed() -> list[str]:
    text = (ROOT / "README.md").read_text()
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
    assert not unlisted, f"modules missing from the README layout list: {sorted(unlisted)}"
    assert not missing, f"README layout entries with no such file: {missing}"
    assert len(listed) == len(set(listed)), "an entry is listed twice"
