"""What the documentation site takes from the repository at build time, so it cannot drift:

* the executed notebook, as the tutorial page (``notebooks/normalization_study.ipynb``, not
  re-executed);
* every committed result figure and record, at the same paths under ``results/`` and
  ``benchmarks/results/`` (the pages link to them as ``../results/...``, as the repository
  holds them, and are rewritten to the copies);
* ``<!-- report: results/NAME -->``: that folder's report.md, rendered from its record by
  normlab itself, with its figure links pointing at the copies above;
* ``<!-- cli-reference -->``: the ``--help`` of every ``normlab`` command, from its parser;
* the notebook's links to ``../docs/*.md``, pointed at those pages of the site;
* every figure a link to itself, so that it opens full size.

``make docs`` then runs ``docs/check_site.py`` on the built site.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
REPORT = re.compile(r"<!-- report: (\S+) -->")
NOTEBOOK = ROOT / "notebooks" / "normalization_study.ipynb"


@event_priority(100)  # before mkdocs-jupyter looks for notebooks
def on_files(files: Files, config) -> Files:
    # A file of its own folder (not a generated one), which mkdocs-jupyter can re-read.
    files.append(File(NOTEBOOK.name, src_dir=str(NOTEBOOK.parent), dest_dir=config["site_dir"],
                      use_directory_urls=config["use_directory_urls"]))
    for folder in ("results", "benchmarks/results"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in (".png", ".json"):
                files.append(File.generated(config, str(path.relative_to(ROOT)),
                                            abs_src_path=str(path)))
    return files


def on_page_markdown(markdown: str, page, config, files: Files) -> str:
    depth = page.file.src_uri.count("/")
    # The pages link to results as the repository holds them (../results/... from docs/),
    # so that they also read right on GitHub; in the site those files sit inside it.
    markdown = re.sub(r"\]\(" + re.escape("../" * (depth + 1)) + r"(results/|benchmarks/results/)",
                      lambda m: "](" + "../" * depth + m.group(1), markdown)
    markdown = REPORT.sub(lambda m: _folded(m.group(1), _report(m.group(1), "../" * depth)),
                          markdown)
    # Figures open full size when clicked (they are drawn at 100-110 dpi, shown smaller).
    markdown = re.sub(r"(?<!\[)!\[([^\]]*)\]\(([^)\s]+\.png)\)", r"[![\1](\2)](\2)", markdown)
    if "<!-- cli-reference -->" in markdown:
        markdown = markdown.replace("<!-- cli-reference -->", _cli_reference())
    return markdown


SHIM = "https://unpkg.com/iframe-worker/shim"  # what the offline plugin would load


def on_post_page(output: str, page, config) -> str:
    """The notebook links to the docs as the repository holds them (``../docs/X.md`` from
    notebooks/, right on GitHub); on the site that page is ``X.html`` beside it (``X/``
    with directory URLs)."""
    if page.file.src_uri == NOTEBOOK.name:
        def site(m: re.Match) -> str:
            target = f"{m.group(1)}/" if config["use_directory_urls"] else f"{m.group(1)}.html"
            up = "../" if config["use_directory_urls"] else ""
            return f'href="{up}{target}{m.group(2) or ""}"'

        output = re.sub(r'href="\.\./docs/([\w/-]+)\.md(#[^"]*)?"', site, output)
    # Search from file:// without another host: the shim the offline plugin names, served
    # from the site (docs/assets/javascripts/).
    up = "../" * page.file.dest_uri.count("/")
    return output.replace(f'src="{SHIM}"', f'src="{up}assets/javascripts/iframe-worker-shim.js"')


def _folded(folder: str, report: str) -> str:
    """A report, folded: the page above it shows the highlights, the report every number;
    open, it would show the page's tables and figures a second time."""
    body = "\n".join("    " + line if line else "" for line in report.splitlines())
    return f'??? abstract "The whole report, every run and number ({folder}/report.md)"\n\n{body}\n'


def _report(folder: str, up: str) -> str:
    """``folder``'s report.md without its title, its headings two levels down, and its links
    to files beside it pointing at their copies in the site."""
    text = (ROOT / folder / "report.md").read_text()
    lines = text.splitlines()[1:]  # the page has its own title
    # Two levels down (## -> ####): below the page's own headings and out of its table of
    # contents (toc_depth 3), which lists the page's sections, not the report's.
    text = "\n".join("##" + line if line.startswith("#") else line for line in lines)
    return re.sub(r"\]\((?!https?:|#)([^)]+)\)", lambda m: f"]({up}{folder}/{m.group(1)})", text)


def _cli_reference() -> str:
    from normlab.cli import build_parser

    # argparse wraps help to the terminal: a fixed width that fits the page's code column.
    os.environ["COLUMNS"] = "80"
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    parts = ["```text", _help(parser), "```", ""]
    for name, sub in commands.items():
        parts += [f"## normlab {name}", "", "```text", _help(sub), "```", ""]
    return "\n".join(parts)


def _help(parser) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        parser.print_help()
    return out.getvalue().rstrip()
