"""torchrun --shard fsdp (FSDP2, gloo on CPU, 2 processes): the single-process adapter, from shards.

The data: 24 rows, 5 held out. The 19 training rows make 5 global batches of 4 per epoch, and
windows of 2 batches: every epoch ends in a partial window of one batch. The 5 validation rows
split 3 / 2 over the processes, so process 1 runs a stand-in batch to keep the collectives in step.
Every weight of the base is re-drawn large enough to matter (the tiny models' 0.2 init would
leave some tensors without influence on the loss).
"""

import json

import pytest
import torch

from conftest import (
    assert_same_adapters,
    ctrl_c_under_torchrun,
    overfit_rows,
    redraw,
    train_cli,
    write_json,
)

# fp32: the same sums in another order. Measured: ≤ 6e-7 on weights up to 0.15.
FP32_ATOL = 1e-5

COMMON = ["--targets", "all-linear", "--rank", "4", "--alpha", "8", "--dropout", "0",
          "--lr", "1e-2", "--warmup", "0", "--grad-accum", "2", "--epochs", "2", "--seed", "3",
          "--val-size", "5", "--eval-every", "1", "--no-progress"]  # fmt: skip
SINGLE = ["--batch-size", "4"]
FSDP = ["--batch-size", "2", "--shard", "fsdp"]


def redraw_weights(src, dst, tied: bool):
    """`src`'s architecture and tokenizer, every weight re-drawn to matter, saved to `dst`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(src)
    config.tie_word_embeddings = tied
    model = redraw(AutoModelForCausalLM.from_config(config), seed=1)
    model.save_pretrained(dst)
    for f in src.iterdir():  # tokenizer, chat template, generation config
        if not (dst / f.name).exists():
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def train(args, nproc=None, ok=True):
    return train_cli(args, nproc, ok)


@pytest.fixture(scope="module")
def lab(tiny_models, tmp_path_factory):
    """Models (qwen3 with tied embeddings: they share the root's FSDP unit), data, and a cache
    of finished runs, so each configuration trains once for all tests."""
    tmp = tmp_path_factory.mktemp("fsdp")
    models = {
        "qwen2": redraw_weights(tiny_models["qwen2"], tmp / "qwen2", tied=False),
        "qwen3": redraw_weights(tiny_models["qwen3"], tmp / "qwen3", tied=True),
    }
    data = write_json(tmp / "rows.json", overfit_rows(24))
    runs = {}

    def run(name, arch, extra, nproc=None):
        """Train into tmp/name once; returns (output directory, finished process)."""
        if name not in runs:
            out = tmp / name
            args = ["--model", str(models[arch]), "--data", str(data), *COMMON, *extra]
            runs[name] = (out, train([*args, "--output", str(out)], nproc))
        return runs[name]

    return tmp, models, data, run


def records(out, key):
    """Every value of `key` in metrics.jsonl (the final evaluation has a line of its own)."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r[key] for r in map(json.loads, lines) if key in r]


@pytest.mark.parametrize(
    "arch, extra",
    [("qwen2", []), ("qwen3", ["--grad-checkpointing", "--fsdp-offload"])],
    ids=["qwen2", "qwen3-tied-checkpointing-offload"],
)
def test_two_fsdp_processes_equal_one_process_with_the_same_global_batch(lab, arch, extra):
    _, _, _, run = lab
    single, _ = run(f"single-{arch}", arch, SINGLE)
    fsdp, p = run("-".join(["fsdp", arch, *extra]), arch, FSDP + extra, nproc=2)
    assert "2 processes (torchrun), model sharded (FSDP)" in p.stdout
    assert p.stdout.count("adapter saved to") == 1  # gathered, written by process 0 alone
    assert_same_adapters(single, fsdp, atol=FP32_ATOL)
    assert_same_adapters(single / "best", fsdp / "best", atol=FP32_ATOL)
    assert len(records(fsdp, "loss")) == 6  # 3 windows per epoch, the third partial
    for key in ("loss", "grad_norm", "val_loss"):  # val_loss: 3 + 2 rows, summed over processes
        assert records(fsdp, key) == pytest.approx(records(single, key), rel=1e-5), key
    # The clipped norm is the global one although each process holds half of each gradient;
    # --max-grad-norm 1 clips every step, so a wrong norm would change the adapter.
    assert min(records(fsdp, "grad_norm")) > 1.0
    assert (single / "adapter_config.json").read_text() == (
        fsdp / "adapter_config.json"
    ).read_text()


def test_fsdp_adapter_loads_in_peft_with_the_saved_values(lab):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    _, models, _, run = lab
    fsdp, _ = run("fsdp-qwen2", "qwen2", FSDP, nproc=2)
    model = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(models["qwen2"]), fsdp
    )
    saved = load_file(fsdp / "adapter_model.safetensors")
    loaded = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    assert saved.keys() == loaded.keys() and len(saved) == 2 * 7 * 2  # A, B × 7 linears × 2 layers
    for key, value in saved.items():
        assert torch.equal(loaded[key], value)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_16_bit_under_fsdp_equals_16_bit_under_ddp(lab, precision):
    """bf16/fp16 through FSDP2's policy (weights gathered in 16 bits, gradients reduced in fp32;
    fp16 with the sharded GradScaler) computes what DDP computes with autocast on the same
    per-process rows. (Against one process with 4-row batches, both differ by up to 0.02 on
    weights of 0.15: 16-bit products of other shapes round differently, and Adam turns those
    roundings into full steps on small gradients.)"""
    _, _, _, run = lab
    ddp, _ = run(f"ddp-{precision}", "qwen2", ["--batch-size", "2", "--precision", precision], 2)
    fsdp, _ = run(f"fsdp-{precision}", "qwen2", FSDP + ["--precision", precision], nproc=2)
    assert_same_adapters(ddp, fsdp, atol=1e-6)  # measured: bf16 1.5e-8, fp16 2.2e-8


def test_resume_under_fsdp_equals_an_uninterrupted_fsdp_run(lab):
    _, models, data, run = lab
    whole, _ = run("fsdp-qwen2", "qwen2", FSDP, nproc=2)
    out, _ = run("fsdp-stopped", "qwen2", FSDP + ["--stop-after-steps", "2"], nproc=2)
    ckpt = out / "checkpoint-2"
    shards = sorted(p.name for p in (ckpt / "optimizer").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # each process wrote its own
    state = torch.load(ckpt / "training_state.pt", weights_only=True)
    assert state["optimizer"] is None and state["scheduler"]
    args = ["--model", str(models["qwen2"]), "--data", str(data), *COMMON, *FSDP]
    train([*args, "--output", str(out), "--resume", "auto"], nproc=2)
    assert_same_adapters(whole, out, atol=1e-6)


def test_an_fsdp_checkpoint_resumed_by_another_number_of_processes_is_refused(lab):
    tmp, models, data, _ = lab
    out = tmp / "fsdp-stopped-again"
    args = ["--model", str(models["qwen2"]), "--data", str(data), *COMMON]
    train([*args, *FSDP, "--stop-after-steps", "1", "--output", str(out)], nproc=2)
    p = train([*args, *SINGLE, "--output", str(out), "--resume", "auto"], ok=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "world_size was 2, now 1" in p.stderr and "shard was 'fsdp', now 'ddp'" in p.stderr


def test_ctrl_c_under_fsdp_saves_once_and_resumes(lab):
    tmp, models, data, _ = lab
    out = tmp / "fsdp-interrupted"
    args = ["--model", str(models["qwen2"]), "--data", str(data), *COMMON, *FSDP]
    _, _, checkpoint = ctrl_c_under_torchrun([*args, "--epochs", "100000"], out)
    assert (checkpoint / "optimizer" / "__1_0.distcp").is_file()
    step = int(checkpoint.name.split("-")[1])
    more = ["--epochs", "100000", "--max-steps", str(step + 1), "--resume", "auto"]
    train([*args, *more, "--output", str(out)], nproc=2)
    assert (out / "adapter_model.safetensors").is_file()


# Bad setups: refused in one line before any weight is read.


@pytest.fixture
def config_only_model(qwen2_dir, tmp_path):
    """The tiny model's config and tokenizer without its weights: loading them would fail."""
    for f in qwen2_dir.iterdir():
        if not f.name.endswith(".safetensors"):
            (tmp_path / f.name).write_bytes(f.read_bytes())
    return tmp_path


def test_fsdp_without_torchrun_is_refused(config_only_model, tmp_path):
    data = write_json(tmp_path / "rows.json", overfit_rows(4))
    p = train(["--model", config_only_model, "--data", data, "--shard", "fsdp",
               "--output", tmp_path / "out"], ok=False)  # fmt: skip
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert (
        "--shard fsdp splits the model across processes: start 2 or more with torchrun" in p.stderr
    )


def test_more_processes_than_decoder_layers_is_refused(config_only_model):
    from lora.errors import UserError
    from lora.train.config import TrainConfig
    from lora.train.distributed import DistInfo
    from lora.train.sharding import check_sharding

    cfg = TrainConfig(model=str(config_only_model), shard="fsdp")
    check_sharding(cfg, DistInfo(rank=0, world_size=2))  # 2 layers, 2 processes: fine
    with pytest.raises(UserError, match="3 processes but .* has only 2 decoder layers"):
        check_sharding(cfg, DistInfo(rank=0, world_size=3))


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"shard": "fsdp", "quantize": "nf4"}, "--quantize nf4 does not work with --shard fsdp"),
        ({"fsdp_offload": True}, "--fsdp-offload needs --shard fsdp"),
        ({"shard": "zero3"}, "--shard must be ddp or fsdp, got 'zero3'"),
    ],
)
def test_unsupported_sharding_settings_are_refused_by_check_config(flags, message):
    from lora.errors import UserError
    from lora.train.config import TrainConfig, check_config

    with pytest.raises(UserError, match=message):
        check_config(TrainConfig(**flags))
