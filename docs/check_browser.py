"""The built site as a reader sees it, in headless Chromium (run by ``make docs``).

Every page of ``site/`` is opened from disk (``file://``, as someone holding only the built
site opens it) at 1280 and 390 px wide, and each problem is one line:

* a code block or table wider than its column at 1280 px (a comment or column cut off);
* a page wider than the screen at 390 px (tables and code must scroll inside themselves);
* a figure shown below half the width it was drawn at (its width in inches, from the PNG's
  resolution, at the browser's 96 px per inch): its labels would be too small to read;
* a request that leaves the site (the site must work offline), a file that does not load,
  or a script error.

Where Chromium or playwright is missing, it says so in one line and passes: the static
checks (``check_site.py``) still run. ``CHROMIUM`` names the browser if it is not on PATH.
"""

from __future__ import annotations

import os
import shutil
import struct
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / "site"
WIDTHS = (1280, 390)
CSS_PX_PER_INCH = 96

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
  const images = [...document.querySelectorAll("article img")].map(
    (img) => ({src: img.currentSrc || img.src, shown: img.getBoundingClientRect().width,
               complete: img.complete && img.naturalWidth > 0}));
  return {problems, images, page: document.documentElement.scrollWidth,
          screen: window.innerWidth};
}"""


def png_inches(path: Path) -> float | None:
    """A PNG's width in inches from its pHYs chunk (matplotlib writes its dpi there)."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    width = struct.unpack(">I", data[16:20])[0]
    at = 8
    while at + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        if kind == b"pHYs":
            per_metre, _, unit = struct.unpack(">IIB", data[at + 8:at + 17])
            return width / (per_metre * 0.0254) if unit == 1 and per_metre else None
        if kind == b"IDAT":
            return None
        at += length + 12
    return None


def page_problems(browser, page_path: Path) -> list[str]:
    """Every problem of one page, at each width."""
    problems: list[str] = []
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
        seen = page.evaluate(MEASURE)
        context.close()
        if width >= 1280:
            problems.extend(seen["problems"])
            for image in seen["images"]:
                local = Path(unquote(urlsplit(image["src"]).path))
                inches = png_inches(local) if image["complete"] else None
                if not image["complete"]:
                    note(f"image does not load: {local.name}")
                elif inches and image["shown"] < inches * CSS_PX_PER_INCH / 2:
                    drawn = inches * CSS_PX_PER_INCH
                    note(f"{local.name} shown at {image['shown']:.0f} px, "
                                    f"{image['shown'] / drawn:.0%} of the {drawn:.0f} px "
                                    f"it was drawn for")
        elif seen["page"] > seen["screen"] + 1:
            note(f"at {width} px the page is {seen['page'] - seen['screen']} px "
                            f"wider than the screen")
    return list(dict.fromkeys(problems))


def main() -> int:
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        print("check_browser: skipped: playwright is not installed (pip install playwright)")
        return 0
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") \
        or shutil.which("chromium-browser")
    if chromium is None:
        print("check_browser: skipped: no Chromium (apt-get install chromium, or set CHROMIUM)")
        return 0
    pages = sorted(p for p in SITE.rglob("*.html")
                   if "search" not in p.parts and p.name != "404.html")
    if not pages:
        print("check_browser: no site/ to check: run mkdocs build first", file=sys.stderr)
        return 1
    found = 0
    with sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=chromium)
        except Error as exc:
            print(f"check_browser: skipped: Chromium does not start ({str(exc).splitlines()[0]})")
            return 0
        for path in pages:
            for problem in page_problems(browser, path):
                print(f"{path.relative_to(SITE)}: {problem}")
                found += 1
        browser.close()
    print(f"check_browser: {len(pages)} pages at {' and '.join(map(str, WIDTHS))} px, "
          f"{found} problem(s)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
