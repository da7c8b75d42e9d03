"""Pages generated at build time (mkdocs-gen-files): nothing here is edited by hand.

- ``reference/``: one page per public module of ``handbackprop`` (every ``handbackprop/*.py``
  whose name does not start with ``_``) and an index of every name in ``handbackprop.__all__``,
  each linked to its documentation; a new module or export gets its entry with no edit.
- ``source/``: the library's and ``reference/``'s files with line anchors, the targets of the
  ``[[src ...]]`` links (``docs/hooks/code_links.py``).
- ``benchmarks/published/``: the published plots, which ``docs/benchmarks.md`` shows.
"""

import importlib
import inspect
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # the `mkdocs` script does not put the working folder on the path
    sys.path.insert(0, str(ROOT))


def public_modules(root=ROOT) -> list:
    """``handbackprop.<name>`` for every module file not starting with an underscore."""
    return [f"handbackprop.{p.stem}" for p in sorted((root / "handbackprop").glob("*.py"))
            if not p.stem.startswith("_")]


def documented_at(name: str) -> str:
    """The identifier under which ``handbackprop.<name>`` is documented: the module for a
    module, else ``<defining module>.<name>`` (its entry on that module's page)."""
    import handbackprop

    obj = getattr(handbackprop, name)
    if inspect.ismodule(obj):
        return obj.__name__
    module = getattr(obj, "__module__", None)  # classes and functions know where they live
    candidates = [module] if module in public_modules() else public_modules()  # constants do not
    for module in candidates:
        if getattr(importlib.import_module(module), name, None) is obj:
            return f"{module}.{name}"
    raise ValueError(f"handbackprop.{name}: not found under that name in any public module "
                     f"({', '.join(candidates)}); the API reference cannot place it")


def summary_line(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.split("\n\n")[0].replace("\n", " ").replace("|", "\\|")


def _module_page(module: str) -> str:
    # The module's own heading is the page's title: level 1, its members level 2.
    return f"::: {module}\n    options:\n      heading_level: 1\n"


def reference_pages() -> dict:
    """``{path: markdown}`` for the API reference, its index first."""
    import handbackprop

    pages = {}
    rows = ["# API reference", "",
            "Every name `import handbackprop as hbp` exports (`hbp.__all__`), with the page that "
            "documents it, then every public module.", "",
            "| name | what it is |", "|---|---|"]
    for name in handbackprop.__all__:
        target = documented_at(name)
        rows.append(f"| [`hbp.{name}`][{target}] | {summary_line(getattr(handbackprop, name))} |")
    rows += ["", "## Modules", ""]
    for module in public_modules():
        rows.append(f"- [`{module}`]({module.split('.')[-1]}.md): "
                    f"{summary_line(importlib.import_module(module))}")
    pages["reference/index.md"] = "\n".join(rows) + "\n"
    for module in public_modules():
        pages[f"reference/{module.split('.')[-1]}.md"] = _module_page(module)
    nav = ["* [Index](index.md)"] + [f"* [{m.split('.')[-1]}]({m.split('.')[-1]}.md)"
                                      for m in public_modules()]
    pages["reference/SUMMARY.md"] = "\n".join(nav) + "\n"
    return pages


def source_files(root=ROOT) -> list:
    return [*sorted((root / "handbackprop").glob("*.py")), *sorted((root / "reference").glob("*.py"))]


def highlighted(code: str) -> str:
    """``code`` as highlighted HTML with a numbered anchor ``L-<n>`` on every line; raw HTML,
    so that MkDocs sees the anchors and ``validation: anchors`` checks every link to them."""
    from pygments import highlight
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import PythonLexer

    return highlight(code, PythonLexer(stripnl=False), HtmlFormatter(linenos="inline", lineanchors="L",
                                                        anchorlinenos=True, wrapcode=True))


def source_pages(root=ROOT) -> dict:
    pages, nav = {}, []
    for file in source_files(root):
        rel = file.relative_to(root).as_posix()
        pages[f"source/{rel}.md"] = (f"---\nhide:\n  - toc\n---\n\n# {rel}\n\n"  # the code's width
                                     f"{highlighted(file.read_text())}\n")
        nav.append(f"* [{rel.replace('_', chr(92) + '_')}]({rel}.md)")  # not emphasis
    pages["source/SUMMARY.md"] = "\n".join(nav) + "\n"
    return pages


def main():
    import mkdocs_gen_files

    for path, text in {**reference_pages(), **source_pages()}.items():
        with mkdocs_gen_files.open(path, "w") as f:
            f.write(text)
    for png in sorted((ROOT / "benchmarks" / "published").rglob("*.png")):
        with mkdocs_gen_files.open(png.relative_to(ROOT).as_posix(), "wb") as f:
            f.write(png.read_bytes())


if __name__ == "<run_path>":  # runpy.run_path, as mkdocs-gen-files runs it
    main()
