"""The write-ups match their files: the verdicts table is regenerated from the stored studies, every claims
row quoted in docs/reproduction.md is a row of a stored study's claims table, and no Markdown file of the
repository (README, docs, stored results) links a file that is not there."""

import re
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

from reproduction_verdicts import OUT, studies, verdicts_markdown  # noqa: E402

from aft_jax.study.report import claims_table  # noqa: E402

LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_verdicts_md_is_generated_from_the_stored_studies():
    assert OUT.read_text() == verdicts_markdown(studies()), "run python benchmarks/reproduction_verdicts.py"


def test_every_claims_row_of_the_docs_is_a_stored_study_row():
    rows = {line for study in studies().values() for line in claims_table(study).splitlines()[2:]}
    text = (REPO / "docs" / "reproduction.md").read_text()
    quoted = [line for line in text.splitlines() if re.match(r"\| \d+\. .* \| \*\*[a-z]+\*\* \|$", line)]
    assert quoted, "docs/reproduction.md quotes the claims tables"
    assert [line for line in quoted if line not in rows] == []


def test_no_markdown_file_links_a_missing_file():
    files = [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "benchmarks" / "results").rglob("*.md")]
    missing = []
    for md in files:
        for target in LINK.findall(md.read_text()):
            path = target.split("#")[0]
            if not path or re.match(r"[a-z]+:", path):
                continue
            if not (md.parent / path).exists():
                missing.append(f"{md.relative_to(REPO)}: {target}")
    assert missing == []
