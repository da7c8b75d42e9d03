"""Griffe extension: the library's docstrings as Griffe's Google parser reads them.

- ``Example:`` sections read as ``Examples:``, the name the parser knows, so their doctests
  render as code rather than as prose.
- Sphinx roles (``:func:`loss```, ``:class:`~handbackprop.MLP```) become code spans; the
  names stay readable, and the API index links every public one.
"""

import re

import griffe

_HEADING = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_ROLE = re.compile(r":(?:func|class|data|mod|meth|attr|obj):`~?([^`]+)`")


class ExampleSections(griffe.Extension):
    def on_object(self, *, obj, **kwargs):
        if obj.docstring is not None:
            text = _HEADING.sub(r"\1Examples:", obj.docstring.value)
            obj.docstring.value = _ROLE.sub(r"`\1`", text)
