"""Quantised bases (QLoRA): bitsandbytes 4-bit (nf4, double quant) and 8-bit linears, torchao int8 weight-only
linears, each loaded through transformers' ``quantization_config`` on CPU (both libraries run their CPU backends
here). The adapter's forward is the quantised base's output plus the adapter path, gradients reach the factors only,
SDS-LoRA's duties keep the function, save / load and the PEFT export (on the quantised and the full-precision base)
reproduce the outputs, ``merge()`` refuses and ``dequantize_bases`` + ``merge_and_unload()`` is the explicit path;
methods that re-base W0 or need ∂L/∂W0 refuse clearly.

The tiny Llama has hidden size 64 (bitsandbytes' 4-bit blocks are 64 wide). Comparisons are float32 recomputations
of the same quantised operations, hence tight tolerances; PEFT's layers are compared at 1e-4.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sdslora
from sdslora.methods.base import AdapterLayer
from sdslora.methods.quantised import (
    QuantisedMergeError,
    dequantize_bases,
    dequantized_weight,
    is_quantised,
    quantisation,
    storage_bytes,
)

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:MatMul8bitLt"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

BACKENDS = ["bnb-nf4", "bnb-int8", "torchao-int8"]
Q_PROJ = "model.layers.0.self_attn.q_proj"
DOC = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"


_RUNS: dict[str, str | None] = {}


def _backend_runs(backend: str) -> None:
    """Skip (naming the reason) where the installed backend itself cannot quantise and run a layer on this machine's
    CPU; only the backend is exercised here, never sdslora's code."""
    if backend not in _RUNS:
        try:
            x = torch.randn(2, 64)
            if backend.startswith("bnb"):
                import bitsandbytes as bnb

                layer = (bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4")
                         if backend == "bnb-nf4" else bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False))
                layer = layer.to("cpu")
                layer.weight = type(layer.weight)(torch.randn(64, 64), requires_grad=False, **(
                    {"quant_type": "nf4"} if backend == "bnb-nf4" else {"has_fp16_weights": False}))
                layer = layer.to("cpu")
            else:
                from torchao.quantization import Int8WeightOnlyConfig, quantize_

                layer = nn.Sequential(nn.Linear(64, 64))
                quantize_(layer, Int8WeightOnlyConfig())
            layer(x)
            _RUNS[backend] = None
        except Exception as e:  # an unsupported CPU or build
            _RUNS[backend] = f"{type(e).__name__}: {e}"
    if _RUNS[backend] is not None:
        pytest.skip(f"{backend} does not run on this machine ({_RUNS[backend][:120]})")


def _quant_config(backend: str):
    if backend.startswith("bnb"):
        pytest.importorskip("bitsandbytes")
        _backend_runs(backend)
        from transformers import BitsAndBytesConfig

        if backend == "bnb-nf4":
            return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)
        return BitsAndBytesConfig(load_in_8bit=True)
    pytest.importorskip("torchao")
    _backend_runs(backend)
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    return TorchAoConfig(quant_type=Int8WeightOnlyConfig())


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("tiny-llama-64")
    LlamaForCausalLM(cfg).eval().save_pretrained(str(path))
    return path


def quantised_model(folder: Path, backend: str, **kw) -> nn.Module:
    qc = kw.pop("quantization_config", None) or _quant_config(backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(str(folder), quantization_config=qc, device_map="cpu",
                                                    dtype=torch.float32, **kw).eval()


def dense_model(folder: Path) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def config(method: str, **kw) -> sdslora.AdapterConfig:
    return sdslora.AdapterConfig(method=method, r=4, alpha=4.0, target_modules="all-linear", **kw)


def ids(seed: int = 0, n: int = 3, seq: int = 10) -> torch.Tensor:
    return torch.randint(0, 64, (n, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def randomise(model: sdslora.AdaptedModel, seed: int = 1) -> None:
    """Non-zero factors, so that ΔW is far from 0."""
    g = torch.Generator().manual_seed(seed)
    for layer in model.adapter_layers().values():
        for t in (layer.lora_A, layer.lora_B):
            t.copy_(torch.randn(t.shape, generator=g) * 0.2)


def sds_decouple(model: sdslora.AdaptedModel) -> sdslora.Controller:
    """Re-parameterise SDS-LoRA (warm-up step 2) without moving the factors (lr 0)."""
    ctl = sdslora.Controller(model, torch.optim.SGD(model.trainable_parameters(), lr=0.0), total_steps=20)
    ctl.step(t=2)
    assert all(layer.decoupled for layer in model.adapter_layers().values())
    return ctl


def adapted(folder: Path, backend: str, method: str, decoupled: bool = False) -> sdslora.AdaptedModel:
    opts = {"warmup_steps": 2, "refresh": "every:1"} if method == "sds" else {}
    model = sdslora.attach(quantised_model(folder, backend), config(method, options=opts))
    if method in ("lora", "sds"):
        randomise(model)
    if decoupled:
        sds_decouple(model)
    return model


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


CASES = [(b, m, d) for b in BACKENDS for m, d in (("lora", False), ("sds", False), ("sds", True))]
CASE_IDS = [f"{b}-{m}{'-decoupled' if d else ''}" for b, m, d in CASES]


# ---- attach ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["lora", "sds"])
def test_attach_to_quantised_linears(folder, backend, method):
    model = adapted(folder, backend, method)
    layers = model.adapter_layers()
    assert len(layers) == 14  # 7 linears x 2 blocks; lm_head (not quantised) is the output embedding
    expect = {"bnb-nf4": "bnb-4bit", "bnb-int8": "bnb-8bit", "torchao-int8": "torchao"}[backend]
    for layer in layers.values():
        q = layer.quantised
        assert q is not None and q.backend == expect
        assert (layer.view.in_features, layer.view.out_features) == (layer.base_layer.in_features,
                                                                     layer.base_layer.out_features)
        assert layer.view.weight_shape == (layer.out_features, layer.in_features)  # logical, not packed
        for t in layer.adapter_tensors().values():
            assert t.dtype in (torch.float32, torch.uint8), t.dtype  # float32 factors / Q buffers (uint8: phase flag)
    trainable = dict(model.named_trainable_parameters())
    assert trainable and all(re.search(r"\.lora_[AB]$", n) for n in trainable)
    assert model.adapter_state_dict().keys() == {f"{n}.{k}" for n, ly in layers.items() for k in ly.adapter_tensors()}


def test_adapter_dtype_base_is_the_compute_dtype(folder):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = sdslora.attach(quantised_model(folder, "bnb-nf4", quantization_config=qc),
                           config("sds", adapter_dtype="base"))
    layer = model.adapter_layers()[Q_PROJ]
    assert layer.adapter_dtype == torch.bfloat16 and layer.lora_A.dtype == torch.bfloat16
    assert layer.lora_QA.dtype == torch.bfloat16
    default = sdslora.attach(quantised_model(folder, "bnb-nf4", quantization_config=qc), config("sds"))
    assert default.adapter_layers()[Q_PROJ].lora_QB.dtype == torch.float32  # float32 adapters by default


# ---- forward and gradients -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,method,decoupled", CASES, ids=CASE_IDS)
def test_forward_is_quantised_base_plus_adapter_path(folder, backend, method, decoupled):
    model = adapted(folder, backend, method, decoupled)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(3))
    for name, layer in model.adapter_layers().items():
        xi = x if layer.in_features == 64 else torch.randn(2, 5, layer.in_features)
        with torch.no_grad():
            y = layer(xi)
            ref = layer.base_layer(xi) + F.linear(xi, layer.delta_weight())
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5, msg=name)
    # the whole model: the quantised model's logits change by the adapter (ΔW ≠ 0), and not with it disabled
    plain = quantised_model(folder, backend)
    _no_cpu_repack(plain)  # as the adapted layers do
    y, y0 = logits(model, ids()), logits(plain, ids())
    assert float((y - y0).abs().max()) > 1e-3
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, ids()), y0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend,method,decoupled", CASES, ids=CASE_IDS)
def test_gradients_reach_the_factors_only(folder, backend, method, decoupled):
    model = adapted(folder, backend, method, decoupled)
    model.train()
    layers = model.adapter_layers()
    before = {n: dequantized_weight(ly.base_layer).clone() for n, ly in layers.items()}
    packed = {n: ly.base_layer.weight.detach().clone() for n, ly in layers.items() if backend.startswith("bnb")}
    x = ids(1)
    out = model(input_ids=x, labels=x)
    out.loss.backward()
    for n, p in model.model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and float(p.grad.abs().sum()) > 0, n
        else:
            assert p.grad is None, n
    # each layer's factor gradients are those of the dense ΔW at the quantised base's output
    layer = layers[Q_PROJ]
    xi = torch.randn(4, 64, generator=torch.Generator().manual_seed(5))
    params = [layer.lora_A, layer.lora_B]
    g = torch.autograd.grad(layer(xi).pow(2).sum(), params)
    ref = layer.base_layer(xi).detach() + F.linear(xi, layer.delta_weight())
    g_ref = torch.autograd.grad(ref.pow(2).sum(), params)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    opt.step()
    for n, ly in layers.items():  # the quantised weights did not move
        torch.testing.assert_close(dequantized_weight(ly.base_layer), before[n], rtol=0, atol=0)
        if n in packed:
            assert torch.equal(ly.base_layer.weight.detach(), packed[n])


def test_training_after_an_inference_forward_keeps_the_gradients(folder):
    """bitsandbytes on an AVX512-BF16 CPU repacks a 4-bit weight at its first eval forward without grad, after
    which its forward passes no input gradient; the adapted layers turn that repacking off."""
    model = adapted(folder, "bnb-nf4", "lora")
    with torch.no_grad():
        model(input_ids=ids())  # eval, no grad: where bitsandbytes would repack
    for layer in model.adapter_layers().values():
        assert not getattr(layer.base_layer.weight.quant_state, "packing_format_for_cpu", False)
    model.train()
    x = ids(2)
    model(input_ids=x, labels=x).loss.backward()
    first = model.adapter_layers()[Q_PROJ]
    assert first.lora_A.grad is not None and float(first.lora_A.grad.abs().sum()) > 0


def test_dequantized_weight_of_a_repacked_4bit_layer(folder):
    """A layer bitsandbytes has repacked for CPU inference dequantises to the same weight (bf16 block scales)."""
    pytest.importorskip("bitsandbytes")
    plain = quantised_model(folder, "bnb-nf4")
    layer = plain.get_submodule(Q_PROJ)
    w0 = dequantized_weight(layer).clone()
    with torch.no_grad():
        plain(input_ids=ids())
    w1 = dequantized_weight(layer)
    torch.testing.assert_close(w1, w0, rtol=1e-2, atol=1e-3)  # the repacked scales are bfloat16
    if getattr(layer.weight.quant_state, "packing_format_for_cpu", False):  # only on AVX512-BF16 CPUs
        assert layer.weight.quant_state.absmax.dtype == torch.bfloat16  # dequantising left the layer as it was


# ---- SDS-LoRA duties ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_sds_reparameterisation_and_refresh_keep_the_function(folder, backend):
    model = adapted(folder, "sds", "sds")
    model.train()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    ctl = sdslora.Controller(model, opt, total_steps=20)
    x, probe = ids(4), ids(5)
    events = []
    for t in range(1, 5):  # reparameterise after step 2, refresh after steps 3, 4 (every:1)
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        before = logits(model, probe)
        res = ctl.step()
        events += res.events
        torch.testing.assert_close(logits(model, probe), before, rtol=1e-4, atol=1e-4, msg=f"step {t}")
    kinds = [e["event"] for e in events]
    assert kinds == ["reparameterise", "refresh", "refresh"], kinds
    assert all(e["layers"] == 14 for e in events)
    assert all(layer.decoupled for layer in model.adapter_layers().values())


# ---- save / load, PEFT export -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,method,decoupled", CASES, ids=CASE_IDS)
def test_save_load_round_trip(folder, backend, method, decoupled, tmp_path):
    model = adapted(folder, backend, method, decoupled)
    y = logits(model, ids())
    model.save_adapter(tmp_path / "a")
    loaded = sdslora.load_adapter(quantised_model(folder, backend), tmp_path / "a")
    torch.testing.assert_close(logits(loaded, ids()), y, rtol=0, atol=1e-6)
    assert all(ly.decoupled == decoupled for ly in loaded.adapter_layers().values() if method == "sds")
    # the same adapter on the full-precision base
    full = sdslora.load_adapter(dense_model(folder), tmp_path / "a")
    assert not any(is_quantised(ly.base_layer) for ly in full.adapter_layers().values())


def _no_cpu_repack(model: nn.Module) -> None:
    """PEFT's bitsandbytes layers keep bitsandbytes' CPU inference repacking (bfloat16 compute): turn it off so that
    PEFT and sdslora compute the base the same way."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False


@pytest.mark.parametrize("backend,method,decoupled", CASES, ids=CASE_IDS)
def test_peft_export_loads_on_quantised_and_full_precision_bases(folder, backend, method, decoupled, tmp_path):
    peft = pytest.importorskip("peft")
    model = adapted(folder, backend, method, decoupled)
    y = logits(model, ids())
    model.export_peft(tmp_path / "peft")
    model.save_adapter(tmp_path / "native")
    served = peft.PeftModel.from_pretrained(quantised_model(folder, backend), str(tmp_path / "peft")).eval()
    peft_layer = served.get_submodule(f"base_model.model.{Q_PROJ}")
    assert type(peft_layer).__module__.rsplit(".", 1)[-1] == ("bnb" if backend.startswith("bnb") else "torchao")
    _no_cpu_repack(served)
    torch.testing.assert_close(logits(served, ids()), y, rtol=1e-4, atol=1e-4)
    # the full-precision base: PEFT = sdslora's adapter loaded on it
    dense_peft = peft.PeftModel.from_pretrained(dense_model(folder), str(tmp_path / "peft")).eval()
    ours = sdslora.load_adapter(dense_model(folder), tmp_path / "native")
    torch.testing.assert_close(logits(dense_peft, ids()), logits(ours, ids()), rtol=1e-4, atol=1e-4)


# ---- merge -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["lora", "sds"])
def test_merge_refuses_and_dequantize_bases_merges_exactly(folder, backend, method):
    model = adapted(folder, backend, method, decoupled=method == "sds")
    y = logits(model, ids())
    with pytest.raises(QuantisedMergeError, match=r"dequantize_bases.*merge_and_unload"):
        model.merge()
    with pytest.raises(QuantisedMergeError):
        model.merge_and_unload()
    assert not any(ly.merged for ly in model.adapter_layers().values())
    torch.testing.assert_close(logits(model, ids()), y, rtol=0, atol=0)  # nothing changed
    dequantize_bases(model)
    assert not any(is_quantised(m) for m in model.model.modules())
    assert getattr(model.model, "hf_quantizer", None) is None
    assert "quantization_config" not in model.model.config.to_dict()
    # the weights it computed with (bitsandbytes 8-bit casts its inputs to float16 on CPU (threshold 6): 1e-2)
    tol = 1e-2 if backend == "bnb-int8" else 1e-4
    torch.testing.assert_close(logits(model, ids()), y, rtol=tol, atol=tol)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    assert type(plain.get_submodule(Q_PROJ)) is nn.Linear
    torch.testing.assert_close(logits(plain, ids()), y, rtol=tol, atol=tol)


# ---- the other methods ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["pissa", "lora_ga", "lora_sb"])
def test_methods_that_rebase_or_need_the_weight_gradient_refuse(folder, backend, method):
    base = quantised_model(folder, backend)
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    able = sorted(n for n, s in sdslora.METHODS.items() if s.layer_cls is not None and not s.layer_cls.quantised_refusal)
    assert {"dora", "lora", "lora_xs", "lotr", "orthogonal", "sds"} <= set(able) and method not in able
    with pytest.raises(TypeError, match=rf"{Q_PROJ}.*{method}.*cannot adapt.*Methods that adapt quantised layers: "
                                        + re.escape(str(able))):
        sdslora.attach(base, config(method), init_data=[{"input_ids": ids(), "labels": ids()}])
    assert not any(isinstance(m, AdapterLayer) for m in base.modules())
    assert {n: p.requires_grad for n, p in base.named_parameters()} == flags


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_xs_initialises_from_the_dequantised_weight(folder, backend, tmp_path):
    from sdslora.methods.xs import truncated_svd

    model = sdslora.attach(quantised_model(folder, backend), config("lora_xs"))
    layer = model.adapter_layers()[Q_PROJ]
    u, s, v = truncated_svd(dequantized_weight(layer.base_layer).float(), 4)
    torch.testing.assert_close(layer.lora_B @ layer.lora_A, (u * s) @ v.T, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        for ly in model.adapter_layers().values():
            ly.lora_R.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    y = logits(model, ids())
    peft = pytest.importorskip("peft")
    model.export_peft(tmp_path / "peft")
    served = peft.PeftModel.from_pretrained(quantised_model(folder, backend), str(tmp_path / "peft")).eval()
    _no_cpu_repack(served)
    torch.testing.assert_close(logits(served, ids()), y, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dora_uses_the_dequantised_weight(folder, backend, tmp_path):
    model = sdslora.attach(quantised_model(folder, backend), config("dora"))
    with torch.no_grad():
        for ly in model.adapter_layers().values():
            ly.lora_B.normal_(0, 0.2, generator=torch.Generator().manual_seed(3))
    layer = model.adapter_layers()[Q_PROJ]
    w0 = dequantized_weight(layer.base_layer).float()
    torch.testing.assert_close(layer._w0(), w0)
    xi = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(4))
    tol = 1e-2 if backend == "bnb-int8" else 1e-4  # bitsandbytes 8-bit computes W0 x in float16 on CPU
    with torch.no_grad():
        torch.testing.assert_close(layer(xi), layer.base_layer(xi) + F.linear(xi, layer.delta_weight()),
                                   rtol=tol, atol=tol)
    y = logits(model, ids())
    with pytest.raises(QuantisedMergeError):
        model.merge()
    peft = pytest.importorskip("peft")
    model.export_peft(tmp_path / "peft")
    served = peft.PeftModel.from_pretrained(quantised_model(folder, backend), str(tmp_path / "peft")).eval()
    _no_cpu_repack(served)
    torch.testing.assert_close(logits(served, ids()), y, rtol=1e-4, atol=1e-4)


# ---- helpers ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_storage_bytes_count_the_packed_weights(folder, backend):
    layer = quantised_model(folder, backend).get_submodule(Q_PROJ)
    n = layer.in_features * layer.out_features
    got = storage_bytes(layer.weight)
    low, high = {"bnb-nf4": (n // 2, n // 2 + n // 16), "bnb-int8": (n, n + 4 * layer.out_features + 1),
                 "torchao-int8": (n, n + 5 * layer.out_features)}[backend]  # int8 + float32 scale + int8 zero
    assert low <= got <= high, (got, n)
    assert quantisation(nn.Linear(2, 2)) is None and storage_bytes(nn.Linear(2, 3).weight) == 24


def test_docs_example_runs(folder, tmp_path, monkeypatch):
    """The ```text example of the "Quantised bases" section of docs/integrations.md runs as written (with MODEL set
    to the tiny Llama; it needs bitsandbytes, which the doc test of that file does not require)."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    section = DOC.read_text().split("## Quantised bases", 1)[1]
    code = re.findall(r"```text\n(.*?)```", section, flags=re.S)[0]
    assert 'MODEL = "HuggingFaceTB/SmolLM2-135M"' in code
    code = code.replace('MODEL = "HuggingFaceTB/SmolLM2-135M"', f"MODEL = {str(folder)!r}")
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(code, "integrations.md[Quantised bases]", "exec"), ns)
    assert (tmp_path / "out/qlora/peft/adapter_config.json").is_file()
    assert not any(is_quantised(m) for m in ns["merged"].modules())


# ---- transformers Trainer ----------------------------------------------------------------------------------------------
def test_hf_trainer_on_a_quantised_base(folder, tmp_path):
    """transformers' Trainer refuses a quantised model without trainable adapters (validate_quantization_for_training);
    an attached model declares its adapters to that check, so it trains, with SDS-LoRA's duties."""
    pytest.importorskip("bitsandbytes")
    from transformers import Trainer, TrainingArguments

    from sdslora.integrations.hf import SDSLoRACallback

    model = sdslora.attach(quantised_model(folder, "bnb-nf4"),
                           config("sds", options={"warmup_steps": 2, "refresh": "every:1"}))
    assert model._hf_peft_config_loaded  # the wrapper declares its adapters
    assert not model.model._hf_peft_config_loaded  # the wrapped transformers model is untouched

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            x = (torch.arange(10) + i) % 64
            return {"input_ids": x, "labels": x.clone()}

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2,
                             report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=Data(), callbacks=[SDSLoRACallback()])
    trainer.train()
    assert all(layer.decoupled for layer in model.adapter_layers().values())
    assert any("sdslora/refresh/layers" in h for h in trainer.state.log_history)


def test_merge_is_all_or_none_on_a_model_with_dense_and_quantised_targets(folder):
    pytest.importorskip("bitsandbytes")
    model = sdslora.attach(quantised_model(folder, "bnb-nf4"), sdslora.AdapterConfig(
        method="lora", r=4, target_modules=["embed_tokens", "q_proj"]))
    randomise(model)
    emb = model.adapter_layers()["model.embed_tokens"]
    before = emb.base_layer.weight.detach().clone()
    y = logits(model, ids())
    for call in (model.merge, model.merge_and_unload):
        with pytest.raises(QuantisedMergeError):
            call()
        assert not emb.merged and torch.equal(emb.base_layer.weight, before)  # the dense layer was not merged
    assert isinstance(model.model.model.embed_tokens, AdapterLayer)  # nor unwrapped
    torch.testing.assert_close(logits(model, ids()), y, rtol=0, atol=0)
