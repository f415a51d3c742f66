"""Sphinx configuration of lipreg's API reference: ``sphinx-build -W --keep-going -b html docs docs/_build/html``.

The pages are reStructuredText; the reference is generated from the docstrings (autodoc, Google-style ``Args:``
through napoleon, summary tables through autosummary). No extension fetches anything at build time (no
intersphinx), and references to objects outside lipreg are not checked (``nitpicky`` off), so the build is
offline and its warnings are about lipreg's own text.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from sphinx.application import Sphinx
from sphinx.ext import autosummary, napoleon

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # document this checkout's lipreg, installed or not

project = "lipreg"
author = "lipreg maintainers"
copyright = "lipreg maintainers"  # noqa: A001  (Sphinx's name)

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]

exclude_patterns = ["_build"]
nitpicky = False
default_role = "code"  # `x` (single backticks) in a docstring is code, never a broken reference

autosummary_generate = False  # the API pages are written by hand: the build writes nothing into docs/
# an autosummary table shows each docstring's first sentence; "eq. 8", "Alg. 2" and "w.r.t." do not end one
autosummary.WELL_KNOWN_ABBREVIATIONS = (*autosummary.WELL_KNOWN_ABBREVIATIONS, "eq.", "Alg.", "w.r.t.")
autodoc_default_options = {"members": True}
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_class_signature = "mixed"
autodoc_inherit_docstrings = False  # torch.nn.Module's own docstrings are not lipreg's API
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

html_theme = "alabaster"
html_title = "lipreg"


_GROUPED_KWARGS = re.compile(r"^(\s+\w+(?:, \w+)*, )\*\*(\w+:)")
"""An ``Args:`` line that documents ``**kwargs`` with other names (``method, n_iter, **options: ...``)."""


def _napoleon_without_inline_types(app: Sphinx, what: str, name: str, obj: Any, options: Any,
                                   lines: list[str]) -> None:
    """napoleon, except that it reads an attribute's or property's docstring as plain text: its own rule takes the
    first ``x: y`` there for ``type: description``, whereas lipreg's attributes carry their type in the annotation
    and their first lines often hold a colon. With ``what=""``, napoleon parses such a docstring as any other.
    napoleon escapes the stars of ``**kwargs`` only when it is the line's one name; grouped, it is escaped here."""
    lines[:] = [_GROUPED_KWARGS.sub(r"\1\\*\\*\2", line) for line in lines]
    attribute = what in {"attribute", "data", "property"}
    napoleon._process_docstring(app, "" if attribute else what, name, obj, options, lines)


def setup(app: Sphinx) -> None:
    listeners = [listener for listener in app.events.listeners["autodoc-process-docstring"]
                 if listener.handler is napoleon._process_docstring]
    if len(listeners) != 1:
        raise RuntimeError("docs/conf.py: napoleon's docstring listener not found; update setup() for this Sphinx")
    app.disconnect(listeners[0].id)
    app.connect("autodoc-process-docstring", _napoleon_without_inline_types)
