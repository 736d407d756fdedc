"""Saving and loading adapters in PEFT's file format, with nothing but safetensors and JSON.

An adapter directory holds two files:

    adapter_model.safetensors   only the LoRA tensors, e.g.
        base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight   (r, in)
        base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight   (out, r)
        base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector   (out,)  DoRA only
    adapter_config.json         r, lora_alpha, target_modules, use_dora, ... as PEFT's LoraConfig

The key is the module's path in the model, prefixed by `base_model.model.` (PEFT wraps the
model twice: `PeftModel.base_model` is a `LoraModel` whose `.model` is the transformer). PEFT
inserts the adapter name (`.default.`) only in memory, never in the file. Because the names
and the config match, `peft.PeftModel.from_pretrained` reads our adapters and we read theirs.

Our own tools need a little more (the prompt template used in training, so inference builds
the identical prompt; the base model's shape, to refuse a mismatched base). PEFT warns about
any key it does not know in `adapter_config.json`, so that lives in a third file beside it,
`adapter_extra.json`, which PEFT never opens. Adapters without it (made by PEFT) load fine.

Safety: we only ever read safetensors (no pickle, so no code can run from a downloaded file),
and we write through a temporary file and `os.replace`, so a crash never leaves half a file.
Every tensor read must be finite: a NaN or Inf (a diverged run, a damaged file) would make
every answer garbage and spread into a merged model, so such an adapter is refused by name.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as save_tensors
from torch import nn

from .dora import MAGNITUDE, DoRALinear
from .errors import UserError, with_path
from .inject import apply_lora, lora_layers
from .spec import DEFAULT_TARGETS, LoRASpec

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
LORA_PARTS = ("lora_A", "lora_B")
EXTRA_FILE = "adapter_extra.json"


MAX_ABS_WEIGHT = 1e4  # far beyond any trained LoRA weight; random bytes read as floats exceed it


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never half.

    `mkstemp` creates its file readable by us alone (0600); the result gets the permissions
    any new file would (0644 under the usual umask), so a server under another user can read it.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise with_path(e, path) from None
        raise


def current_umask() -> int:
    """The process's umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def lora_weights_by_key(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every LoRA weight of `model` under its PEFT file key, e.g.
    `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`; a DoRA layer adds
    `...q_proj.lora_magnitude_vector` (PEFT writes that one without `.weight`)."""
    weights = {}
    for name, module in lora_layers(model).items():
        for part in LORA_PARTS:
            weights[f"{PEFT_PREFIX}{name}.{part}.weight"] = getattr(module, part).weight
        if isinstance(module, DoRALinear):
            weights[f"{PEFT_PREFIX}{name}.{MAGNITUDE}"] = module.lora_magnitude_vector
    return weights


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors under PEFT key names, fp32, contiguous, on CPU.

    Under FSDP the weights are shards: gathering them is a collective, so every process must
    call this (and only one then writes).
    """
    return {
        key: full_tensor(weight.detach()).float().contiguous().cpu()
        for key, weight in lora_weights_by_key(model).items()
    }


def model_shape(model: nn.Module) -> dict:
    """The few config numbers that decide whether an adapter fits a base model."""
    config = getattr(model, "config", None)
    keys = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")
    return {k: getattr(config, k) for k in keys if config is not None and hasattr(config, k)}


def save_adapter(
    model: nn.Module,
    out_dir,
    base_model_name_or_path: str = "",
    extra: dict | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `adapter_model.safetensors` and `adapter_config.json` (PEFT format) into `out_dir`.

    `tensors`: the model's `adapter_state_dict`, when already gathered (FSDP, see train/checkpoint.py).
    """
    layers = lora_layers(model)
    if not layers:
        raise UserError("the model has no LoRA layers to save")
    any_layer = next(iter(layers.values()))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    atomic_write_bytes(
        out_dir / ADAPTER_WEIGHTS,
        save_tensors(
            adapter_state_dict(model) if tensors is None else tensors, metadata={"format": "pt"}
        ),
    )

    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_model_name_or_path),
        "r": any_layer.r,
        "lora_alpha": any_layer.alpha,
        "lora_dropout": _dropout_p(any_layer),
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in layers}),
        "bias": "none",
        "use_rslora": any_layer.use_rslora,
        "use_dora": isinstance(any_layer, DoRALinear),
        "modules_to_save": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
    }
    atomic_write_bytes(out_dir / ADAPTER_CONFIG, _json_bytes(config))
    atomic_write_bytes(
        out_dir / EXTRA_FILE, _json_bytes({"base_model_shape": model_shape(model), **(extra or {})})
    )
    return out_dir


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()


def read_adapter_extra(adapter_dir) -> dict:
    """Our sidecar (prompt format, stop tokens, base shape); {} for adapters made elsewhere."""
    path = Path(adapter_dir) / EXTRA_FILE
    if not path.is_file():
        return {}
    try:
        extra = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(extra, dict):
        raise UserError(f"{path}: expected a JSON object, got a {type(extra).__name__}")
    return extra


def _dropout_p(layer) -> float:
    return float(getattr(layer.lora_dropout, "p", 0.0))


def read_adapter_config(adapter_dir) -> dict:
    """Parse `adapter_config.json`, with a clear error for a missing dir, file or bad JSON."""
    adapter_dir = Path(adapter_dir)
    if adapter_dir.is_file():
        parent = adapter_dir.parent if adapter_dir.name == ADAPTER_WEIGHTS else "out/"
        raise UserError(
            f"{adapter_dir} is a file, not an adapter directory: pass the directory that "
            f"holds {ADAPTER_WEIGHTS} and {ADAPTER_CONFIG} (e.g. --adapter {parent})"
        )
    if not adapter_dir.is_dir():
        raise UserError(f"adapter directory {adapter_dir} does not exist")
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise UserError(f"{adapter_dir} is not an adapter directory: {ADAPTER_CONFIG} is missing")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    check_adapter_config_types(config, path)
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{path}: peft_type {config.get('peft_type')!r} is not LoRA")
    unsupported = {
        "modules_to_save": lambda v: bool(v),
        "rank_pattern": lambda v: bool(v),
        "alpha_pattern": lambda v: bool(v),
        "layers_to_transform": lambda v: v is not None,
        "fan_in_fan_out": lambda v: bool(v),
        "bias": lambda v: v not in (None, "none"),
    }
    for key, bad in unsupported.items():
        if key in config and bad(config[key]):
            raise UserError(f"{path}: {key}={config[key]!r} is not supported by this trainer")
    return config


def check_adapter_config_types(config, path) -> None:
    """The values we use must have the right type: `"r": "eight"` is an error, not a crash."""
    if not isinstance(config, dict):
        raise UserError(
            f"{path}: expected a JSON object of settings, got a {type(config).__name__}"
        )

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    checks = {
        "r": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
        "lora_alpha": (lambda v: number(v) and v > 0, "a number > 0"),
        "lora_dropout": (lambda v: number(v) and 0 <= v < 1, "a number in [0, 1)"),
        "target_modules": (
            lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(t, str) for t in v)),
            "a module name or a list of them",
        ),
        "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
        "use_dora": (lambda v: isinstance(v, bool), "true or false"),
        "base_model_name_or_path": (lambda v: isinstance(v, str), "a model id or path"),
    }  # fmt: skip
    if "r" not in config:
        raise UserError(f'{path}: the LoRA rank "r" is missing')
    for key, (ok, what) in checks.items():
        if key in config and config[key] is not None and not ok(config[key]):
            raise UserError(f"{path}: {key!r} must be {what}, got {config[key]!r}")


def weights_problem(tensors: dict[str, torch.Tensor]) -> str | None:
    """What makes these adapter tensors unusable (dtype, NaN/Inf, absurd magnitude), naming the
    first tensor concerned; None when they are fine. Reading and saving judge by this one rule."""
    for key, t in tensors.items():
        if not t.is_floating_point():
            return f"tensor {key} has dtype {t.dtype}, not floating point"
        if not torch.isfinite(t).all():
            return f"tensor {key} holds NaN or Inf values"
        if t.numel() and t.abs().max() > MAX_ABS_WEIGHT:
            return (
                f"tensor {key} holds values up to {float(t.abs().max()):.3g}, far beyond any "
                f"trained LoRA weight (|w| <= {MAX_ABS_WEIGHT:g})"
            )
    return None


def check_finite(tensors: dict[str, torch.Tensor], path) -> None:
    """Refuse a file whose tensors `weights_problem` rejects: the adapter is unusable."""
    problem = weights_problem(tensors)
    if problem:
        raise UserError(f"{path}: {problem}; the adapter is damaged or unusable")


def read_adapter_tensors(adapter_dir) -> dict[str, torch.Tensor]:
    """Load the safetensors file (never a pickle), with a clear error if missing or corrupt."""
    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.is_file():
        if (Path(adapter_dir) / "adapter_model.bin").is_file():
            raise UserError(
                f"{adapter_dir} has only adapter_model.bin (pickle); convert it to safetensors"
            )
        raise UserError(f"{adapter_dir} is not an adapter directory: {ADAPTER_WEIGHTS} is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safetensors file, not a dict)
    except Exception as e:  # safetensors raises its own error types for truncated/garbled files
        raise UserError(f"{path} is corrupt or truncated and cannot be read ({e})") from None
    check_finite(tensors, path)
    return tensors


# Under FSDP (train/sharding.py) a parameter is a DTensor: each process holds a shard. Saving
# gathers the whole tensor, loading gives each process its own shard back.
def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor's shards gathered (a collective), any other tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@torch.no_grad()
def copy_full_(param: torch.Tensor, full: torch.Tensor) -> None:
    """param ← full; for a DTensor, each process keeps its own shard of `full`."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        full = distribute_tensor(
            full.to(param.device, param.dtype), param.device_mesh, param.placements
        )
        param.copy_(full)
    else:
        param.copy_(full.to(param.device, param.dtype))


def base_model_of(adapter_dir, config: dict, model_override: str | None) -> str:
    """`--model` when given, else the base model recorded in the adapter's config."""
    base = model_override or config.get("base_model_name_or_path")
    if not base:
        raise UserError(f"{adapter_dir}/adapter_config.json names no base model; pass --model")
    return base


def load_adapter(model: nn.Module, adapter_dir, dropout: float | None = None) -> dict:
    """Inject LoRA as the adapter's config says, then load its tensors strictly.

    Strict means: every LoRA tensor the model expects is in the file, the file has nothing else,
    and every shape matches. Anything else means the adapter belongs to another base model (or
    is damaged), and using it anyway would silently produce garbage. Returns the config.
    """
    config = read_adapter_config(adapter_dir)
    tensors = read_adapter_tensors(adapter_dir)
    expected_shape = read_adapter_extra(adapter_dir).get("base_model_shape", {})
    actual_shape = model_shape(model)
    for key, value in expected_shape.items():
        if key in actual_shape and actual_shape[key] != value:
            raise UserError(
                f"adapter {adapter_dir} was trained on a base model with {key}={value}, "
                f"but the loaded model has {key}={actual_shape[key]}: pass the right --model"
            )
    if not lora_layers(model):
        spec = LoRASpec(
            targets=config.get("target_modules") or DEFAULT_TARGETS,
            r=int(config["r"]),
            alpha=config.get("lora_alpha", 8),
            dropout=config.get("lora_dropout", 0.0) if dropout is None else dropout,
            use_rslora=bool(config.get("use_rslora", False)),
            use_dora=bool(config.get("use_dora", False)),
        )
        apply_lora(model, spec)
    _check_variant(model, config, adapter_dir)
    expected = {k: v.shape for k, v in lora_weights_by_key(model).items()}
    # PEFT writes `.default.` only in memory, but some tools leak it into files: accept both.
    tensors = {_file_key(k): v for k, v in tensors.items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise UserError(
            f"adapter {adapter_dir} does not fit this model: "
            f"{len(missing)} missing key(s) {missing[:3]}, {len(unexpected)} unexpected key(s) {unexpected[:3]}"
        )
    for key, shape in expected.items():
        if tensors[key].shape != shape:
            raise UserError(
                f"adapter {adapter_dir}: {shape_mismatch(key, tensors[key].shape, shape)}"
            )
    with torch.no_grad():
        for key, weight in lora_weights_by_key(model).items():
            copy_full_(weight, tensors[key])  # under FSDP each process keeps its shard
    return config


def shape_mismatch(key: str, found, needed) -> str:
    """Why a tensor does not fit: the rank in adapter_config.json (A is (r, in), B is (out, r)),
    or the base model's dimensions."""
    found, needed = tuple(found), tuple(needed)
    rank_dim = 0 if ".lora_A." in key else 1 if ".lora_B." in key else None
    others_match = (
        len(found) == len(needed) == 2
        and rank_dim is not None
        and (found[1 - rank_dim] == needed[1 - rank_dim])
    )
    if others_match:
        return (
            f"{key} has rank {found[rank_dim]} but {ADAPTER_CONFIG} says r={needed[rank_dim]}: "
            f"the config does not describe these weights (edited, or from another adapter)"
        )
    return (
        f"{key} has shape {found} but this model needs {needed}; the adapter was trained on a "
        f"base model of another size"
    )


def _file_key(key: str) -> str:
    """PEFT's file key for a tensor some tool saved under an in-memory name: `.default.` (the
    adapter name) dropped, and DoRA's `lora_magnitude_vector.weight` without `.weight`."""
    key = key.replace(".default.weight", ".weight")
    return key.removesuffix(".weight") if key.endswith(f".{MAGNITUDE}.weight") else key


def _check_variant(model: nn.Module, config: dict, adapter_dir) -> None:
    """A DoRA adapter needs DoRA layers, a plain one plain layers (a model injected before)."""
    dora = bool(config.get("use_dora", False))
    if any(isinstance(m, DoRALinear) != dora for m in lora_layers(model).values()):
        kinds = ("a plain LoRA", "a DoRA")
        raise UserError(
            f"adapter {adapter_dir} is {kinds[dora]} adapter, but the model's adapter layers are "
            f"{kinds[not dora].split(' ', 1)[1]}: train and load with the same --dora setting"
        )
