"""Stage 2, training: only the adapters learn; the loop, its loss and everything around it.

Reading order:
    config.py      every setting of a run and its default (train.py's flags come from it)
    run.py         the Run: everything a training run holds, built once by setup()
    loop.py        the training loop: accumulation, the optimizer step, finishing
    loss.py        shifted cross-entropy on supervised positions only, chunked
    schedule.py    learning-rate warmup + cosine decay
    validation.py  validation loss, exact across processes; keeping the best adapter
    activations.py what backward keeps: the MLP's g and u, not silu(g); dropout's 1-byte mask
    precision.py   device and precision: fp32, bf16, fp16 + GradScaler
    vocab_storage.py  fp32 runs: the frozen embedding and head stay bf16, widened where used
    cost.py        what a run costs: the memory estimate before step 1, the summary after
    checkpoint.py  saving/resuming the full training state atomically
    rundir.py      the output directory: fresh, resume or finished; train_args.json
    metrics.py     metrics.jsonl, the loss plot, the progress bar, the startup summary
    tracking.py    --report-to: the same records to TensorBoard, W&B or SwanLab (optional)
    distributed.py torchrun/DDP helpers and stop signals
    sharding.py    DDP or FSDP under torchrun: wrapping the model, where it loads
"""
