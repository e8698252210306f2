"""Every method the federation can play, one module each. Importing this package imports every module in it, and
each registers itself (fedtina.methods.registry): adding a method is adding a module (and its configs/method yaml)."""

import importlib
import pkgutil

from fedtina.methods.registry import REGISTRY, Method, plan, register, run_plan

for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["REGISTRY", "Method", "plan", "register", "run_plan"]
