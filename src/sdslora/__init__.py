"""sdslora: SDS-LoRA and the low-rank adapters it is compared with, for any PyTorch / Hugging Face model.

    import sdslora
    model = sdslora.attach(base, sdslora.AdapterConfig(method="sds", r=8, alpha=4))
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=2e-4)
    ctl = sdslora.Controller(model, opt, total_steps=T)   # ctl.step() after every optimizer.step()

The names below are imported on first use (PEP 562), so that ``import sdslora`` and the command line's ``--help``,
``--version`` and ``methods`` do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> submodule that defines it (imported on first access)
_LAZY: dict[str, str] = {
    "AdapterConfig": ".config",
    "AdaptedModel": ".model",
    "Controller": ".control",
    "METHODS": ".methods",
    "attach": ".model",
    "build_optimizer": ".optim",
    "export_peft": ".io",
    "load_adapter": ".io",
    "save_adapter": ".io",
}

__all__ = [
    "AdapterConfig",
    "AdaptedModel",
    "Controller",
    "METHODS",
    "attach",
    "build_optimizer",
    "export_peft",
    "load_adapter",
    "save_adapter",
    "__version__",
]

if TYPE_CHECKING:  # static analysers and IDEs see the eager imports
    from .config import AdapterConfig
    from .control import Controller
    from .io import export_peft, load_adapter, save_adapter
    from .methods import METHODS
    from .model import AdaptedModel, attach
    from .optim import build_optimizer


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sdslora' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # cached: later accesses are plain attribute look-ups
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
