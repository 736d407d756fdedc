"""Putting `LoRALinear` into a pretrained model, and freezing everything else.

A Qwen decoder layer (qwen2 architecture: Qwen1.5/2/2.5; and qwen3) looks like

    model.layers.N.self_attn.{q_proj, k_proj, v_proj, o_proj}    nn.Linear
    model.layers.N.mlp.{gate_proj, up_proj, down_proj}           nn.Linear

The original LoRA paper adapts only the attention queries and values (`q_proj`, `v_proj`),
which is our default; `all-linear` adapts every linear layer of the decoder (never `lm_head`,
which is the vocabulary projection, and is large and tied to the embeddings in small models).

Injection replaces each matched `nn.Linear` by a `LoRALinear` that wraps it, in place. Then
freezing is *structural*: every parameter gets `requires_grad=False`, and only `lora_A`/`lora_B`
(and DoRA's magnitude vector, with `use_dora`: see dora.py) get it back. The optimizer is handed exactly those parameters, so nothing else can move.
Llama-style models use the same module names and work the same way.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn

from .dora import DoRALinear
from .errors import UserError
from .layer import LoRALinear, check_lora_hyperparameters
from .quantize import stored_numel
from .spec import DEFAULT_TARGETS, LoRASpec

ALL_LINEAR = "all-linear"


@dataclass
class LoRAReport:
    """What injection did: which modules, and how many parameters now train."""

    adapted_modules: list[str]
    target_names: list[str]
    trainable_params: int
    total_params: int

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / max(self.total_params, 1)

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable_params:,} || all params: {self.total_params:,} "
            f"|| trainable: {self.trainable_percent:.4f}% ({len(self.adapted_modules)} LoRA layers on "
            f"{', '.join(self.target_names)})"
        )


def parse_targets(targets) -> str | list[str]:
    """`"q_proj,v_proj"`, `["q_proj", "v_proj"]` or `"all-linear"` -> a list or `ALL_LINEAR`."""
    if isinstance(targets, str):
        if targets.strip() == ALL_LINEAR:
            return ALL_LINEAR
        targets = targets.split(",")
    names = [t.strip() for t in targets if t and t.strip()]
    if not names:
        raise UserError("no LoRA target modules given (e.g. --targets q_proj,v_proj or all-linear)")
    return names


def _decoder_linears(model: nn.Module, include_wrapped: bool = False):
    """(full name, module) of every linear layer LoRA may adapt: never `lm_head`, never LoRA's
    own parts (`lora_A`, `lora_B`, `base_layer`); already wrapped layers when `include_wrapped`."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    kinds = (nn.Linear, LoRALinear) if include_wrapped else nn.Linear
    for name, module in model.named_modules():
        if isinstance(module, kinds) and module is not out_emb and not _inside_lora(name):
            yield name, module


def linear_module_names(model: nn.Module) -> list[str]:
    """Distinct short names (last path component) of the model's linear layers, lm_head excluded."""
    return sorted(
        {name.rsplit(".", 1)[-1] for name, _ in _decoder_linears(model, include_wrapped=True)}
    )


def _inside_lora(name: str) -> bool:
    parts = name.split(".")
    return any(p in ("lora_A", "lora_B", "base_layer") for p in parts)


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule called `name` (e.g. `model.layers.0.self_attn.q_proj`) is."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _matches(name: str, targets, regex: str | None) -> bool:
    if regex is not None:
        return re.fullmatch(regex, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def find_target_modules(model: nn.Module, targets=DEFAULT_TARGETS) -> list[str]:
    """Full names of the `nn.Linear` modules that `targets` selects (suffix match + isinstance).

    `targets` may also be a PEFT-style regex string (matched against the full module name);
    that is how adapters saved by PEFT with a regex `target_modules` are read back.
    """
    regex = None
    if (
        isinstance(targets, str)
        and targets.strip() != ALL_LINEAR
        and re.search(r"[\\^$*+?()\[\]|]", targets)
    ):
        regex = targets
        parsed = None
    else:
        parsed = parse_targets(targets)
    if parsed == ALL_LINEAR:
        parsed = linear_module_names(model)
    found = [name for name, _ in _decoder_linears(model) if _matches(name, parsed, regex)]
    if not found:
        raise UserError(
            f"LoRA target(s) {targets!r} match no linear layer of this model. "
            f"Its linear layers are: {', '.join(linear_module_names(model))} (or use all-linear)"
        )
    return found


def apply_lora(model: nn.Module, spec: LoRASpec | None = None) -> LoRAReport:
    """Wrap each target linear of `model` in a `LoRALinear` (a `DoRALinear` with `use_dora`),
    freeze the rest, and report. `spec` defaults to `LoRASpec()`: q_proj and v_proj, r = 8.

    Returns a `LoRAReport`; the trainable count equals `sum over targets of r · (in + out)`,
    plus `out` per target with DoRA (its magnitude vector).
    """
    s = spec or LoRASpec()
    check_lora_hyperparameters(s.r, s.alpha, s.dropout)
    names = find_target_modules(model, s.targets)
    layer_class = DoRALinear if s.use_dora else LoRALinear
    for name in names:
        base = model.get_submodule(name)
        _replace_module(model, name, layer_class(base, s.r, s.alpha, s.dropout, s.use_rslora))
    trainable = freeze_all_but_lora(model)
    total = sum(stored_numel(p) for p in model.parameters())  # NF4 packs 2 weights a byte
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    return LoRAReport(names, short, trainable, total)


def freeze_all_but_lora(model: nn.Module) -> int:
    """requires_grad=False everywhere, then True on the adapters' own parameters only (lora_A,
    lora_B; DoRA's magnitude). Returns the trainable count."""
    model.requires_grad_(False)
    count = 0
    for module in lora_layers(model).values():
        for p in module.trainable_parameters():
            p.requires_grad_(True)
            count += p.numel()
    return count


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every `LoRALinear` in the model, by its full module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer should see: every lora_A and lora_B weight (and DoRA
    magnitude), in a fixed order."""
    params = []
    for module in lora_layers(model).values():
        params += module.trainable_parameters()
    return params


def merge_lora(model: nn.Module) -> float:
    """Fold every adapter into its base weight (in fp32, rounded once into the base dtype).

    Idempotent: already merged layers count as 0. Returns the largest fraction of a layer's ΔW
    that rounding lost: 0 for an fp32 base, often 10-90% for a bf16 base (see layer.py).
    """
    return max((m.merge() for m in lora_layers(model).values()), default=0.0)


def unmerge_lora(model: nn.Module) -> None:
    """Take every adapter back out of its base weight (idempotent)."""
    for module in lora_layers(model).values():
        module.unmerge()


@contextmanager
def lora_disabled(model: nn.Module):
    """Inside this block the model is the base model again (adapters bypassed, not deleted)."""
    layers = list(lora_layers(model).values())
    if any(m.merged for m in layers):
        raise RuntimeError("unmerge the adapters before disabling them")
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m in layers:
            m.disabled = False


def remove_lora(model: nn.Module) -> nn.Module:
    """Merge, then replace each `LoRALinear` by its plain `nn.Linear`: no trace of LoRA remains.

    Used by export: the result saves as an ordinary Hugging Face checkpoint.
    """
    for name, module in lora_layers(model).items():
        module.merge()
        _replace_module(model, name, module.base_layer)
    return model
