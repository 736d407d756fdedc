"""What a run reports: a memory estimate before step 1, one record shape per kind in
metrics.jsonl, a loss plot, and a summary after the last step."""

from __future__ import annotations

import contextlib
import io
import json
import resource
from types import SimpleNamespace

import pytest

from conftest import kept_for_backward, overfit_rows, tiny_config, write_json
from lora.train.cost import activation_bytes, kept_per_token_per_layer, peak_memory, size
from lora.train.loop import train


@pytest.fixture(scope="module")
def finished_run(qwen2_dir, tmp_path_factory):
    """8 rows (2 held out), batch 2: 3 steps per epoch; --max-steps 6 is 2 epochs."""
    tmp = tmp_path_factory.mktemp("cost")
    data = write_json(tmp / "rows.json", overfit_rows(8))
    out = tmp / "out"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        train(tiny_config(qwen2_dir, data, out, max_steps=6, val_size=2))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, json.loads((out / "train_args.json").read_text()), records, printed.getvalue()


def test_the_end_summary_states_time_steps_epochs_tokens_speed_memory_losses_and_files(
    finished_run,
):
    out, args, records, printed = finished_run
    final = args["final"]
    train_records = [r for r in records if r["kind"] == "train"]
    tokens = sum(r["real_tokens"] for r in train_records)
    assert final["steps"] == 6 and final["epochs"] == 2.0
    assert final["tokens_seen"] == tokens
    seconds = sum(r["step_time_s"] for r in train_records)
    assert final["mean_tokens_per_s"] == pytest.approx(tokens / seconds, abs=0.1)
    assert final["train_time_s"] == pytest.approx(seconds, abs=0.01)
    # A fresh run is one process: its own span is the whole run, and its wall time covers it.
    mine = final["this_process"]
    assert (mine["first_step"], mine["steps"], mine["tokens_seen"]) == (1, 6, tokens)
    assert mine["wall_time_s"] >= seconds
    assert final["train_loss"] == train_records[-1]["loss"]
    assert final["val_loss"] == [r for r in records if r["kind"] == "eval"][-1]["val_loss"]
    assert final["peak_memory_measured"] == "max RSS" and final["peak_memory_bytes"] > 50e6
    assert final["files"] == {
        "adapter": str(out / "adapter_model.safetensors"), "best_adapter": str(out / "best"),
        "metrics": str(out / "metrics.jsonl"), "loss_plot": str(out / "loss_curve.png"),
        "train_args": str(out / "train_args.json"),
    }  # fmt: skip
    assert "done: 6 steps (2.00 epochs)" in printed and f"{tokens:,} tokens seen" in printed
    assert f"train_args   {out / 'train_args.json'}" in printed


def test_the_start_estimates_memory_and_the_epochs_of_max_steps(finished_run):
    _, args, _, printed = finished_run
    est = args["estimate"]
    assert est["steps_per_epoch"] == 3 and est["epochs"] == 2.0
    assert 0 < est["activations_bytes_with_grad_checkpointing"] < est["activations_bytes"]
    assert est["adapters_and_optimizer_bytes"] == 16 * args["trainable_params"]
    assert est["weights_bytes"] == 4 * (args["total_params"] - args["trainable_params"])  # fp32
    assert (
        "memory estimate (resident): now" in printed
        and "with --grad-checkpointing (now off)" in printed
    )
    assert "--max-steps 6 = 2.00 epochs (3 optimizer steps per epoch)" in printed


def test_activation_estimate_is_what_the_training_model_keeps(qwen2_dir, tmp_path):
    import torch

    from lora.train.run import load_model_with_lora

    cfg = tiny_config(qwen2_dir, tmp_path / "d.json", tmp_path / "o", targets="q_proj,v_proj")
    model, _ = load_model_with_lora(cfg, torch.device("cpu"), "fp32")
    config, tokens = model.config, 64
    estimated = config.num_hidden_layers * tokens * kept_per_token_per_layer(config) * 4
    ids = torch.randint(0, config.vocab_size, (1, tokens))
    kept = kept_for_backward(
        lambda: model.get_decoder()(input_ids=ids, use_cache=False), exclude=model.parameters()
    )
    measured = sum(t.untyped_storage().nbytes() for t in kept)
    # Off by the norms' per-token scale and the rotary tables; the MLP's activation, if it
    # were kept, would add i/(5h + 2kv + 2i) = 20% here.
    assert measured == pytest.approx(estimated, rel=0.05)


def test_activation_estimate_adds_the_logits_chunk_and_the_final_hidden_state():
    config = SimpleNamespace(hidden_size=8, intermediate_size=16, num_hidden_layers=3,
                             vocab_size=50, num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    full, checkpointed = activation_bytes(
        config, tokens=10, dtype_bytes=2, cfg=SimpleNamespace(loss_chunk=4)
    )
    per_layer = 10 * (5 * 8 + 2 * 4 + 2 * 16) * 2
    head = 4 * 50 * 4 + 2 * 10 * 8 * 4  # one (chunk, vocab) fp32 block, h and ∂loss/∂h
    assert full == 3 * per_layer + head
    assert checkpointed == 3 * 10 * 8 * 2 + per_layer + head


def test_peak_memory_on_cpu_is_the_max_rss():
    import torch

    measured, what = peak_memory(torch.device("cpu"))
    assert what == "max RSS"
    assert measured == resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def test_sizes_read_as_people_write_them():
    assert [size(n) for n in (512, 3.5 * 2**20, 1.25 * 2**30)] == ["512 B", "3.5 MB", "1.2 GB"]


TRAIN_FIELDS = ["kind", "step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "real_tokens",
                "supervised_tokens", "step_time_s"]  # fmt: skip


def test_metrics_jsonl_has_one_record_shape_per_kind(finished_run):
    _, _, records, _ = finished_run
    kinds = [r["kind"] for r in records]
    assert kinds == ["train"] * 6 + ["eval"]  # the final validation follows the last step
    assert all(list(r) == TRAIN_FIELDS for r in records if r["kind"] == "train")
    assert list(records[-1]) == ["kind", "step", "val_loss", "val_ppl"] and records[-1]["step"] == 6


def test_the_loss_plot_has_a_title_integer_steps_and_lr_and_grad_norm_panels(monkeypatch, tmp_path):
    import lora.train.metrics

    figures = []
    monkeypatch.setattr(lora.train.metrics.plt, "close", figures.append)
    history = [{"step": s, "loss": 1 / s, "lr": 0.1, "grad_norm": s} for s in (1, 2, 3)]
    (tmp_path / "run").mkdir()
    lora.train.metrics.plot_loss(
        history, [{"step": 3, "val_loss": 0.5}], tmp_path / "run" / "p.png"
    )
    (fig,) = figures
    loss, lr, norm = fig.axes
    assert fig._suptitle.get_text() == "training run run: 3 steps"
    assert [line.get_label() for line in loss.lines] == ["train loss", "validation loss"]
    assert lr.get_ylabel() == "learning rate" and list(lr.lines[0].get_ydata()) == [0.1] * 3
    assert norm.get_ylabel().startswith("gradient norm")
    assert list(norm.lines[0].get_ydata()) == [1, 2, 3]
    assert all(float(t).is_integer() for t in norm.get_xticks())


def test_the_cpu_total_is_what_stays_resident_plus_what_training_adds():
    """On CPU: the measured RSS (weights included) + adapters + activations + transients, or the
    loading peak when that was higher; on GPU: the allocator's terms alone."""
    from lora.train.config import TrainConfig
    from lora.train.cost import total_bytes

    cfg = TrainConfig()
    gpu = {"weights_bytes": 1000, "adapters_and_optimizer_bytes": 10, "activations_bytes": 300,
           "activations_bytes_with_grad_checkpointing": 100}  # fmt: skip
    assert total_bytes(gpu, cfg) == 1310
    cpu = gpu | {"resident_bytes": 1500, "peak_so_far_bytes": 1200, "transient_bytes": 50}
    assert total_bytes(cpu, cfg) == 1500 + 10 + 300 + 50
    assert total_bytes(cpu | {"peak_so_far_bytes": 9000}, cfg) == 9000  # loading peaked higher
    ckpt = TrainConfig(grad_checkpointing=True)
    assert total_bytes(cpu, ckpt) == 1500 + 10 + 100 + 50
