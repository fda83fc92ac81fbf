"""Griffe extension for the API reference: Sphinx cross-reference roles in docstrings become code spans.

The docstrings name other objects as ``:func:`strip``` or ``:mod:`ptq_keras.budget```; Markdown has no such roles,
so they would show as literal text. This extension rewrites them to ``` ``strip`` ``` before the docstrings are parsed.
"""

from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|meth|class|mod|attr|data|exc|obj|const):`~?([^`]+)`")


class SphinxRolesToCode(griffe.Extension):
    def on_object(self, *, obj, loader, **kwargs) -> None:
        del loader, kwargs
        if obj.docstring is not None and ":`" in obj.docstring.value:
            obj.docstring.value = ROLE.sub(r"``\1``", obj.docstring.value)
