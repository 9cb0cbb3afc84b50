"""The built site as a reader sees it, in headless Chromium (run by ``make docs``).

Every page of ``site/`` is opened from disk (``file://``, as someone holding only the built
site opens it) at 1280 and 390 px wide, and each problem is one line:

* a code block or table wider than its column at 1280 px (a comment or column cut off);
* a page wider than the screen at 390 px (tables and code must scroll inside themselves);
* a figure shown below half its pixel width: its labels are then too small to read (listed
  as a warning, not yet a failure: the studies' figures are still drawn for a wider page);
* a formula that KaTeX did not render;
* a request that leaves the site (the site must work offline), a file that does not load,
  or a script error.

Where Chromium or playwright is missing, it says so in one line and passes: the static
checks (``check_site.py``) still run. ``CHROMIUM`` names the browser if it is not on PATH.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

from check_site import SITE, pages  # the same pages the static checks read

try:
    from playwright.sync_api import Error, sync_playwright
except ImportError:  # main() says so and skips
    sync_playwright = None
    Error = Exception

WIDTHS = (1280, 390)

# What overflows, measured in the page: Material wraps each table in a scrolling
# .md-typeset__scrollwrap and gives code blocks their own scrollbar.
MEASURE = """() => {
  const problems = [];
  const name = (el) => {
    const text = (el.textContent || "").trim().split("\\n")[0];
    return text.length > 60 ? text.slice(0, 57) + "..." : text;
  };
  for (const code of document.querySelectorAll("article pre > code")) {
    if (code.scrollWidth > code.clientWidth + 1)
      problems.push(`code block ${code.scrollWidth - code.clientWidth} px too wide: ` +
                    `"${name(code)}"`);
  }
  for (const table of document.querySelectorAll("article table")) {
    const box = table.closest(".md-typeset__scrollwrap") || table.parentElement;
    if (table.scrollWidth > box.clientWidth + 1)
      problems.push(`table ${table.scrollWidth - box.clientWidth} px too wide: ` +
                    `"${name(table.rows[0])}"`);
  }
  for (const formula of document.querySelectorAll(".arithmatex")) {
    if (!formula.querySelector(".katex"))
      problems.push(`formula not rendered: "${name(formula)}"`);
  }
  const images = [...document.querySelectorAll("article img")].map(
    (img) => ({src: img.currentSrc || img.src, shown: img.getBoundingClientRect().width,
               drawn: img.naturalWidth, complete: img.complete && img.naturalWidth > 0}));
  return {problems, images, page: document.documentElement.scrollWidth,
          screen: window.innerWidth};
}"""


RENDERED = """() => [...document.querySelectorAll(".arithmatex")]
                    .every((formula) => formula.querySelector(".katex"))"""


def page_problems(browser, page_path: Path) -> tuple[list[str], list[str]]:
    """Every problem of one page, at each width, and its figures shown too small."""
    problems: list[str] = []
    small: list[str] = []
    note = problems.append

    def request(r) -> None:
        if urlsplit(r.url).scheme not in ("file", "data", "blob", "about"):
            note(f"request leaves the site: {r.url}")

    for width in WIDTHS:
        context = browser.new_context(viewport={"width": width, "height": 900})
        page = context.new_page()
        page.on("request", request)
        page.on("requestfailed", lambda r: note(
            f"does not load: {unquote(urlsplit(r.url).path)}"))
        page.on("pageerror", lambda e: note(f"script error: {e}"))
        page.goto(page_path.as_uri(), wait_until="load")
        # KaTeX renders once the page's scripts have run; if it never does, MEASURE says so.
        with contextlib.suppress(Error):
            page.wait_for_function(RENDERED, timeout=5000)
        seen = page.evaluate(MEASURE)
        context.close()
        if width >= 1280:
            problems.extend(seen["problems"])
            for image in seen["images"]:
                url = urlsplit(image["src"])
                name = "a notebook figure" if url.scheme == "data" else \
                    Path(unquote(url.path)).name
                if not image["complete"]:
                    note(f"image does not load: {name}")
                elif image["shown"] < image["drawn"] / 2:
                    small.append(f"{name} shown at {image['shown']:.0f} of its "
                                 f"{image['drawn']} px ({image['shown'] / image['drawn']:.0%})")
        elif seen["page"] > seen["screen"] + 1:
            note(f"at {width} px the page is {seen['page'] - seen['screen']} px "
                 f"wider than the screen")
    return list(dict.fromkeys(problems)), list(dict.fromkeys(small))


def main() -> int:
    if sync_playwright is None:
        print("check_browser: skipped: playwright is not installed (pip install playwright)")
        return 0
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") \
        or shutil.which("chromium-browser")
    if chromium is None:
        print("check_browser: skipped: no Chromium (apt-get install chromium, or set CHROMIUM)")
        return 0
    found_pages = pages()
    if not found_pages:
        print("check_browser: no site/ to check: run mkdocs build first", file=sys.stderr)
        return 1
    found = 0
    with sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=chromium)
        except Error as exc:
            print(f"check_browser: skipped: Chromium does not start ({str(exc).splitlines()[0]})")
            return 0
        small = 0
        for path in found_pages:
            problems, too_small = page_problems(browser, path)
            for problem in problems:
                print(f"{path.relative_to(SITE)}: {problem}")
            for figure in too_small:
                print(f"{path.relative_to(SITE)}: warning: figure {figure}")
            found, small = found + len(problems), small + len(too_small)
        browser.close()
    print(f"check_browser: {len(found_pages)} pages at {' and '.join(map(str, WIDTHS))} px, "
          f"{found} problem(s); {small} figure(s) shown below half their pixel width, "
          f"whose labels are then too small to read (a warning until every figure is "
          f"drawn for the text column)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
