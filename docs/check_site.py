"""Checks of the built site that mkdocs --strict does not make (run by ``make docs``).

Strict mode checks the Markdown's links, not the notebook page's, and nothing of what a
reader sees. This reads the built HTML under ``site/`` and fails, one line per problem, on:

* a local link or image that does not resolve (a file, or an anchor on its page);
* a machine's folder (``/work/...``, ``/tmp/...``, ``/home/...``) or the word "issue" on a
  page for users (the contributors' pages may speak of both);
* a line of the API or CLI reference's code blocks wider than the page's code column;
* a README that says ``make demo`` runs something the Makefile does not;
* a script, style sheet, font or image loaded from another host.
"""

from __future__ import annotations

import html
import re
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / "site"
CONTRIBUTORS = {"architecture", "testing", "performance", "tuning"}
CODE_COLUMNS = 80
MACHINE = re.compile(r"(?<![\w.])/(?:work|tmp|home|root)/[\w.+-]")
ISSUE = re.compile(r"\bissues?\b", re.IGNORECASE)


def pages() -> list[Path]:
    """Every page but the search index and the 404 page (its links are absolute, to the
    site's root wherever it is served)."""
    return sorted(p for p in SITE.rglob("*.html")
                  if "search" not in p.parts and p.name != "404.html")


def visible_text(page: str, between_tags: str = " ") -> str:
    """The page's text as shown: no scripts, styles or tags (in code, tags sit inside
    words: join them with ``between_tags=""``)."""
    page = re.sub(r"<(script|style)\b.*?</\1>", " ", page, flags=re.S)
    return html.unescape(re.sub(r"<[^>]+>", between_tags, page))


def broken_links(path: Path, page: str, ids: dict[Path, set[str]]) -> list[str]:
    problems = []
    for attribute, target in re.findall(r'\b(href|src)="([^"]+)"', page):
        url = urlsplit(html.unescape(target))
        if url.scheme or url.netloc or target.startswith(("mailto:", "data:", "javascript:")):
            continue
        file = (path.parent / unquote(url.path)).resolve() if url.path else path
        if file.is_dir():
            file = file / "index.html"
        if not file.exists():
            problems.append(f"{path.relative_to(SITE)}: {attribute} {target} does not exist")
        elif url.fragment and file.suffix == ".html":
            if file not in ids:
                ids[file] = set(re.findall(r'\bid="([^"]+)"', file.read_text(errors="ignore")))
            if unquote(url.fragment) not in ids[file]:
                problems.append(f"{path.relative_to(SITE)}: no anchor #{url.fragment} on "
                                f"{file.relative_to(SITE)}")
    return problems


def words(path: Path, page: str) -> list[str]:
    top = path.relative_to(SITE).parts[0].removesuffix(".html")  # X.html, or X/index.html
    if top in CONTRIBUTORS:
        return []
    text = visible_text(page)
    problems = []
    problems += [f"{path.relative_to(SITE)}: shows a machine's folder: {m.group(0)}..."
                 for m in MACHINE.finditer(text)]
    problems += [f"{path.relative_to(SITE)}: speaks of '{m.group(0)}' to users"
                 for m in ISSUE.finditer(text)]
    return problems


def wide_code(path: Path, page: str) -> list[str]:
    if path.relative_to(SITE).parts[:1] != ("reference",):
        return []
    problems = []
    for block in re.findall(r"<pre\b.*?</pre>", page, flags=re.S):
        for line in visible_text(block, between_tags="").splitlines():
            if len(line.rstrip()) > CODE_COLUMNS:
                problems.append(f"{path.relative_to(SITE)}: a code line of "
                                f"{len(line.rstrip())} > {CODE_COLUMNS} columns: "
                                f"{line.strip()[:40]}...")
    return problems


def demo_sentence() -> list[str]:
    """The README may say what `make demo` runs only as the Makefile has it."""
    recipe = re.search(r"^demo:.*\n\t(.+)$", (ROOT / "Makefile").read_text(), re.M)
    runs = recipe.group(1).replace("$(BIN)/", "").replace(" $(ARGS)", "").strip()
    readme = (ROOT / "README.md").read_text()
    said = re.findall(r"`make demo` runs[^`]*`([^`]+)`", readme)
    return [f"README.md: says `make demo` runs `{s}`; the Makefile runs `{runs}`"
            for s in said if s.split() != runs.split()]


def outside_requests(path: Path, page: str) -> list[str]:
    """What a browser would fetch from another host to show the page (a script, a style
    sheet, a font, an image): the site must work offline and from file://."""
    fetched = re.findall(r'<(?:script|img|iframe)\b[^>]*\bsrc="(https?:)?//([^/"]+)', page)
    fetched += re.findall(r'<link\b[^>]*\brel="(?:stylesheet|preconnect|preload|icon)"[^>]*'
                          r'\bhref="(https?:)?//([^/"]+)', page)
    fetched += re.findall(r'@import\s+url\((https?:)?//([^/)]+)', page)
    return [f"{path.relative_to(SITE)}: loads from {host}" for _, host in fetched]


def main() -> int:
    if not SITE.is_dir():
        print("site/ is missing: build it first (make docs)", file=sys.stderr)
        return 2
    ids: dict[Path, set[str]] = {}
    problems = demo_sentence()
    for path in pages():
        page = path.read_text(errors="ignore")
        problems += (broken_links(path, page, ids) + words(path, page) + wide_code(path, page)
                     + outside_requests(path, page))
    for line in problems:
        print(line, file=sys.stderr)
    print(f"check_site: {len(pages())} pages, {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
