"""The method registry: importing this package imports every module beside `base.py`, and each registers its
method under its name (`@register_method`). A new method is a new module here; no list to extend."""
import importlib
import pkgutil

from wsss_core.methods.base import (REGISTRY, ExportParams, Method, MethodParams, ModelParams, RefineParams,
                                    get_method, method_params, register_method)

for _module in sorted(info.name for info in pkgutil.iter_modules(__path__) if info.name != "base"):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["REGISTRY", "ExportParams", "Method", "MethodParams", "ModelParams", "RefineParams", "get_method",
           "method_params", "register_method"]
