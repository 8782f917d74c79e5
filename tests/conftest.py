import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/models.py
torch.set_num_threads(1)  # tiny models: threads cost more than they give, and CI has 2 cores


@pytest.fixture
def saved(tmp_path):
    """A saved SDS-LoRA adapter (rank 4, tiny Llama, non-zero B) and the adapted model's output on a fixed batch."""
    from models import batch_for, output_of, tiny_llama

    import sdslora

    model = sdslora.attach(tiny_llama(), sdslora.AdapterConfig(method="sds", r=4))
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            layer.lora_B.normal_()
    model.save_adapter(tmp_path / "ad")
    return tmp_path / "ad", output_of(model, batch_for("llama")).detach()
