"""Let a ``recipes/`` package in the working directory win the ``recipes`` import.

``tune run recipes/kd_lora.py`` converts the path to the module name ``recipes.kd_lora`` and runs it
with ``runpy.run_module`` after *appending* the working directory to ``sys.path``. torchtune's wheel
installs a top-level ``recipes`` package in site-packages whose ``__init__`` raises, and
site-packages comes first, so without this hook every custom recipe in ``./recipes`` fails to import.

The finder below only acts for the names ``recipes`` and ``recipes.*`` and only when the working
directory holds ``recipes/__init__.py``; everything else falls through to the normal import system.
It is loaded by ``kd_recipes_hook.pth`` at interpreter start and imports nothing heavy.

It also silences one harmless line: torchao 0.15 (pinned, see the README's Versions section) logs "Skipping import
of cpp extensions due to incompatible torch version ..." at import, i.e. in every ``kd`` / ``tune run`` command,
and torchtune imports torchao before any kd code runs, so the filter has to be in place at interpreter start.
Every other torchao message still prints.
"""

from __future__ import annotations

import importlib.machinery
import logging
import os
import sys

TORCHAO_NOISE = "Skipping import of cpp extensions"


class _QuietTorchao(logging.Filter):
    """Drops torchao's "Skipping import of cpp extensions ..." record (and only that one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return not str(record.getMessage()).startswith(TORCHAO_NOISE)
        except Exception:
            return True


def quiet_torchao() -> None:
    lg = logging.getLogger("torchao")
    if not any(isinstance(f, _QuietTorchao) for f in lg.filters):
        lg.addFilter(_QuietTorchao())


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
    quiet_torchao()
    if not any(isinstance(f, _CwdRecipesFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _CwdRecipesFinder())
