"""Let a ``recipes/`` package in the working directory win the ``recipes`` import.

``tune run recipes/kd_lora.py`` converts the path to the module name ``recipes.kd_lora`` and runs it
with ``runpy.run_module`` after *appending* the working directory to ``sys.path``. torchtune's wheel
installs a top-level ``recipes`` package in site-packages whose ``__init__`` raises, and
site-packages comes first, so without this hook every custom recipe in ``./recipes`` fails to import.

The finder below only acts for the names ``recipes`` and ``recipes.*`` and only when the working
directory holds ``recipes/__init__.py``; everything else falls through to the normal import system.
It is loaded by ``kd_recipes_hook.pth`` at interpreter start and imports nothing heavy.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys


class _CwdRecipesFinder:
    """Meta-path finder resolving ``recipes[.x]`` from ``$PWD/recipes`` when it is a package."""

    @staticmethod
    def find_spec(fullname, path=None, target=None):
        if fullname != "recipes":
            return None  # submodules resolve through the package's own __path__
        try:
            cwd = os.getcwd()
        except OSError:
            return None
        if not os.path.isfile(os.path.join(cwd, "recipes", "__init__.py")):
            return None
        return importlib.machinery.PathFinder.find_spec(fullname, [cwd])


def install() -> None:
    if not any(isinstance(f, _CwdRecipesFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _CwdRecipesFinder())
