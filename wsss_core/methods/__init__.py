"""The method registry: importing this package registers every shipped method (one module each)."""
from wsss_core.methods.base import (REGISTRY, ExportParams, Method, MethodParams, ModelParams, RawMap, RefineParams,
                                    get_method, method_params, register_method)
from wsss_core.methods import agen, cam, conformer_ms, mct, multisa, semod, transcam  # registers each module's method (its name)

__all__ = ["REGISTRY", "ExportParams", "Method", "MethodParams", "ModelParams", "RawMap", "RefineParams", "agen", "cam",
           "conformer_ms", "mct",
           "multisa", "semod", "transcam", "get_method", "method_params", "register_method"]
