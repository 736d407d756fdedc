"""The training loop: exact accumulation, learning, resuming, interrupts, NaN, the CLI's files."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import (
    ROOT,
    assert_same_adapters,
    cli_args,
    overfit_rows,
    run_script,
    single_process_run,
    tiny_config,
    write_json,
)
from lora.data.batching import collate
from lora.data.prepare import split_validation
from lora.data.prompt import PromptFormat, encode_sample
from lora.data.records import Sample, Turn, read_dataset
from lora.errors import UserError
from lora.inject import apply_lora, lora_layers, lora_parameters
from lora.model import load_model, load_tokenizer
from lora.spec import LoRASpec
from lora.train.activations import enable_activation_checkpointing
from lora.train.loop import backward_window, train
from lora.train.loss import CausalLMLoss

CPU = torch.device("cpu")


cfg = tiny_config  # the tests below read cfg(model, data, out, **overrides)


def encoded_rows(model_dir, answers):
    tok = load_tokenizer(str(model_dir))
    return tok, [
        encode_sample(Sample((Turn(f"问题{i}", a),)), PromptFormat("chat"), tok)
        for i, a in enumerate(answers)
    ]


def window_grads(model, micro):
    model.zero_grad()
    backward_window(single_process_run(model), micro)
    return [p.grad.clone() for p in lora_parameters(model)]


def lora_model(model_dir):
    model = load_model(str(model_dir))
    apply_lora(model, LoRASpec("all-linear", r=4, alpha=8, dropout=0.0))
    torch.manual_seed(0)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    return model


def test_batch4_accum1_equals_batch1_accum4_on_variable_lengths(qwen2_dir):
    tok, rows = encoded_rows(
        qwen2_dir,
        ["短。", "地榆槐角丸。疏风凉血，泻热润燥。", "可以使用六味地黄丸。滋阴补肾。", "好"],
    )
    assert len({len(r.input_ids) for r in rows}) == 4
    model = lora_model(qwen2_dir)
    one_batch = window_grads(model, [collate(rows, tok.pad_token_id)])
    accumulated = window_grads(model, [collate([r], tok.pad_token_id) for r in rows])
    for a, b in zip(one_batch, accumulated):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_every_supervised_token_weighs_the_same_across_micro_batches(qwen2_dir):
    tok, (short, long) = encoded_rows(qwen2_dir, ["是", "疏风凉血，泻热润燥。" * 14])
    assert short.n_supervised <= 3 and long.n_supervised >= 100
    model = lora_model(qwen2_dir)
    together = window_grads(model, [collate([short, long], tok.pad_token_id)])
    apart = window_grads(
        model, [collate([short], tok.pad_token_id), collate([long], tok.pad_token_id)]
    )
    for a, b in zip(together, apart):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    # The common mistake (mean per micro-batch, then mean of means) gives another gradient.
    model.zero_grad()
    for row in (short, long):
        mb = collate([row], tok.pad_token_id)
        loss_sum, n = CausalLMLoss(model)(mb["input_ids"], mb["attention_mask"], mb["labels"])
        (loss_sum / n / 2).backward()
    naive = [p.grad for p in lora_parameters(model)]
    assert max((a - b).abs().max() for a, b in zip(together, naive)) > 1e-4


def test_gradient_checkpointing_keeps_lora_gradients_exact(qwen2_dir):
    tok, rows = encoded_rows(qwen2_dir, ["短。", "地榆槐角丸。疏风凉血。"])
    model = lora_model(qwen2_dir)
    model.train()
    plain = window_grads(model, [collate(rows, tok.pad_token_id)])
    enable_activation_checkpointing(model)
    checkpointed = window_grads(model, [collate(rows, tok.pad_token_id)])
    assert all(g.abs().sum() > 0 for g in checkpointed)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_overfitting_8_rows_cuts_loss_90_percent_and_generation_reproduces_an_answer(
    qwen2_dir, tmp_path
):
    rows = overfit_rows(8)
    data = write_json(tmp_path / "rows.json", rows)
    result = train(
        cfg(
            qwen2_dir,
            data,
            tmp_path / "out",
            batch_size=8,
            max_steps=80,
            lr=2e-2,
            rank=16,
            alpha=32,
        )
    )
    first, last = result.history[0]["loss"], result.history[-1]["loss"]
    assert last <= 0.1 * first, (first, last)

    from lora.infer.generate import (
        GenerationSettings,
        generate_batch,
        load_for_inference,
        single_turn,
    )

    loaded = load_for_inference(tmp_path / "out")
    (r,) = generate_batch(
        loaded, [single_turn(rows[0]["instruction"])], GenerationSettings(max_new_tokens=60)
    )
    assert r["answer"] == rows[0]["output"] and r["stopped"]


def test_resume_gives_the_same_adapter_as_an_uninterrupted_run(qwen2_dir, tmp_path):
    data = write_json(tmp_path / "rows.json", overfit_rows(12))
    common = dict(
        max_steps=6, dropout=0.1, grad_accum=2, save_every=0
    )  # dropout on: its RNG must resume too
    train(cfg(qwen2_dir, data, tmp_path / "straight", **common))
    partial = train(cfg(qwen2_dir, data, tmp_path / "resumed", stop_after_steps=3, **common))
    assert not partial.finished and (tmp_path / "resumed" / "checkpoint-3").is_dir()
    resumed = train(cfg(qwen2_dir, data, tmp_path / "resumed", resume="auto", **common))
    assert resumed.steps == 6
    assert_same_adapters(tmp_path / "straight", tmp_path / "resumed", atol=1e-6)
    # The metrics file continues instead of restarting.
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_rules(qwen2_dir, tmp_path, capsys):
    data = write_json(tmp_path / "rows.json", overfit_rows(8))
    out = tmp_path / "out"
    train(cfg(qwen2_dir, data, out, max_steps=2, stop_after_steps=1))
    with pytest.raises(UserError, match="--resume auto"):
        train(cfg(qwen2_dir, data, out, max_steps=2))  # unfinished run, no --resume
    with pytest.raises(UserError, match="rank"):
        train(cfg(qwen2_dir, data, out, max_steps=2, resume="auto", rank=8))
    train(cfg(qwen2_dir, data, out, max_steps=2, resume="auto"))
    with pytest.raises(UserError, match="--overwrite"):
        train(cfg(qwen2_dir, data, out, max_steps=2))  # finished run, no --overwrite
    capsys.readouterr()
    again = train(cfg(qwen2_dir, data, out, max_steps=2, resume="auto"))
    assert again.steps == 2 and "finished run" in capsys.readouterr().out
    fresh = train(cfg(qwen2_dir, data, out, max_steps=1, overwrite=True))
    assert fresh.steps == 1 and not list(out.glob("checkpoint-*"))


def test_nan_loss_skips_the_update_and_repeated_nans_stop_with_advice(
    qwen2_dir, tmp_path, monkeypatch, capsys
):
    import lora.train.run

    calls = {"n": 0}

    class NaNOnSecond(CausalLMLoss):
        def forward(self, *args):
            calls["n"] += 1
            loss, n = super().forward(*args)
            return (loss * float("nan") if calls["n"] == 2 or always else loss), n

    always = False
    monkeypatch.setattr(lora.train.run, "CausalLMLoss", NaNOnSecond)
    data = write_json(tmp_path / "rows.json", overfit_rows(8))
    result = train(cfg(qwen2_dir, data, tmp_path / "a", max_steps=3))
    assert "not finite; update skipped" in capsys.readouterr().out
    weights = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values()) and result.steps == 3

    always = True
    with pytest.raises(UserError, match="lower --lr"):
        train(cfg(qwen2_dir, data, tmp_path / "b", max_steps=5))


def run_cli(*args, **kw):
    return run_script("train.py", *args, **kw)


def test_cli_run_leaves_every_file(qwen2_dir, tmp_path):
    data = write_json(tmp_path / "rows.json", overfit_rows(16))
    out = tmp_path / "out"
    p = run_cli(*cli_args(model=qwen2_dir, data=data, output=out, max_steps=4, batch_size=2,
                          grad_accum=2, val_size=0.25, eval_every=2, save_every=2, keep_last=1,
                          progress=False))  # fmt: skip
    assert p.returncode == 0, p.stderr
    for name in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "adapter_extra.json",
        "train_args.json",
        "metrics.jsonl",
        "loss_curve.png",
        "best/adapter_model.safetensors",
    ]:
        assert (out / name).is_file(), name
    assert [c.name for c in out.glob("checkpoint-*")] == [
        "checkpoint-4"
    ]  # --keep-last 1 pruned checkpoint-2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= records[0].keys()
    assert any("val_loss" in r for r in records)
    args = json.loads((out / "train_args.json").read_text())
    assert args["finished"] and args["args"]["max_steps"] == 4 and "torch" in args["versions"]
    assert args["data"]["train_files"][0]["kept"] == 16
    # the 4 held-out rows are kept as the file holds them, to be scored later with --file
    rows = json.loads(data.read_text())
    heldout = [json.loads(line) for line in (out / "heldout.jsonl").read_text().splitlines()]
    samples, _ = read_dataset(data)
    _, val = split_validation(samples, 0.25, 42)
    assert heldout == [rows[s.row - 1] for s in val] and len(heldout) == 4
    assert (
        f"try it: python infer.py --adapter {out} --file {out / 'heldout.jsonl'} --score"
        in p.stdout
    )
    for needle in [
        "trainable params",
        "effective batch: 4 rows",
        "padding:",
        "rows read 16, kept 16",
    ]:
        assert needle in p.stdout, needle


def test_sigint_saves_a_checkpoint_and_exits_cleanly(qwen2_dir, tmp_path):
    data = write_json(tmp_path / "rows.json", overfit_rows(16))
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "train.py"),
            *cli_args(
                model=qwen2_dir,
                data=data,
                output=out,
                max_steps=100000,
                batch_size=2,
                progress=False,
            ),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    (ckpt,) = out.glob("checkpoint-*")
    assert "continue with --resume auto" in stdout
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] >= 1 and ckpt.name == f"checkpoint-{state['step']}"


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--model", "/no/such/model"], "does not exist"),
        (["--device", "cuda"], "no CUDA GPU is available"),
        (["--data", "/no/such.json"], "does not exist"),
        (["--rank", "0"], "--rank must be an integer >= 1"),
        (["--targets", "qkv"], "match no linear layer"),
    ],
)
def test_cli_bad_inputs_are_one_clear_line(qwen2_dir, tmp_path, args, needle):
    if torch.cuda.is_available() and "cuda" in args:
        pytest.skip("a GPU is present")
    data = write_json(tmp_path / "rows.json", overfit_rows(4))
    base = [
        "--model",
        str(qwen2_dir),
        "--data",
        str(data),
        "--output",
        str(tmp_path / "o"),
        "--max-steps",
        "1",
        "--no-progress",
    ]
    p = run_cli(*base, *args)
    assert p.returncode == 2 and needle in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_hub_id_without_network_says_how_to_pass_a_local_dir(tmp_path):
    from lora.model import load_tokenizer

    with pytest.raises(UserError, match="--model /path/to/"):
        load_tokenizer("Qwen/Qwen2.5-0.5B-Instruct-does-not-exist")
