"""Every precision path a GPU takes (bf16, fp16 + GradScaler), run on the CPU.

PyTorch's CPU backend has the same machinery as CUDA: bf16/fp16 weights, autocast, GradScaler.
So the code a GPU user runs is exercised here, on tiny Qwen2 and Qwen3 models.
"""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

import lora.train.run
from conftest import overfit_rows, single_process_run, write_json
from lora.adapter import save_adapter
from lora.data.batching import collate
from lora.data.prompt import PromptFormat, encode_sample
from lora.data.records import Sample, Turn
from lora.errors import UserError
from lora.export.merged import export_merged
from lora.infer.generate import LoadOptions, load_for_inference, merge_and_measure, single_turn
from lora.inject import apply_lora, lora_layers, lora_parameters
from lora.layer import LoRALinear
from lora.model import load_model, load_tokenizer
from lora.spec import LoRASpec
from lora.train.loop import MAX_BAD_STEPS, TrainConfig, backward_window, optimizer_step, train
from lora.train.loss import CausalLMLoss
from lora.train.precision import (
    DTYPES,
    autocast_for,
    grad_scaler_for,
    inference_dtype,
    resolve_precision,
)
from lora.train.run import load_model_with_lora
from lora.train.schedule import lr_factor, warmup_cosine

CPU = torch.device("cpu")
PRECISIONS = ["fp32", "bf16", "fp16"]
HALF = ["bf16", "fp16"]

# One window's LoRA gradient, 16-bit vs fp32, as ‖g − g_fp32‖ / ‖g_fp32‖ per parameter.
# Measured on the tiny models (large 0.2 init, the worst case): bf16 ≤ 0.056, fp16 ≤ 0.008.
# bf16 keeps 8 significant bits (2^-8 ≈ 0.004 per rounding), fp16 11 bits (≈ 0.0005).
GRAD_TOLERANCE = {"fp32": 0.0, "bf16": 0.1, "fp16": 0.02}
# 30 steps: final loss / first loss, 16-bit vs fp32. Measured: within 0.001 of fp32's.
LOSS_RATIO_BAND = 0.02


def cfg(model_dir, data, out, **kw):
    base = dict(
        model=str(model_dir), data=str(data), output=str(out), rank=4, alpha=8, dropout=0.0,
        batch_size=8, grad_accum=1, lr=1e-2, warmup=0, max_steps=4, progress=False, seed=0,
        targets="all-linear",
    )  # fmt: skip
    return TrainConfig(**(base | kw))


def one_window(model_dir, n=4):
    tok = load_tokenizer(str(model_dir))
    rows = overfit_rows(n)
    enc = [
        encode_sample(Sample((Turn(r["instruction"], r["output"]),)), PromptFormat("chat"), tok)
        for r in rows
    ]
    return [collate(enc, tok.pad_token_id)]


def lora_model(model_dir, precision):
    """The training path's model, with the same non-zero adapter in every precision."""
    model, _ = load_model_with_lora(cfg(model_dir, "-", "-"), CPU, precision)
    torch.manual_seed(0)
    for layer in lora_layers(model).values():
        torch.nn.init.kaiming_uniform_(layer.lora_A.weight, a=math.sqrt(5))
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    return model


def unscaled_window_gradient(model, precision, window):
    """One optimizer step's gradient as AdamW would see it: after backward and unscaling."""
    params = lora_parameters(model)
    optimizer = torch.optim.AdamW(params)
    scaler = grad_scaler_for(precision, CPU)
    backward_window(single_process_run(model, autocast_for(precision, CPU), scaler), window)
    if scaler:
        scaler.unscale_(optimizer)
    return [p.grad.clone() for p in params]


# --- auto and explicit choices -------------------------------------------------------------


def fake_gpu(monkeypatch, native_bf16: bool):
    """A CUDA machine as torch reports it: pre-Ampere GPUs *emulate* bf16 (slowly)."""

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return including_emulation or native_bf16

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)


@pytest.mark.parametrize("native_bf16,expected", [(True, "bf16"), (False, "fp16")])
def test_auto_uses_bf16_only_on_gpus_with_native_bf16_else_fp16(monkeypatch, native_bf16, expected):
    fake_gpu(monkeypatch, native_bf16)
    gpu = torch.device("cuda")
    assert resolve_precision("auto", gpu) == expected  # training
    assert inference_dtype("auto", gpu) == DTYPES[expected]  # generation


def test_auto_is_fp32_on_cpu_and_explicit_16_bit_choices_work_on_cpu():
    assert (
        resolve_precision("auto", CPU) == "fp32" and inference_dtype("auto", CPU) == torch.float32
    )
    assert [resolve_precision(p, CPU) for p in PRECISIONS] == PRECISIONS
    with pytest.raises(UserError, match="--precision must be one of"):
        resolve_precision("fp8", CPU)


# --- dtypes and gradients ------------------------------------------------------------------


@pytest.mark.parametrize("precision", PRECISIONS)
def test_base_is_stored_in_the_precision_and_lora_weights_and_gradients_are_fp32(
    arch_dir, precision
):
    model = lora_model(arch_dir, precision)
    lora_ids = {id(p) for p in lora_parameters(model)}
    base = [p for p in model.parameters() if id(p) not in lora_ids]
    assert {p.dtype for p in base} == {DTYPES[precision]}
    grads = unscaled_window_gradient(model, precision, one_window(arch_dir))
    assert {p.dtype for p in lora_parameters(model)} == {torch.float32}
    assert {g.dtype for g in grads} == {torch.float32}
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("precision", HALF)
def test_one_step_lora_gradient_agrees_with_fp32_within_tolerance(arch_dir, precision):
    window = one_window(arch_dir)
    reference = unscaled_window_gradient(lora_model(arch_dir, "fp32"), "fp32", window)
    grads = unscaled_window_gradient(lora_model(arch_dir, precision), precision, window)
    worst = max(float((g - r).norm() / r.norm()) for g, r in zip(grads, reference))
    assert worst <= GRAD_TOLERANCE[precision], worst


@pytest.fixture(scope="module")
def loss_ratio_after_30_steps(tmp_path_factory):
    """(model dir, precision) -> last loss / first loss over 30 steps on 8 rows (cached)."""
    cache = {}

    def ratio(model_dir, precision):
        if (model_dir, precision) not in cache:
            tmp = tmp_path_factory.mktemp(precision)
            data = write_json(tmp / "rows.json", overfit_rows(8))
            run = cfg(model_dir, data, tmp / "out", max_steps=30, precision=precision)
            history = train(run).history
            cache[model_dir, precision] = history[-1]["loss"] / history[0]["loss"]
        return cache[model_dir, precision]

    return ratio


@pytest.mark.parametrize("precision", HALF)
def test_30_steps_bring_the_loss_down_as_fp32_does(arch_dir, precision, loss_ratio_after_30_steps):
    fp32 = loss_ratio_after_30_steps(arch_dir, "fp32")
    half = loss_ratio_after_30_steps(arch_dir, precision)
    assert fp32 < 0.5, fp32  # the reference itself learns
    assert abs(half - fp32) <= LOSS_RATIO_BAND, (half, fp32)


def test_adapter_path_under_autocast_makes_no_fp32_copy_of_the_input():
    """Under autocast, A and B are cast to bf16; x is not cast to fp32 and back (2 copies)."""
    layer = LoRALinear(torch.nn.Linear(64, 48).to(torch.bfloat16), r=4)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)

    class Created(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.outputs = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                self.outputs.append((out.dtype, tuple(out.shape)))
            return out

    with torch.autocast("cpu", dtype=torch.bfloat16), Created() as created:
        h = layer(x)
    assert h.dtype == torch.bfloat16
    assert (torch.float32, tuple(x.shape)) not in created.outputs
    assert (torch.bfloat16, tuple(x.shape)) not in created.outputs  # no copy at all
    # Same function as the fp32 adapter path, up to bf16 rounding.
    torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = layer(x)
    reference = layer.base_layer(x).float() + layer.scaling * (
        x.float() @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    )
    torch.testing.assert_close(h.float(), reference, atol=0.05, rtol=0.02)


# --- optimizer_step: overflow, divergence, schedule -----------------------------------------


def step_run(precision, warmup=2, total=10, init_scale=2.0**16, fused=False):
    """The parts of a Run that optimizer_step touches, around one fp32 parameter.

    `fused=True` is the AdamW a GPU run uses: GradScaler hands it the inf check itself.
    """
    param = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.AdamW([param], lr=0.1, fused=fused)
    scaler = grad_scaler_for(precision, CPU)
    if scaler:
        scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    logs = []
    run = SimpleNamespace(
        cfg=SimpleNamespace(max_grad_norm=1.0, lr=0.1), params=[param], optimizer=optimizer,
        scaler=scaler, scheduler=warmup_cosine(optimizer, warmup, total),
        state=SimpleNamespace(step=0), log=logs.append, last_loss=None, bad_steps=0,
    )  # fmt: skip
    return run, param, logs


def backward(run, param, grad_value=1.0):
    """Leave the gradient `grad_value` per element, through the scaler as training does."""
    loss = (param * grad_value).sum()
    (run.scaler.scale(loss) if run.scaler else loss).backward()


@pytest.mark.parametrize("fused", [False, True])
def test_gradscaler_overflow_skips_the_update_lowers_the_scale_and_is_not_divergence(fused):
    run, param, logs = step_run("fp16", fused=fused)
    for _ in range(MAX_BAD_STEPS + 2):  # more overflows in a row than divergence allows
        scale = run.scaler.get_scale()
        backward(run, param, float("inf"))
        before = param.detach().clone()
        grad_norm, _ = optimizer_step(run, loss=1.0)
        assert not math.isfinite(grad_norm) and torch.equal(param, before)
        assert run.scaler.get_scale() == scale / 2 and run.bad_steps == 0
        assert run.scheduler.last_epoch == 0  # the schedule did not move
        run.state.step += 1
    assert all("overflowed" in line for line in logs) and len(logs) == MAX_BAD_STEPS + 2
    backward(run, param)  # a finite gradient again: the update happens
    optimizer_step(run, loss=1.0)
    assert not torch.equal(param, torch.ones(4)) and run.scheduler.last_epoch == 1


def test_overflow_at_a_loss_scale_below_one_counts_as_divergence():
    run, param, _ = step_run("fp16", init_scale=0.5)
    backward(run, param, float("inf"))
    optimizer_step(run, loss=1.0)
    assert run.bad_steps == 1


@pytest.mark.parametrize("precision", PRECISIONS)
def test_three_nan_losses_in_a_row_stop_with_advice_and_skips_leave_the_schedule(precision):
    run, param, logs = step_run(precision)
    for k in range(MAX_BAD_STEPS - 1):
        backward(run, param, float("nan"))
        optimizer_step(run, loss=float("nan"))
        assert run.bad_steps == k + 1 and torch.equal(param, torch.ones(4))
    assert run.scheduler.last_epoch == 0
    backward(run, param, float("nan"))
    with pytest.raises(UserError, match="training diverged. Try a lower --lr"):
        optimizer_step(run, loss=float("nan"))


def test_the_learning_rate_returned_is_the_one_the_step_used():
    run, param, _ = step_run("fp32", warmup=3, total=6)
    used = []
    for _ in range(6):
        backward(run, param)
        used.append(optimizer_step(run, loss=1.0)[1])
    assert used == pytest.approx([0.1 * lr_factor(k, 3, 6) for k in range(6)], rel=1e-12)


def test_logged_lr_is_the_rate_each_step_used_not_the_next_one(qwen2_dir, tmp_path):
    data = write_json(tmp_path / "rows.json", overfit_rows(8))
    result = train(cfg(qwen2_dir, data, tmp_path / "o", warmup=3, max_steps=5, lr=1e-2))
    logged = [r["lr"] for r in result.history]
    assert logged == pytest.approx([1e-2 * lr_factor(k, 3, 5) for k in range(5)], rel=1e-12)
    assert logged[0] == pytest.approx(1e-2 / 4)  # first warmup step: 1/(warmup+1) of the peak


class InfGradient(torch.autograd.Function):
    """Identity forward; backward sends back inf: an fp16 gradient overflow, on demand."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def overflowing_loss(monkeypatch, calls_to_overflow: set):
    """Patch the training loss so that the given forward calls (1-based) overflow in backward."""
    calls = {"n": 0}

    class Overflowing(CausalLMLoss):
        def forward(self, *args):
            calls["n"] += 1
            loss, n = super().forward(*args)
            return (InfGradient.apply(loss) if calls["n"] in calls_to_overflow else loss), n

    monkeypatch.setattr(lora.train.run, "CausalLMLoss", Overflowing)
    return calls


def test_fp16_training_rides_through_overflows_without_moving_the_schedule(
    qwen2_dir, tmp_path, monkeypatch, capsys
):
    overflowing_loss(monkeypatch, {2, 3, 4})  # three in a row: would stop a run if divergence
    data = write_json(tmp_path / "rows.json", overfit_rows(8))
    result = train(cfg(qwen2_dir, data, tmp_path / "o", precision="fp16", warmup=2, max_steps=6))
    assert result.finished and result.steps == 6
    assert capsys.readouterr().out.count("fp16 gradients overflowed") == 3
    # Steps 2-4 were skipped: steps 2-5 all use the schedule's 2nd rate, step 6 its 3rd.
    rates = [1e-2 * lr_factor(k, 2, 6) for k in (0, 1, 1, 1, 1, 2)]
    assert [r["lr"] for r in result.history] == pytest.approx(rates, rel=1e-12)


@pytest.mark.parametrize("precision", HALF)
def test_nan_losses_stop_a_16_bit_run_with_advice(qwen2_dir, tmp_path, monkeypatch, precision):
    class AlwaysNaN(CausalLMLoss):
        def forward(self, *args):
            loss, n = super().forward(*args)
            return loss * float("nan"), n

    monkeypatch.setattr(lora.train.run, "CausalLMLoss", AlwaysNaN)
    data = write_json(tmp_path / "rows.json", overfit_rows(8))
    with pytest.raises(UserError, match="lower --lr"):
        train(cfg(qwen2_dir, data, tmp_path / "o", precision=precision, max_steps=5))


# --- resume ----------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", HALF)
def test_resume_mid_run_continues_with_the_scaler_state(
    qwen2_dir, tmp_path, monkeypatch, precision
):
    """An overflow at step 2 halves fp16's scale before the checkpoint at step 3: a resumed run
    that lost the scaler state would end with another scale than the uninterrupted one."""
    data = write_json(tmp_path / "rows.json", overfit_rows(12))
    common = dict(max_steps=6, batch_size=4, save_every=3, precision=precision)
    overflowing_loss(monkeypatch, {2})
    train(cfg(qwen2_dir, data, tmp_path / "straight", **common))
    overflowing_loss(monkeypatch, {2})
    partial = train(cfg(qwen2_dir, data, tmp_path / "resumed", stop_after_steps=3, **common))
    assert not partial.finished
    overflowing_loss(monkeypatch, set())
    resumed = train(cfg(qwen2_dir, data, tmp_path / "resumed", resume="auto", **common))
    assert resumed.steps == 6

    def final(run_dir):
        state = torch.load(run_dir / "checkpoint-6" / "training_state.pt", weights_only=True)
        return state["scaler"], load_file(run_dir / "adapter_model.safetensors")

    (scaler_a, adapter_a), (scaler_b, adapter_b) = (
        final(tmp_path / "straight"),
        final(tmp_path / "resumed"),
    )
    if precision == "fp16":
        assert scaler_a["scale"] == 2.0**15 and scaler_a == scaler_b
    else:
        assert scaler_a is None and scaler_b is None
    for key in adapter_a:
        torch.testing.assert_close(adapter_a[key], adapter_b[key], atol=1e-6, rtol=0)


# --- merge and export ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_base_and_adapter(tiny_models, tmp_path_factory):
    """A tiny base saved in bf16 (as real Qwen checkpoints are), and an adapter for it whose ΔW
    is of a typical size relative to W0 (~1%)."""
    from transformers import AutoModelForCausalLM

    tmp = tmp_path_factory.mktemp("bf16")
    source = tiny_models["qwen2"]
    base = tmp / "base"
    AutoModelForCausalLM.from_pretrained(str(source)).to(torch.bfloat16).save_pretrained(base)
    load_tokenizer(str(source)).save_pretrained(base)
    model = load_model(str(base), torch.float32)
    apply_lora(model, LoRASpec("all-linear", r=4, alpha=8, dropout=0.0))
    torch.manual_seed(0)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.01)
    save_adapter(model, tmp / "adapter", base_model_name_or_path=str(base))
    return base, tmp / "adapter"


def test_export_keeps_the_base_checkpoints_dtype(bf16_base_and_adapter, tmp_path):
    base, adapter = bf16_base_and_adapter
    lines = []
    out = export_merged(adapter, tmp_path / "merged", log=lines.append)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
    assert dtypes == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    size = (out / "model.safetensors").stat().st_size
    assert size <= 1.05 * (base / "model.safetensors").stat().st_size
    assert any("saved as bfloat16" in line and "rounding lost" in line for line in lines), lines


def test_layer_merge_reports_the_fraction_of_the_update_rounded_away():
    torch.manual_seed(0)
    for dtype, lost_at_least, lost_at_most in [
        (torch.float32, 0.0, 1e-6),
        (torch.bfloat16, 0.03, 1),
    ]:
        base = torch.nn.Linear(256, 256).to(dtype)
        layer = LoRALinear(base, r=8, alpha=16)
        torch.nn.init.normal_(layer.lora_B.weight, std=1e-3)
        w0, delta = base.weight.float().clone(), layer.delta_weight()
        lost = layer.merge()
        measured = float((base.weight.float() - w0 - delta).norm() / delta.norm())
        assert lost == pytest.approx(measured, rel=1e-3, abs=1e-5)
        assert lost_at_least <= lost <= lost_at_most, (dtype, lost)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_merge_for_generation_measures_the_logit_change_and_says_when_rounded(
    bf16_base_and_adapter, dtype
):
    _, adapter = bf16_base_and_adapter
    loaded = load_for_inference(adapter, LoadOptions(device="cpu", dtype=dtype))
    report = merge_and_measure(loaded, single_turn("你好，世界。"))
    assert all(m.merged for m in lora_layers(loaded.model).values())
    message = report.message()
    assert "max |logit difference| merged vs unmerged" in message
    if dtype == "fp32":
        assert report.lost < 1e-6 and report.max_logit_diff < 1e-4
        assert "exact" in message and "rounded" not in message
    else:
        assert report.lost > 0.01 and report.max_logit_diff > 0
        assert "rounded into bfloat16" in message and f"{report.max_logit_diff:.3g}" in message


def test_infer_merge_prints_the_measured_difference(bf16_base_and_adapter):
    from test_infer import infer

    _, adapter = bf16_base_and_adapter
    p = infer("--adapter", str(adapter), "--merge", "--dtype", "bf16", "--prompt", "你好",
              "--max-new-tokens", "3")  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "rounded into bfloat16" in p.stderr and "max |logit difference|" in p.stderr


# --- DDP -------------------------------------------------------------------------------------


def test_ddp_does_not_broadcast_the_frozen_buffers(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from lora.train.distributed import DistInfo, wrap_for_data_parallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        with_buffers = torch.nn.BatchNorm1d(2)
        assert DistributedDataParallel(with_buffers).will_sync_module_buffers()  # the default
        ddp = wrap_for_data_parallel(with_buffers, CPU, DistInfo(0, 2, 0))
        assert not ddp.will_sync_module_buffers()
    finally:
        dist.destroy_process_group()


# --- make gpu-check --------------------------------------------------------------------------


def test_gpu_check_without_a_gpu_says_so_exits_0_and_claims_nothing():
    import subprocess
    import sys

    from conftest import ROOT

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    p = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "no CUDA GPU" in p.stdout and "nothing was checked" in p.stdout
    assert "passed" not in p.stdout and "tokens/s" not in p.stdout


def test_gpu_check_logic_runs_on_the_cpu_with_a_tiny_config(qwen2_dir, capsys):
    from bench.gpu_check import main

    assert (
        main(["--device", "cpu", "--config", str(qwen2_dir / "config.json"), "--steps", "12"]) == 0
    )
    out = capsys.readouterr().out
    assert out.count("adapter reloads: yes") == 2 and "all checks passed" in out
