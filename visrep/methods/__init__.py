"""One file per method. ``METHODS`` (:mod:`visrep.registry`) maps a config's ``method.name`` to its
module, imported on first use so that loading a config or importing ``visrep`` stays fast."""
from __future__ import annotations

from visrep.registry import METHODS, MethodEntry

from .base import DataInfo, Export, Method, Step, StreamSpec, decay_groups, module_metadata


def build_method(cfg, data_info: DataInfo | dict) -> Method:
    """Instantiate the method named by ``cfg.method.name`` for data described by ``data_info``."""
    if not isinstance(data_info, DataInfo):
        data_info = DataInfo.from_dict(data_info)
    return METHODS[cfg.method.name].method_class()(cfg, data_info)


__all__ = ["METHODS", "DataInfo", "Export", "Method", "MethodEntry", "Step", "StreamSpec", "build_method",
           "decay_groups", "module_metadata"]
