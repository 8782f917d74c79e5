"""sdslora: SDS-LoRA and the low-rank adapters it is compared with, for any PyTorch / Hugging Face model.

    import sdslora
    model = sdslora.attach(base, sdslora.AdapterConfig(method="sds", r=8, alpha=4))
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=2e-4)
    ctl = sdslora.Controller(model, opt, total_steps=T)   # ctl.step() after every optimizer.step()
"""

__version__ = "0.1.0"

from .config import AdapterConfig  # noqa: E402
from .control import Controller  # noqa: E402
from .io import export_peft, load_adapter, save_adapter  # noqa: E402
from .methods import METHODS  # noqa: E402
from .model import AdaptedModel, attach  # noqa: E402
from .optim import build_optimizer  # noqa: E402

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
