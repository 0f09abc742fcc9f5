"""Registry: `method` name -> Method object."""
from __future__ import annotations

from wsss_core.errors import ParamsError
from wsss_core.methods.base import Method
from wsss_core.methods.cam import CamMethod

REGISTRY: dict[str, type[Method]] = {CamMethod.name: CamMethod}


def get_method(name: str) -> Method:
    """Return the registered method called `name`; an unknown name is a ParamsError."""
    if name not in REGISTRY:
        raise ParamsError(f"method {name!r} is not one of: {', '.join(REGISTRY)}")
    return REGISTRY[name]()
