"""Griffe extension for the API reference: the docstrings' reST roles as Markdown.

overstory's docstrings are prose with reST inline markup (``:class:`~overstory.Agent```,
``:mod:`overstory.rollout```, ``:data:`Placement```). Markdown shows a role as literal
text, so this turns each into a code span of the name it shows (the last dotted part
when the target starts with ``~``, as Sphinx does). Double backticks are already a
Markdown code span and are left alone. A paragraph ending in reST's literal-block marker
(``text::``) ends in a colon instead; the indented block after it is a Markdown code
block already.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_LITERAL_AFTER_WORD = re.compile(r"(\S)::\n\n")
_LITERAL_AFTER_SPACE = re.compile(r"[ \t]+::\n\n")
_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|exc|obj|const|ref):`(~?)([^`]+)`")


def rest_roles_to_markdown(text: str) -> str:
    """``:class:`~a.b.C``` -> ```C```; ``:mod:`a.b``` -> ```a.b```."""

    def shown(match: re.Match[str]) -> str:
        tilde, target = match.groups()
        name = target.rsplit(".", 1)[-1] if tilde else target
        return f"`{name}`"

    text = _ROLE.sub(shown, text)
    text = _LITERAL_AFTER_SPACE.sub("\n\n", text)
    return _LITERAL_AFTER_WORD.sub(r"\1:\n\n", text)


class RestRoles(griffe.Extension):
    """Rewrite every loaded object's docstring once, as it is loaded."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rest_roles_to_markdown(obj.docstring.value)
