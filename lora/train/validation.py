"""Validation: the token-averaged loss on held-out rows, and keeping the best adapter.

The validation loss is computed exactly like the training loss (same template, same masking,
same shifted cross-entropy), averaged over every supervised token of the whole set. Under
torchrun each process scores a disjoint share of the rows and the sums are added, so the
number does not depend on how many processes there are.
"""

from __future__ import annotations

import math

import torch

from ..adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, EXTRA_FILE, atomic_write_bytes
from ..data.batching import collate
from .checkpoint import save_run_adapter
from .distributed import all_reduce_sums

BEST_DIR = "best"


@torch.no_grad()
def validation_loss(run, val_set) -> float:
    """Σ token losses / Σ tokens over `val_set`, exact across processes."""
    run.model.eval()
    order = sorted(range(len(val_set)), key=lambda i: len(val_set[i].input_ids))
    mine = order[run.dist.rank :: run.dist.world_size]
    size = run.cfg.batch_size
    # Under FSDP each forward is a collective (every layer's weights are gathered), so all
    # processes run as many batches as process 0, which has the most rows; one with fewer rows
    # scores a stand-in batch and discards it. Under DDP forwards are independent.
    most = len(order[:: run.dist.world_size]) if run.sharded else len(mine)
    n_batches = math.ceil(most / size)
    total = count = 0.0
    for start in range(0, n_batches * size, size):
        share = mine[start : start + size]
        rows = [val_set[i] for i in (share or order[:1])]
        batch = {k: v.to(run.device) for k, v in collate(rows, run.pad_id).items()}
        with run.autocast:
            loss_sum, n = run.loss(batch["input_ids"], batch["attention_mask"], batch["labels"])
        if share:
            total += float(loss_sum)
            count += n
    run.model.train()
    total, count = all_reduce_sums([total, count], run.device)
    return total / max(count, 1)


def evaluate_and_keep_best(run, val_set) -> dict:
    """Validate; when the loss is the lowest so far, save the adapter to `best/`.

    `state.evals_since_best` counts validations since the last improvement: --early-stop N
    ends the run when it reaches N.
    """
    val_loss = validation_loss(run, val_set)
    ppl = math.exp(min(val_loss, 50))
    state = run.state
    improved = state.best_val_loss is None or val_loss < state.best_val_loss
    if improved:
        state.best_val_loss, state.best_step, state.evals_since_best = val_loss, state.step, 0
        save_run_adapter(run, run.out / BEST_DIR)  # every process: a gather under FSDP
    else:
        state.evals_since_best += 1
    note = " (best so far, saved to best/)" if improved else ""
    run.log(f"step {state.step}: val loss {val_loss:.4f}, perplexity {ppl:.2f}{note}")
    return {"val_loss": val_loss, "val_ppl": ppl}


def early_stop_due(run) -> bool:
    """--early-stop N: N validations in a row brought no lower validation loss."""
    patience = run.cfg.early_stop
    return bool(patience) and run.state.evals_since_best >= patience


def use_best_adapter(run) -> None:
    """Make `best/` the run's result: its files replace the adapter in the output directory."""
    best = run.out / BEST_DIR
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG, EXTRA_FILE):
        if (best / name).is_file():
            atomic_write_bytes(run.out / name, (best / name).read_bytes())
