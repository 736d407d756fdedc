"""LoRA in one screen: inject, train a few steps, check what moved, merge. Run it first.

    python examples/lora_in_one_screen.py

Each `LoRALinear` computes h = W0 x + (α/r) · B A x with A: (r, in), B: (out, r); W0 is frozen
and B starts at zero, so the injected model starts as the base model. The full trainer
(train.py) adds data, batching, precision and checkpoints around these same few lines.
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's lora/
from lora import LoRASpec, apply_lora, lora_parameters, merge_lora  # noqa: E402

torch.manual_seed(0)
config = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)  # fmt: skip
model = Qwen2ForCausalLM(config)  # a tiny random Qwen2; a real one comes from from_pretrained
ids = torch.randint(0, config.vocab_size, (4, 16))  # four rows of 16 tokens to memorize
base = {k: v.clone() for k, v in model.state_dict().items()}
base_logits = model(ids).logits

print(apply_lora(model, LoRASpec("q_proj,v_proj", r=4, alpha=8, dropout=0.0)))
assert torch.equal(model(ids).logits, base_logits)  # B = 0: exactly the base model

optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-2)  # only A and B are handed over
for step in range(30):
    logits = model(ids).logits
    # token t predicts token t+1: drop the last prediction and the first label
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    if step % 10 == 0 or step == 29:
        print(f"step {step:2d}  loss {loss.item():.3f}")

moved = [k for k, v in model.state_dict().items() if "lora_" not in k
         and not torch.equal(v, base[k.replace(".base_layer", "")])]  # fmt: skip
assert moved == [], moved  # the frozen weights did not move; only A and B did
assert all(m.lora_B.weight.abs().sum() > 0 for m in model.modules() if hasattr(m, "lora_B"))

model.eval()
with torch.no_grad():
    unmerged = model(ids).logits
    merge_lora(model)  # W ← W0 + (α/r)·BA: the adapter now costs nothing per token
    merged = model(ids).logits
q = model.model.layers[0].self_attn.q_proj
assert not torch.equal(q.base_layer.weight, base["model.layers.0.self_attn.q_proj.weight"])
torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=1e-4)
print(f"merged == unmerged (max |Δlogit| {(merged - unmerged).abs().max():.1e}); done")
