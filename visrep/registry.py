"""Which module holds each method: ``method.name`` -> module, config dataclass, method class.

Strings only, imported on first use, so that loading a config stays fast and this bottom-layer
table depends on nothing. A new method is one line here (tests register theirs the same way).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass


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
