"""Checks the built site renders its math offline: `python docs/check_site.py [SITE_DIR]`.

Run by `nox -s docs` after `mkdocs build`. For every page: the formulas sit in arithmatex
containers (which the bundled KaTeX renders on page load), no raw TeX delimiter is left in the
text outside them or outside code, and no script or stylesheet comes from the network. Pages with
math load KaTeX, its auto-render and the site's hook from the site itself, and those files and the
fonts KaTeX's stylesheet names in woff2 exist.
"""

import re
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin

KATEX = ("assets/katex/katex.min.js", "assets/katex/contrib/auto-render.min.js",
         "javascripts/katex.js", "assets/katex/katex.min.css")
RAW_TEX = re.compile(r"\\\(|\\\)|\\\[|\\\]|\$\$|\$[^$\s][^$]*\$")
SKIP = {"code", "pre", "script", "style", "textarea"}


class Page(HTMLParser):
    """Collects a page's math, the text outside math and code, and its scripts and stylesheets."""

    def __init__(self):
        super().__init__()
        self.stack: list[tuple[str, bool]] = []  # (tag, inside math or code)
        self.n_math = 0
        self.loose_text: list[str] = []
        self.assets: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "script" and attrs.get("src"):
            self.assets.append(attrs["src"])
        if tag == "link" and attrs.get("rel") == "stylesheet":
            self.assets.append(attrs["href"])
        if tag in ("br", "img", "input", "link", "meta", "hr", "source"):
            return  # void elements never close
        inside = bool(self.stack and self.stack[-1][1])
        is_math = "arithmatex" in (attrs.get("class") or "").split()
        self.stack.append((tag, inside or is_math or tag in SKIP))
        self.n_math += is_math

    def handle_endtag(self, tag):
        while self.stack:
            if self.stack.pop()[0] == tag:
                break

    def handle_data(self, data):
        if not (self.stack and self.stack[-1][1]):
            self.loose_text.append(data)


def check_page(site: Path, path: Path) -> tuple[int, list[str]]:
    """(number of math containers, problems) of one page."""
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    name = path.relative_to(site).as_posix()
    problems = [f"{name}: raw TeX outside math: {m.group()!r}"
                for text in page.loose_text for m in RAW_TEX.finditer(text)]
    problems += [f"{name}: loads {a} from the network" for a in page.assets
                 if a.startswith(("http:", "https:", "//"))]
    if page.n_math:
        url = path.relative_to(site).as_posix()
        local = {urljoin(url, a).split("?")[0] for a in page.assets}
        problems += [f"{name}: has math but does not load {k}" for k in KATEX if k not in local]
    return page.n_math, problems


def check_site(site: Path) -> list[str]:
    problems = [f"{k} is missing from the site" for k in KATEX if not (site / k).is_file()]
    css = site / "assets/katex/katex.min.css"
    if css.is_file():
        fonts = re.findall(r"url\((fonts/[^)]+\.woff2)\)", css.read_text())
        problems += [f"KaTeX font {f} is missing" for f in fonts
                     if not (css.parent / f).is_file()]
        problems += ["katex.min.css names no woff2 fonts"] if not fonts else []
    for path in sorted(site.rglob("*.html")):
        n_math, page_problems = check_page(site, path)
        problems += page_problems
        if path.parent.parent.name == "components" and not n_math:
            problems.append(f"{path.relative_to(site).as_posix()} has no arithmatex math")
    return problems


if __name__ == "__main__":
    site = Path(sys.argv[1] if len(sys.argv) > 1 else "site")
    problems = check_site(site)
    for problem in problems:
        print(problem)
    if problems:
        sys.exit(f"{len(problems)} problem(s) in {site}")
    n = sum(check_page(site, p)[0] for p in site.rglob("*.html"))
    print(f"{site}: {n} formulas, rendered by the bundled KaTeX; no raw TeX, nothing from a CDN")
