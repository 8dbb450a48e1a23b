"""One file per method. ``METHODS`` maps a config's ``method.name`` to its module.

Modules are imported lazily so that loading a config or importing ``visrep`` stays fast.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from .base import DataInfo, Export, Method, Step, StreamSpec, decay_groups, module_metadata


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
    "stop": MethodEntry("visrep.methods.stop", "StoPConfig", "StoP"),
    "iwm": MethodEntry("visrep.methods.iwm", "IWMConfig", "IWM"),
    "dinov2": MethodEntry("visrep.methods.dinov2", "DINOv2Config", "DINOv2"),
    "clip": MethodEntry("visrep.methods.clip", "CLIPConfig", "CLIP"),
    "siglip": MethodEntry("visrep.methods.clip", "SigLIPConfig", "SigLIP"),
    "llip": MethodEntry("visrep.methods.llip", "LlipConfig", "Llip"),
    "msn": MethodEntry("visrep.methods.msn", "MSNConfig", "MSN"),
    "pmsn": MethodEntry("visrep.methods.msn", "PMSNConfig", "MSN"),
    "paws": MethodEntry("visrep.methods.paws", "PAWSConfig", "PAWS"),
    "supervised": MethodEntry("visrep.methods.supervised", "SupervisedConfig", "Supervised"),
    "mae": MethodEntry("visrep.methods.mae", "MAEConfig", "MAE"),
    "diffusion": MethodEntry("visrep.methods.diffusion", "DiffusionConfig", "Diffusion"),
}


def build_method(cfg, data_info: DataInfo | dict) -> Method:
    """Instantiate the method named by ``cfg.method.name`` for data described by ``data_info``."""
    if not isinstance(data_info, DataInfo):
        data_info = DataInfo.from_dict(data_info)
    return METHODS[cfg.method.name].method_class()(cfg, data_info)


__all__ = ["METHODS", "DataInfo", "Export", "Method", "MethodEntry", "Step", "StreamSpec", "build_method",
           "decay_groups", "module_metadata"]
