"""MkDocs hook: links from the docs to source lines that cannot go stale.

A page names a line by its text, never by its number:

    [[src handbackprop/backprop.py "delta = (delta @ params[l]"]]

becomes a link to that line of the generated source view (``source/<path>.md``, line anchors)
followed by the whole line as inline code; ``[[src PATH "TEXT" N]]`` quotes N lines from
there as a code block instead. The text must occur on exactly one line of the file: when the
code changes so that it matches none, or several, the build fails and names the directive, so
a moved line moves its link and a changed line cannot leave a link pointing at something else.
"""

import pathlib
import posixpath
import re
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[2]
DIRECTIVE = re.compile(r'\[\[src (?P<path>\S+) "(?P<needle>(?:[^"\\]|\\.)+)"(?: (?P<count>\d+))?\]\]')


class SourceLinkError(ValueError):
    pass


def locate(path: str, needle: str, root=ROOT) -> int:
    """The 1-based number of the one line of ``root/path`` that contains ``needle``."""
    file = pathlib.Path(root) / path
    if not file.is_file():
        raise SourceLinkError(f'[[src {path} "{needle}"]]: no file {path}')
    hits = [i for i, line in enumerate(file.read_text().splitlines(), 1) if needle in line]
    if len(hits) != 1:
        raise SourceLinkError(f'[[src {path} "{needle}"]]: the text is on {len(hits)} lines of '
                              f"{path} ({hits}), expected exactly one")
    return hits[0]


def source_page(path: str) -> str:
    """The generated page that shows ``path`` with line anchors."""
    return f"source/{path}.md"


def line_anchor(line: int) -> str:
    return f"L-{line}"  # Pygments' lineanchors="L", as docs/hooks/gen_pages.py writes them


def render(match, page_uri: str, root=ROOT) -> str:
    path, needle = match["path"], match["needle"].replace('\\"', '"')
    line = locate(path, needle, root)
    lines = (pathlib.Path(root) / path).read_text().splitlines()
    link = posixpath.relpath(source_page(path), posixpath.dirname(page_uri) or ".")
    label = f"[`{path}:{line}`]({link}#{line_anchor(line)})"
    if match["count"]:
        quoted = "\n".join(lines[line - 1: line - 1 + int(match["count"])])
        return f"{label}\n\n```python\n{textwrap.dedent(quoted)}\n```"
    text = lines[line - 1].strip().replace("|", "\\|")
    tick = "``" if "`" in text else "`"
    return f"{label} {tick}{text}{tick}"


def expand(markdown: str, page_uri: str, root=ROOT) -> str:
    """Every directive of ``markdown`` replaced (raises :class:`SourceLinkError`)."""
    return DIRECTIVE.sub(lambda m: render(m, page_uri, root), markdown)


def on_page_markdown(markdown, page, config, files):
    return expand(markdown, page.file.src_uri)
