"""Sphinx configuration for the celery-dedup documentation.

Build (as CI does, warnings are errors)::

    sphinx-build -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import sys
from pathlib import Path

# Document this checkout, not whichever celery-dedup happens to be installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import celery_dedup

project = "celery-dedup"
author = "The celery-dedup authors"
copyright = "the celery-dedup authors"
release = celery_dedup.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# MyST: ``:::`` fences for notes; heading anchors for in-page links.
myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3

# autodoc: the package is imported from this checkout (see the top).
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_default_options = {"show-inheritance": True}

# Warnings are errors in CI (-W); unresolved Python cross-references are not
# checked (Celery's own types are not documented here and intersphinx is off).
nitpicky = False

html_theme = "furo"
html_title = f"celery-dedup {release}"
