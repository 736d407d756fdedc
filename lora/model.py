"""Loading the base model and its tokenizer, with clear errors instead of hub tracebacks.

`--model` is a local directory (what tests, CI and offline users pass) or a Hugging Face hub id
(downloaded by transformers on first use). Both go through the same `from_pretrained` call.
When the hub is unreachable we say how to pass a local directory instead.
"""

from __future__ import annotations

import json
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from .errors import UserError

# transformers renamed `torch_dtype` to `dtype` in 4.56; support both sides of the rename.
_DTYPE_KWARG = (
    "dtype"
    if tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (4, 56)
    else "torch_dtype"
)
_TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5


def _check_source(name_or_path: str) -> bool:
    """True for a local directory; a missing path that clearly is a path is an error."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(
                f"model directory {path} has no config.json: is it a Hugging Face checkpoint?"
            )
        return True
    # A hub id is `name` or `org/name`; anything else is meant as a path on this machine.
    looks_like_path = (
        name_or_path.startswith((".", "/", "~"))
        or name_or_path.count("/") > 1
        or "\\" in name_or_path
    )
    if path.exists() or looks_like_path:
        raise UserError(f"model path {name_or_path} does not exist (or is not a directory)")
    return False


def _hub_error(name: str, e: Exception) -> UserError:
    return UserError(
        f"could not load {name!r} from the Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
        f"If this machine is offline, download the model elsewhere and pass its local directory: "
        f"--model /path/to/{name.rsplit('/', 1)[-1]}"
    )


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """The model's own tokenizer; a fast (Rust) one, since labels need character offsets."""
    local = _check_source(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name_or_path, trust_remote_code=trust_remote_code, local_files_only=local
        )
    except UserError:
        raise
    except Exception as e:
        if local:
            raise UserError(f"could not load a tokenizer from {name_or_path}: {e}") from None
        raise _hub_error(name_or_path, e) from None
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(
            f"the tokenizer of {name_or_path} is not a fast tokenizer (tokenizer.json is needed)"
        )
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of attention and loss, so any id will do.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    quantization_config=None,
):
    """`AutoModelForCausalLM.from_pretrained` in `dtype` on `device`, SDPA attention.

    With a `quantization_config` (see quantize.py) the linear layers are quantized while
    loading, directly onto `device`: a quantized model cannot be moved afterwards.
    """
    local = _check_source(name_or_path)
    kwargs = {
        _DTYPE_KWARG: dtype,
        "trust_remote_code": trust_remote_code,
        "local_files_only": local,
    }
    if quantization_config is not None:
        kwargs |= {"quantization_config": quantization_config, "device_map": {"": str(device)}}
    try:
        with no_loading_bar():
            model = _from_pretrained(name_or_path, attn_implementation="sdpa", **kwargs)
    except (ValueError, ImportError) as e:
        if "sdpa" not in str(e).lower():
            raise UserError(f"could not load model {name_or_path}: {e}") from None
        with no_loading_bar():
            model = _from_pretrained(name_or_path, **kwargs)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as e:
        if local:
            raise UserError(
                f"could not load model {name_or_path}: {type(e).__name__}: {e}"
            ) from None
        raise _hub_error(name_or_path, e) from None
    if quantization_config is None:
        model.to(device)
    # The KV cache is for generation; during training it only costs memory.
    model.config.use_cache = False
    return model


@contextmanager
def no_loading_bar():
    """Inside this block transformers draws no "Loading weights" bar (transformers 5.x).

    Its bar counts tensors being placed, a second or two for a small model, on every load of
    every command: noise beside our own lines. Only that bar goes: a hub download keeps its
    progress bars, which say something while a model arrives. Through transformers' tqdm hook
    (5.x), which also hands back the hook it replaces; older versions draw no such bar.
    """
    from transformers.utils import logging as hf_logging

    if not hasattr(hf_logging, "set_tqdm_hook"):
        yield
        return

    def hook(factory, args, kwargs):
        if str(kwargs.get("desc", "")).startswith("Loading weights"):
            kwargs = kwargs | {"disable": True}
        return previous(factory, args, kwargs) if previous else factory(*args, **kwargs)

    previous = hf_logging.set_tqdm_hook(hook)
    try:
        yield
    finally:
        hf_logging.set_tqdm_hook(previous)


def _from_pretrained(name_or_path: str, **kwargs):
    """`from_pretrained`, but a local safetensors checkpoint is read one tensor at a time.

    Why: `from_pretrained` memory-maps the checkpoint and converts every tensor (bf16 → fp32)
    while the whole file stays mapped; each page it has read counts in resident memory until
    it closes the file at the end. Loading a bf16 checkpoint in fp32 so peaks at the fp32
    model + the whole file (+1.2 GB for Qwen2.5-0.5B, +15 GB for a 7B). Read with `pread`
    instead (safetensors' other backend), a tensor's bytes live only while it is converted.
    The same transformers code places, converts and ties the weights either way; quantized
    loading, remote code and hub ids take the usual path.
    """
    files = None
    if (
        _TRANSFORMERS_5
        and "quantization_config" not in kwargs
        and not kwargs.get("trust_remote_code")
    ):
        files = _safetensors_files(Path(name_or_path).expanduser())
    if not files:
        return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    from safetensors import safe_open

    config = AutoConfig.from_pretrained(name_or_path, local_files_only=True)
    try:
        model_class = transformers.MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:  # let from_pretrained say what it makes of this architecture
        return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    with ExitStack() as files_open:
        try:
            handles = [files_open.enter_context(safe_open(f, "pt", backend="pread")) for f in files]
        except TypeError:  # a safetensors without the pread backend
            return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
        # Slices: nothing is read until transformers asks for each tensor.
        lazy = {key: h.get_slice(key) for h in handles for key in h.keys()}  # noqa: SIM118
        model = model_class.from_pretrained(None, config=config, state_dict=lazy, **kwargs)
    # What from_pretrained takes from the directory it was not given: the name and the stop tokens.
    model.name_or_path = model.config.name_or_path = name_or_path
    if (Path(name_or_path).expanduser() / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(name_or_path)
    return model


def _safetensors_files(path: Path) -> list[Path] | None:
    """The checkpoint's safetensors files: one file, else the shards its index names (the
    order from_pretrained looks for them in)."""
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        shards = json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()
        return [path / name for name in sorted(set(shards))]
    return None


def load_model_config(name_or_path: str, trust_remote_code: bool = False):
    """The model's config.json alone (no weights): for checks that must come before loading."""
    local = _check_source(name_or_path)
    try:
        return AutoConfig.from_pretrained(
            name_or_path, trust_remote_code=trust_remote_code, local_files_only=local
        )
    except Exception as e:
        if local:
            raise UserError(f"could not read the config of {name_or_path}: {e}") from None
        raise _hub_error(name_or_path, e) from None


def model_skeleton(name_or_path: str, dtype: torch.dtype, trust_remote_code: bool = False):
    """The model built from its config.json alone, on the meta device: every module and
    parameter shape, no weight read or allocated (a fraction of a second, whatever the size).

    What needs only the model's shape is checked on it before the data is prepared and the
    weights load: the LoRA targets and the rank against each layer's dimensions (train.py), and
    `--dry-run`'s parameter counts and memory estimate.
    """
    config = load_model_config(name_or_path, trust_remote_code)
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(
                config, trust_remote_code=trust_remote_code, **{_DTYPE_KWARG: dtype}
            )
    except Exception as e:  # an architecture transformers cannot build: loading would fail too
        raise UserError(
            f"could not build model {name_or_path} from its config: {type(e).__name__}: {e}"
        ) from None


def checkpoint_dtype(name_or_path: str, trust_remote_code: bool = False) -> torch.dtype:
    """The dtype the checkpoint's weights are stored in, read from its config.json.

    Read *before* loading: once a model is loaded in fp32, transformers reports fp32 as its
    dtype, whatever the files hold. A config that names no dtype means fp32.
    """
    config = load_model_config(name_or_path, trust_remote_code)
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else torch.float32
