"""SDS-LoRA beyond one process (issue 5): DDP, FSDP2 and the HF Trainer under torchrun (gloo, 2 CPU processes).

Each scenario runs in scripts under tests/dist_scripts/ launched with ``python -m torch.distributed.run``; they
compare every run with a one-process run on the same global batch and write a JSON summary that is checked here.
Also: the Controller's setup errors for wrappings it cannot serve (DeepSpeed ZeRO, FSDP1), its schedule query
``plan.due`` against what the duties really do, and micro-batch calls under Accelerate's gradient accumulation.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from models import batch_for, tiny_llama

import sdslora
from sdslora.methods.plan import StepOutcome

SCRIPTS = Path(__file__).parent / "dist_scripts"
T = 20


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    """Tiny matmuls: one thread is faster than two contending ones on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(script: str, tmp_path: Path, timeout: int = 150) -> dict[str, Any]:
    out = tmp_path / f"{script}.json"
    env = dict(os.environ, SDSLORA_TEST_OUT=str(out), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    for attempt in (1, 2):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(_free_port()),
            str(SCRIPTS / script),
        ]
        proc = subprocess.run(
            cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=timeout
        )
        # a worker killed by a signal before any Python error (gloo's TCP rendezvous on a loaded machine, a port
        # taken between _free_port() and the bind) is retried once on a new port; a Python error fails at once
        root = proc.stderr.rsplit("Root Cause", 1)[-1] if "Root Cause" in proc.stderr else ""
        killed = re.search(r"exitcode\s*:\s*-\d+", root) is not None  # the first failure was a signal
        if proc.returncode == 0 or not killed or attempt == 2:
            break
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def ddp_fsdp(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _launch("ddp_fsdp.py", tmp_path_factory.mktemp("ddp_fsdp"))


DUTY_STEPS = [
    "10",
    "12",
    "14",
    "16",
    "18",
    "20",
]  # re-parameterisation after 10, refreshes every 2 steps after


def _check_run(run: dict[str, Any], ref_losses: list[float]) -> None:
    assert run["events"] == ["reparameterise"] + ["refresh"] * 5
    # the loss curve of 2 ranks x 2 samples equals one process on the 4 samples
    assert len(run["losses"]) == T
    assert max(abs(a - b) for a, b in zip(run["losses"], ref_losses, strict=True)) < 1e-5
    # after the re-parameterisation and every refresh, every rank holds bitwise the same A, B, Q_A, Q_B, phase
    assert sorted(run["identical"], key=int) == DUTY_STEPS
    assert all(run["identical"].values())
    # ... and the same values as the one-process run (float tolerance: the gradient all-reduce sums differently)
    assert max(run["vs_ref"].values()) < 1e-4


def test_ddp_matches_one_process_and_ranks_stay_identical(ddp_fsdp: dict[str, Any]) -> None:
    assert ddp_fsdp["world"] == 2
    assert ddp_fsdp["ref_events"] == ["reparameterise"] + ["refresh"] * 5
    for key in ("ddp", "ddp_nosync"):  # identical even without the Controller's broadcast (same hardware)
        run = ddp_fsdp[key]
        _check_run(run, ddp_fsdp["ref_losses"])
        assert run["no_grad"] == []  # no trainable parameter left without a gradient
        assert (
            run["phase"] == 1 and run["decoupled"] is True
        )  # DDP's buffer broadcast does not undo the phase


def test_ddp_merge_and_restart_keeps_ranks_identical(ddp_fsdp: dict[str, Any]) -> None:
    run = ddp_fsdp["ddp_relora_sds"]
    # cycles of 10: re-parameterise after local step 4, refresh after 6 and 8, restart after 10
    assert run["events"] == ["reparameterise", "refresh", "refresh", "restart"] * 2
    assert sorted(run["identical"], key=int) == ["4", "6", "8", "10", "14", "16", "18", "20"]
    assert all(run["identical"].values()) and run["base_identical"]  # factors, merged update, frozen weights
    assert max(run["vs_ref"].values()) < 1e-4


def test_ddp_adalora_prunes_the_same_triplets_on_every_rank_as_one_process(ddp_fsdp: dict[str, Any]) -> None:
    """AdaLoRA's importances come from the gradients after DDP's all-reduce: every rank prunes the same triplets,
    and the same ones as one process on the global batch (its orthogonality penalty included in the loss)."""
    run = ddp_fsdp["ddp_adalora"]
    assert run["events"] == ["prune"] * 6  # after steps 6, 8, ..., 16; the fixed pattern re-applied after
    assert sorted(run["identical"], key=int) == ["6", "8", "10", "12", "14", "16"]
    assert all(run["identical"].values()) and run["no_grad"] == []
    assert run["kept"] == run["ref_kept"] and run["kept"][-1] == 2 * 6  # target_r 2 on 6 layers
    assert max(abs(a - b) for a, b in zip(run["losses"], run["ref_losses"], strict=True)) < 1e-5
    assert max(run["vs_ref"].values()) < 1e-4


def test_ddp_sync_repairs_rank_divergence(ddp_fsdp: dict[str, Any]) -> None:
    synced, unsynced = ddp_fsdp["ddp_perturbed_sync"], ddp_fsdp["ddp_perturbed_nosync"]
    assert synced["identical_before_duty_12"] is False and unsynced["identical_before_duty_12"] is False
    assert all(synced["identical"].values())  # the broadcast from rank 0 after the duty
    assert unsynced["identical"]["10"] and not any(unsynced["identical"][s] for s in DUTY_STEPS[1:])


@pytest.mark.parametrize("key", ["fsdp", "fsdp_orthogonal"])
def test_fsdp2_duties_gather_adapter_only_and_match_one_process(ddp_fsdp: dict[str, Any], key: str) -> None:
    run = ddp_fsdp[key]
    _check_run(run, run["ref_losses"])
    assert all(run["sharded_after"].values())  # A, B are DTensor shards again after every duty
    assert run["n_gathered"] > 0 and run["gathered_only_adapter"]  # never W0
    # save / export from the sharded model: every rank called, rank 0 wrote (native + PEFT), rank 1 nothing
    assert run["writes_per_rank"] == [2, 0]
    assert run["saved_keys_match"] and run["saved_vs_model"] == 0.0 and run["saved_vs_ref"] < 1e-4
    assert run["peft_delta_err"] < 1e-6


# ---- setup errors and schedule query (one process) ----------------------------------------------------------------
def _sds_model() -> sdslora.AdaptedModel:
    torch.manual_seed(0)
    return sdslora.attach(tiny_llama(), sdslora.AdapterConfig(method="sds", r=4, target_modules=["q_proj"]))


def test_deepspeed_zero3_params_raise_at_setup() -> None:
    model = _sds_model()
    next(iter(model.adapter_layers().values())).lora_A.ds_id = 7  # what DeepSpeed ZeRO-3 puts on its params
    opt = torch.optim.AdamW(model.trainable_parameters())
    with pytest.raises(ValueError, match="ZeRO-3.*Use DDP or FSDP2"):
        sdslora.Controller(model, opt, total_steps=T)


def test_deepspeed_optimizer_raises_at_setup() -> None:
    model = _sds_model()
    inner = torch.optim.AdamW(model.trainable_parameters())
    zero = type("DeepSpeedZeroOptimizer", (), {"__module__": "deepspeed.runtime.zero.stage_1_and_2"})()
    zero.optimizer = inner
    with pytest.raises(ValueError, match="DeepSpeed optimizer DeepSpeedZeroOptimizer"):
        sdslora.Controller(model, zero, total_steps=T)
    # plain LoRA has no duties: nothing to refuse
    lora = sdslora.attach(tiny_llama(), sdslora.AdapterConfig(method="lora", r=4, target_modules=["q_proj"]))
    sdslora.Controller(lora, zero)


def test_real_fsdp1_is_refused_at_setup(ddp_fsdp: dict[str, Any]) -> None:
    errors = ddp_fsdp["fsdp1_errors"]
    assert len(errors) == 2 and all("FSDP1" in e and "Use DDP or FSDP2" in e for e in errors)


def test_methods_with_duties_on_unsharded_tensors_are_refused_under_fsdp2(ddp_fsdp: dict[str, Any]) -> None:
    errors = ddp_fsdp["fsdp2_refused"]
    assert sorted(errors) == ["adalora", "relora_sds"]
    for method, e in errors.items():
        assert f"method {method!r}" in e and "FSDP2" in e and "Use DDP" in e


def test_fsdp1_flattened_params_raise_at_setup() -> None:
    model = _sds_model()
    next(iter(model.adapter_layers().values())).lora_B._fsdp_flattened = True  # FSDP1's mark on its params
    with pytest.raises(ValueError, match="FSDP1"):
        sdslora.Controller(model, torch.optim.AdamW(model.trainable_parameters()), total_steps=T)


def test_bad_sync_value() -> None:
    model = _sds_model()
    with pytest.raises(ValueError, match="sync must be"):
        sdslora.Controller(model, torch.optim.AdamW(model.trainable_parameters()), total_steps=T, sync="yes")


@pytest.mark.parametrize(
    "method,options,total",
    [
        ("sds", {}, 40),
        ("sds", {"refresh": "every:3"}, 25),
        ("sds", {"warmup_mode": "init_phase"}, 75),
        ("orthogonal", {"refresh": "never"}, 30),
    ],
)
def test_plan_due_matches_what_the_duties_do(method: str, options: dict[str, Any], total: int) -> None:
    """The Controller runs the plan (and gathers / syncs) only on steps where ``plan.due(t)``: that must cover every
    step whose duties act, so the plan is run on every step here and compared."""
    model = sdslora.attach(
        tiny_llama(), sdslora.AdapterConfig(method=method, r=2, target_modules=["q_proj"], options=options)
    )
    ctl = sdslora.Controller(model, torch.optim.SGD(model.trainable_parameters(), lr=0.0), total_steps=total)
    plan = ctl.plan
    for t in range(1, total + 1):
        out = plan.run(ctl.layers, t)
        acted = bool(out.events or out.reset_params or getattr(out, "state_maps", None))
        assert acted == plan.due(t), t


class _GradState:
    sync_gradients = True


class _AcceleratedLike(torch.optim.Optimizer):
    """Minimal stand-in with accelerate's AcceleratedOptimizer interface (gradient_state.sync_gradients)."""

    def __init__(self, inner: torch.optim.Optimizer):
        self.optimizer, self.gradient_state = inner, _GradState()

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @property
    def param_groups(self) -> Any:  # type: ignore[override]
        return self.optimizer.param_groups

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        if self.gradient_state.sync_gradients:
            self.optimizer.step(closure)


def test_accumulation_micro_batches_do_not_count() -> None:
    """With Accelerate's accumulate(), step() after a skipped (micro-batch) optimizer step is ignored."""
    torch.manual_seed(0)
    cfg = sdslora.AdapterConfig(method="sds", r=4, target_modules=["q_proj"], options={"warmup_steps": 3})
    model = sdslora.attach(tiny_llama(), cfg)
    opt = _AcceleratedLike(torch.optim.AdamW(model.trainable_parameters(), lr=1e-3))
    ctl = sdslora.Controller(model, opt, total_steps=T)
    batch = batch_for("llama")
    outcomes: list[StepOutcome] = []
    for micro in range(1, 2 * 6 + 1):  # 2 micro-batches per optimizer step, 6 optimizer steps
        opt.gradient_state.sync_gradients = micro % 2 == 0
        (model(**batch).loss / 2).backward()
        opt.step()
        if opt.gradient_state.sync_gradients:
            opt.optimizer.zero_grad()
        outcomes.append(ctl.step())
    assert ctl.t == 6
    # decaying schedule, T=20: re-parameterisation after optimizer step 3, refreshes after 4 and 6
    assert [(e["step"], e["event"]) for e in ctl.events] == [
        (3, "reparameterise"),
        (4, "refresh"),
        (6, "refresh"),
    ]
    assert [i for i, o in enumerate(outcomes, 1) if o.events] == [6, 8, 12]  # the micro-batches that end them


def test_hf_trainer_under_torchrun_with_accumulation(ddp_fsdp: dict[str, Any]) -> None:
    """The HF Trainer wraps the model in DDP under torchrun; SDSLoRACallback is all a user adds."""
    run = ddp_fsdp["trainer"]
    assert run["wrapped"] == "DistributedDataParallel"
    # gradient accumulation 2: 40 micro-batches, 20 optimizer steps, and the Controller counts the latter
    assert run["micro_batches"] == 2 * T and run["global_step"] == T and run["controller_t"] == T
    assert run["event_steps"] == [10, 12, 14, 16, 18, 20]
    _check_run(run, run["ref_losses"])
    assert run["final_vs_ref"] < 1e-4


def test_accelerate_loop_with_accumulate(ddp_fsdp: dict[str, Any]) -> None:
    """accelerator.prepare() (DDP) + accumulate(): step() after every micro-batch still counts optimizer steps."""
    run = ddp_fsdp["accelerate"]
    assert run["wrapped"] == "DistributedDataParallel"
    assert run["calls"] == 2 * T and run["controller_t"] == T
    assert run["event_steps"] == [10, 12, 14, 16, 18, 20]
    _check_run(run, ddp_fsdp["ref_losses"])
