"""unload() without merging gives the original model back, also for methods that re-base W0."""

import copy

import pytest
import torch
from models import batch_for, output_of, tiny_llama

import sdslora


@pytest.mark.parametrize("method", ["lora", "sds", "pissa", "lora_ga", "dora"])
def test_unload_restores_original_outputs(method):
    base = tiny_llama().double()
    ref = copy.deepcopy(base)
    batch = batch_for("llama")
    kw = {"init_data": [batch]} if sdslora.METHODS[method].layer_cls.needs_init_data else {}
    adapted = sdslora.attach(base, sdslora.AdapterConfig(method=method, r=4), **kw)
    with torch.no_grad():
        for p in adapted.trainable_parameters():
            p.add_(0.01 * torch.randn_like(p))  # a trained adapter
        assert not torch.allclose(output_of(adapted, batch), output_of(ref, batch))
        plain = adapted.unload()
        assert not any(isinstance(m, sdslora.methods.AdapterLayer) for m in plain.modules())
        torch.testing.assert_close(output_of(plain, batch), output_of(ref, batch), rtol=1e-12, atol=1e-12)
