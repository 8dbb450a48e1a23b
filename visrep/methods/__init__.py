"""One file per method. ``METHODS`` maps a config's ``method.name`` to its module.

Modules are imported lazily so that loading a config or importing ``visrep`` stays fast.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from .base import Method, Step, decay_groups


@dataclass(frozen=True)
class MethodEntry:
    module: str
    config: str
    cls: str

    def config_class(self) -> type:
        return getattr(importlib.import_module(self.module), self.config)

    def method_class(self) -> type:
        return getattr(importlib.import_module(self.module), self.cls)


METHODS: dict[str, MethodEntry] = {
    "ijepa": MethodEntry("visrep.methods.ijepa", "IJEPAConfig", "IJEPA"),
}


def build_method(cfg, data_info: dict) -> Method:
    """Instantiate the method named by ``cfg.method.name``.

    ``data_info`` carries what the dataset knows: ``in_chans``, ``image_size``, ``num_classes``,
    ``mean``, ``std``.
    """
    return METHODS[cfg.method.name].method_class()(cfg, data_info)


__all__ = ["METHODS", "Method", "MethodEntry", "Step", "build_method", "decay_groups"]
