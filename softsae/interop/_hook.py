"""Register softsae's SAELens architecture as soon as SAELens is imported, without importing it.

``install()`` (run by ``import softsae``) registers at once when ``sae_lens`` is already loaded;
otherwise it puts a finder on ``sys.meta_path`` that, the first time ``sae_lens`` is imported, lets
the import run and then calls ``softsae.interop.saelens.register()``. A failure to register only
warns: it must never break the user's import of SAELens.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType


def _register() -> None:
    try:
        from softsae.interop import saelens

        saelens.register()
    except Exception as err:  # noqa: BLE001 - an incompatible SAELens version must not break imports
        warnings.warn(f"softsae: could not register the 'softsae' SAE architecture with SAELens: {err}",
                      stacklevel=2)


class _SaeLensFinder(importlib.abc.MetaPathFinder):
    """One-shot finder: wraps sae_lens' loader so that registration follows its import."""

    def find_spec(self, name: str, path=None, target=None):  # noqa: ANN001 - MetaPathFinder signature
        if name != "sae_lens":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        run = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            _register()

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Register now if sae_lens is loaded, else once it is (idempotent)."""
    if "sae_lens" in sys.modules:
        _register()
    elif not any(isinstance(f, _SaeLensFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _SaeLensFinder())
