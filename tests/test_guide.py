"""The guide's decisions and the simulation table are generated, never written by hand:
what is committed in the pages is what the generators make from the committed records."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from normlab import simulate

ROOT = Path(__file__).resolve().parent.parent


def test_the_guide_readme_and_home_show_the_committed_decisions():
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "guide.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_simulation_table_on_the_page_is_the_committed_record():
    record = json.loads((ROOT / "results" / "decide" / "simulation.json").read_text())
    assert simulate.markdown(record) in (ROOT / "docs" / "recommend.md").read_text()
    assert all(r["false_claims"] <= 0.05 + 3 * (0.05 * 0.95 / record["replicates"]) ** 0.5
               for r in record["one_look"].values())


def test_no_page_calls_not_shown_different_the_same():
    """The words that claim sameness appear on no user page (none shows an equivalence by
    those words; "within 0.5 points" is the one that does)."""
    import re

    words = re.compile(r"tied (first|for first)|wins? back (nothing|none)|none (is )?reversed|"
                       r"keeps? (its|their) place|directions agree", re.IGNORECASE)
    pages = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]
    found = [f"{p.name}: {m.group(0)}" for p in pages for m in words.finditer(p.read_text())]
    assert not found, found


def test_the_citation_page_cites_the_version_citation_cff_and_the_package_name():
    """The BibTeX on the citation page is written by hand: its version must be the one
    CITATION.cff and the package declare."""
    import re

    import normlab

    page = (ROOT / "docs" / "citation.md").read_text()
    cff = (ROOT / "CITATION.cff").read_text()
    cited = re.search(r"version = \{([^}]+)\}", page).group(1)
    assert cited == re.search(r"^version: (\S+)", cff, re.M).group(1) == normlab.__version__
