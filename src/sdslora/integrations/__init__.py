"""Thin adapters of the Controller (and later diagnostics) to training frameworks. Import submodules explicitly:
``from sdslora.integrations.hf import SDSLoRACallback`` (needs transformers)."""
