"""What did training change? An adapter read as matrices: `python -m lora.inspect out/`.

For each adapted module the adapter file holds `A: (r, in)` and `B: (out, r)`; its config gives
`s = α/r` (`α/√r` with rsLoRA). Training changed that layer's weight `W0: (out, in)` by

    ΔW = s · B A        (out, in), rank ≤ r

1. Size. `‖ΔW‖_F`, and relative to the pretrained weight, `‖ΔW‖_F / ‖W0‖_F`.

2. Spectrum, cheaply. Never form the (out, in) matrix: factor both thin matrices (QR),

       B = Q_B R_B      Q_B: (out, r) orthonormal columns, R_B: (r, r)
       Aᵀ = Q_A R_A     Q_A: (in, r),                      R_A: (r, r)
       ΔW = s · Q_B (R_B R_Aᵀ) Q_Aᵀ

   Multiplying by matrices with orthonormal columns changes no length, so ΔW has exactly the
   singular values of the r×r core `s · R_B R_Aᵀ`: an SVD of r×r numbers instead of out×in.
   With `R_B R_Aᵀ = U_c Σ V_cᵀ`, ΔW's singular vectors are `U = Q_B U_c`, `V = Q_A V_c`.
   And `‖ΔW‖_F = √(Σ σ_i²)`.

3. Rank. At most r singular values are non-zero. The numerical rank counts
   `σ_i > σ_1 · max(out, in) · ε_fp32`; the effective rank (Roy & Vetterli, 2007) is

       erank = exp(−Σ p_i ln p_i),    p_i = σ_i / Σ_j σ_j

   which is 1 when one direction carries the whole update and r when all r carry equal weight:
   how many directions the update really uses.

4. Amplification (Hu et al., 2021, "LoRA", §7.3). Does ΔW repeat what W0 already does? Take
   U, V = ΔW's left/right singular vectors (its k = numerical-rank directions) and project W0:

       ‖Uᵀ W0 V‖_F                       how strongly W0 already acts along ΔW's directions
       amplification = ‖ΔW‖_F / ‖Uᵀ W0 V‖_F

   The paper compares `‖Uᵀ W0 V‖_F` with the same projection onto W0's own top-k singular
   directions (`= √(σ_1(W0)² + … + σ_k(W0)²)`) and onto random directions. In GPT-3 (layer 48,
   W_q, r = 4) it found 0.32 for ΔW's directions, against 21.67 for W0's and 0.02 for random
   ones, with `‖ΔW‖_F = 6.91`: ΔW does not repeat W0's top directions, it amplifies (about
   6.91 / 0.32 ≈ 21.5 times) directions that W0 holds but does not emphasize. We also report
   the share of ΔW inside W0's top-k directions, `‖U0ᵀ ΔW V0‖_F / ‖ΔW‖_F` (0: none, 1: all).
   The W0 comparisons need W0's SVD, which costs far more than the rest: it is computed for a
   few layers only (the first, middle and last adapted layer unless told otherwise).

5. Where the adapter acts. Modules are grouped by layer index and by projection
   (q/k/v/o/gate/up/down). A group's size is the norm of all its updates as one vector,
   `√(Σ ‖ΔW_i‖_F²)`, relative to `√(Σ ‖W0_i‖_F²)`.

DoRA adapters (`--dora`, see dora.py) are read too, but what is reported is their low-rank
part `s·BA` only. DoRA's whole change, `W' − W0 = (m/‖W0 + s·BA‖_c) ⊙ (W0 + s·BA) − W0`, also
rescales every row of W0 and is not low-rank, so the cheap spectrum above does not apply to it.
With the base model, each DoRA module also gets the relative change of its magnitude vector,
`‖m − ‖W0‖_c‖ / ‖‖W0‖_c‖` (m starts at ‖W0‖_c), as `magnitude_change`.

Items 2 and 3 need only the adapter file (fast, no model); sizes relative to W0 and the
amplification need the base model's weights. `infer.py --adapter out/ --inspect` prints the
report and writes `inspect.json` (every number) and `inspect.png` (a layer × projection heatmap
of the update sizes and the singular-value spectra) into the adapter directory.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import re
import sys
from pathlib import Path

import torch

from .adapter import atomic_write_bytes, base_model_of, read_adapter_config, read_adapter_tensors
from .errors import UserError

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
INSPECT_JSON = "inspect.json"
INSPECT_PNG = "inspect.png"
_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight$")
_MAGNITUDE = re.compile(
    r"^(?:base_model\.model\.)?(.+)\.lora_magnitude_vector(?:\.default)?(?:\.weight)?$"
)  # DoRA's m
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


# ---- the math: one module ------------------------------------------------------------------


def delta_svd(B: torch.Tensor, A: torch.Tensor, scaling: float):
    """Thin SVD of ΔW = s·B A from the r×r core: (U: (out, k), σ: (k,), V: (in, k)), in fp64."""
    Q_B, R_B = torch.linalg.qr(B.double())  # B: (out, r)
    Q_A, R_A = torch.linalg.qr(A.double().T)  # Aᵀ: (in, r)
    U_c, sigma, V_cT = torch.linalg.svd(R_B @ R_A.T, full_matrices=False)  # the core, ≤ r×r
    sign = 1.0 if scaling >= 0 else -1.0  # σ ≥ 0: a negative s flips U instead
    return sign * Q_B @ U_c, abs(scaling) * sigma, Q_A @ V_cT.T


def numerical_rank(sigma: torch.Tensor, shape) -> int:
    """How many σ_i exceed σ_1 · max(out, in) · ε_fp32 (the adapter's tensors are fp32)."""
    if len(sigma) == 0 or sigma[0] == 0:
        return 0
    tol = sigma[0] * max(shape) * torch.finfo(torch.float32).eps
    return int((sigma > tol).sum())


def effective_rank(sigma: torch.Tensor) -> float:
    """exp of the entropy of p_i = σ_i / Σσ: from 1 (one direction) to k (k equal σ); 0 if ΔW = 0."""
    total = sigma.sum()
    if total == 0:
        return 0.0
    p = sigma[sigma > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def amplification(U, sigma, V, W0: torch.Tensor) -> dict:
    """Hu et al. §7.3: ‖Uᵀ W0 V‖_F along ΔW's k directions, and ‖ΔW‖_F / ‖Uᵀ W0 V‖_F."""
    along = float(torch.linalg.matrix_norm(U.T @ (W0.double() @ V)))
    delta = float(sigma.norm())
    return {"w0_along_delta": along, "amplification": delta / along if along > 0 else None}


def w0_top_directions(U, sigma, V, W0: torch.Tensor, seed: int = 0) -> dict:
    """The comparisons that need W0's SVD (expensive): W0 along its own top-k directions and
    along k random ones, and the share of ΔW = U diag(σ) Vᵀ inside W0's top-k directions."""
    k = U.shape[1]
    U0, sigma0, V0T = torch.linalg.svd(W0.double(), full_matrices=False)
    U0, V0 = U0[:, :k], V0T[:k].T
    g = torch.Generator().manual_seed(seed)
    Ur = torch.linalg.qr(torch.randn(W0.shape[0], k, generator=g, dtype=torch.float64))[0]
    Vr = torch.linalg.qr(torch.randn(W0.shape[1], k, generator=g, dtype=torch.float64))[0]
    inside = (U0.T @ U) * sigma @ (V.T @ V0)  # U0ᵀ ΔW V0 = (U0ᵀ U) diag(σ) (Vᵀ V0)
    return {
        "w0_along_w0_top": float(sigma0[:k].norm()),
        "w0_along_random": float(torch.linalg.matrix_norm(Ur.T @ W0.double() @ Vr)),
        "delta_share_in_w0_top": float(inside.norm() / sigma.norm()),
    }


def module_report(name, B, A, scaling, W0=None, top=False) -> dict:
    """Every number about one module; those needing W0 only when it is given."""
    U, sigma, V = delta_svd(B, A, scaling)
    shape = (B.shape[0], A.shape[1])
    k = numerical_rank(sigma, shape)
    row = {
        "module": name,
        "layer": layer_of(name),
        "projection": name.rsplit(".", 1)[-1],
        "shape": list(shape),
        "delta_norm": float(sigma.norm()),
        "singular_values": sigma.tolist(),
        "rank": k,
        "effective_rank": effective_rank(sigma),
    }
    if W0 is not None:
        if tuple(W0.shape) != shape:
            raise UserError(
                f"{name}: the base weight is {tuple(W0.shape)}, the adapter's ΔW {shape}"
            )
        row["base_norm"] = float(torch.linalg.matrix_norm(W0.double()))
        row["relative"] = row["delta_norm"] / row["base_norm"]
        if k > 0:  # a zero update has no directions to compare
            Uk, sk, Vk = U[:, :k], sigma[:k], V[:, :k]
            row |= amplification(Uk, sk, Vk, W0)
            if top:
                row |= w0_top_directions(Uk, sk, Vk, W0)
    return row


# ---- the adapter: every module, and where it acts ------------------------------------------


def adapter_factors(adapter_dir) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(config with its scaling s and DoRA's magnitudes, {module name: (B, A)}) from the
    adapter's two files."""
    config = read_adapter_config(adapter_dir)
    r, alpha = int(config["r"]), float(config.get("lora_alpha", 8))
    scaling = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
    parts: dict[str, dict] = {}
    magnitudes = {}
    for key, tensor in read_adapter_tensors(adapter_dir).items():
        if dora := _MAGNITUDE.match(key):
            magnitudes[dora.group(1)] = tensor
            continue
        match = _KEY.match(key)
        if not match:
            raise UserError(f"{adapter_dir}: tensor {key} is not a LoRA A or B weight")
        parts.setdefault(match.group(1), {})[match.group(2)] = tensor
    lonely = [name for name, p in parts.items() if len(p) != 2]
    if lonely or not parts:
        raise UserError(f"{adapter_dir}: no A/B pair for module(s) {lonely[:3]} (damaged adapter?)")
    order = sorted(parts, key=lambda n: (layer_of(n) is None, layer_of(n) or 0, _order(n)))
    config = {**config, "scaling": scaling, "magnitudes": magnitudes}
    return config, {n: (parts[n]["B"], parts[n]["A"]) for n in order}


def pick_layers(spec: str | None, available: list[int]) -> set[int]:
    """`None`: first, middle and last adapted layer; `"all"`; or `"0,12,23"`."""
    if not available:
        return set()
    if spec is None:
        return {available[0], available[len(available) // 2], available[-1]}
    if spec.strip() == "all":
        return set(available)
    try:
        chosen = {int(x) for x in spec.split(",") if x.strip()}
    except ValueError:
        raise UserError(
            f"--inspect-layers {spec!r}: give layer numbers like 0,12,23, or all"
        ) from None
    if not chosen <= set(available):
        raise UserError(
            f"--inspect-layers {spec}: layer(s) {sorted(chosen - set(available))} are not adapted "
            f"(adapted layers: {available[0]}..{available[-1]})"
        )
    return chosen


def inspect_adapter(adapter_dir, base=None, layers: str | None = None) -> dict:
    """The whole report as a dict (what `inspect.json` holds). `base`: the base model, whose
    weights give the relative sizes and amplification; None reads only the adapter file."""
    config, factors = adapter_factors(adapter_dir)
    svd_layers = pick_layers(layers, sorted({layer_of(n) for n in factors} - {None}))
    modules = [
        module_report(
            name, B, A, config["scaling"], _base_weight(base, name), layer_of(name) in svd_layers
        )
        for name, (B, A) in factors.items()
    ]
    if config["magnitudes"] and base is not None:
        for row in modules:
            row["magnitude_change"] = magnitude_change(
                config["magnitudes"][row["module"]], _base_weight(base, row["module"])
            )
    return {
        "adapter": str(adapter_dir),
        "base_model": getattr(base, "name_or_path", "?") if base is not None else None,
        "r": int(config["r"]),
        "lora_alpha": config.get("lora_alpha"),
        "scaling": config["scaling"],
        "dora": bool(config["magnitudes"]),
        "w0_svd_layers": sorted(svd_layers) if base is not None else [],
        "modules": modules,
        "by_layer": group(modules, "layer"),
        "by_projection": group(modules, "projection"),
    }


def magnitude_change(m: torch.Tensor, W0: torch.Tensor) -> float:
    """DoRA: ‖m − ‖W0‖_c‖ / ‖‖W0‖_c‖, how far training moved the row lengths from W0's."""
    start = torch.linalg.vector_norm(W0.double(), dim=1)
    return float((m.double() - start).norm() / start.norm())


def layer_of(name: str) -> int | None:
    """`model.layers.12.mlp.up_proj` -> 12 (None for a module outside the decoder layers)."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def _base_weight(base, name: str):
    if base is None:
        return None
    try:
        return base.get_submodule(name).weight.detach()
    except AttributeError:
        raise UserError(f"the base model has no module {name}: is it the adapter's base?") from None


def group(modules: list[dict], key: str) -> list[dict]:
    """Aggregate by `key`: ‖ΔW‖ = √(Σ‖ΔW_i‖²), relative to √(Σ‖W0_i‖²) when W0 is known."""
    rows = []
    for value in sorted({m[key] for m in modules}, key=_order):
        members = [m for m in modules if m[key] == value]
        row = {
            key: value,
            "modules": len(members),
            "delta_norm": _rss(m["delta_norm"] for m in members),
        }
        if all("base_norm" in m for m in members):
            row["relative"] = row["delta_norm"] / _rss(m["base_norm"] for m in members)
        rows.append(row)
    return rows


def _rss(values) -> float:
    return math.sqrt(sum(v * v for v in values))


def _order(value) -> tuple:
    """Layers by number, projections as in a decoder layer (q, k, v, o, gate, up, down), then rest."""
    if isinstance(value, int):
        return (0, value, "")
    short = str(value).rsplit(".", 1)[-1]  # a projection, or a module's full name
    rank = PROJECTIONS.index(short) if short in PROJECTIONS else len(PROJECTIONS)
    return (1, rank, str(value))


# ---- reading it: text, inspect.json, inspect.png -------------------------------------------


def _fmt(value, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def format_report(report: dict) -> list[str]:
    """The report as text: where the adapter acts, then every module, then W0's directions."""
    base = report["base_model"]
    lines = [
        f"adapter {report['adapter']}: r={report['r']}, alpha={report['lora_alpha']}, "
        f"scaling s={report['scaling']:.4g}, {len(report['modules'])} modules; "
        + (
            f"base model {base}"
            if base
            else "adapter only (no base model: no ‖W0‖, no amplification)"
        )
    ]
    if report.get("dora"):
        lines += dora_lines(report)
    for key in ("projection", "layer"):
        lines += [f"\nby {key:<12} modules   ‖ΔW‖_F  ‖ΔW‖_F/‖W0‖_F"]
        for g in report[f"by_{key}"]:
            lines.append(
                f"  {g[key]!s:<12} {g['modules']:>7} {_fmt(g['delta_norm']):>8}"
                f" {_fmt(g.get('relative')):>14}"
            )
    width = max(len(m["module"]) for m in report["modules"])
    lines.append(
        f"\n{'module':<{width}}  {'shape':>10} {'‖ΔW‖_F':>8} {'relative':>9} rank erank"
        f"  {'amplif.':>7}  largest singular values of ΔW"
    )
    for m in report["modules"]:
        sigma = " ".join(_fmt(s, ".2g") for s in m["singular_values"][:4])
        lines.append(
            f"{m['module']:<{width}}  {'×'.join(map(str, m['shape'])):>10} {_fmt(m['delta_norm']):>8}"
            f" {_fmt(m.get('relative')):>9} {m['rank']:>4} {m['effective_rank']:>5.2f}"
            f"  {_fmt(m.get('amplification')):>7}  {sigma}{' …' if len(m['singular_values']) > 4 else ''}"
        )
    top = [m for m in report["modules"] if "w0_along_w0_top" in m]
    if top:
        lines.append(
            f"\nW0 projected on k directions (Hu et al. §7.3), layers {report['w0_svd_layers']}:\n"
            f"{'module':<{width}}  {'ΔW dirs':>8} {'W0 top':>8} {'random':>8}  share of ΔW in W0's top-k"
        )
        for m in top:
            lines.append(
                f"{m['module']:<{width}}  {_fmt(m['w0_along_delta']):>8} {_fmt(m['w0_along_w0_top']):>8}"
                f" {_fmt(m['w0_along_random']):>8}  {m['delta_share_in_w0_top']:.3f}"
            )
    return lines


def dora_lines(report: dict) -> list[str]:
    """DoRA: say that ΔW below is the low-rank part only, and how far the magnitudes moved."""
    lines = [
        "DoRA adapter: ΔW below is its low-rank part s·BA only; the magnitude vector m also "
        "rescales every output row (W' − W0 is not low-rank and is not reported)"
    ]
    changes = [m["magnitude_change"] for m in report["modules"] if "magnitude_change" in m]
    if changes:
        largest = max(report["modules"], key=lambda m: m.get("magnitude_change", -1))
        lines.append(
            f"magnitude change ‖m − ‖W0‖_c‖/‖‖W0‖_c‖: mean {sum(changes) / len(changes):.3g}, "
            f"largest {largest['magnitude_change']:.3g} ({largest['module']})"
        )
    return lines


def plot_report(report: dict) -> bytes:
    """PNG: update size by layer × projection (heatmap), and each module's spectrum σ_i / σ_1."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    modules = [m for m in report["modules"] if m["layer"] is not None]
    relative = all("relative" in m for m in modules)
    value = "relative" if relative else "delta_norm"
    layers = sorted({m["layer"] for m in modules})
    projections = [g["projection"] for g in report["by_projection"]]
    grid = torch.full((len(layers), len(projections)), math.nan)
    for m in modules:
        grid[layers.index(m["layer"]), projections.index(m["projection"])] = m[value]

    fig, (heat, spectra) = plt.subplots(1, 2, figsize=(12, max(4, 0.22 * len(layers) + 1.5)))
    image = heat.imshow(grid.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    heat.set_xticks(range(len(projections)), [p.removesuffix("_proj") for p in projections])
    heat.set_yticks(range(len(layers)), layers)
    heat.set_xlabel("projection")
    heat.set_ylabel("layer")
    heat.set_title("‖ΔW‖_F / ‖W0‖_F" if relative else "‖ΔW‖_F (no base model)")
    fig.colorbar(image, ax=heat)
    colors = plt.get_cmap("tab10")
    for m in modules:
        sigma = m["singular_values"]
        if sigma and sigma[0] > 0:
            color = colors(projections.index(m["projection"]) % 10)
            x = range(1, len(sigma) + 1)
            spectra.plot(x, [s / sigma[0] for s in sigma], color=color, alpha=0.35, lw=1)
    for i, p in enumerate(projections):
        spectra.plot([], [], color=colors(i % 10), label=p)
    spectra.xaxis.get_major_locator().set_params(integer=True)
    spectra.set_xlabel("i")
    spectra.set_ylabel("σ_i / σ_1")
    spectra.set_title(f"singular values of ΔW = s·BA (r = {report['r']}), one line per module")
    spectra.legend(fontsize="small")
    spectra.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def write_report(report: dict, out_dir) -> tuple[Path, Path]:
    """`inspect.json` and `inspect.png` into `out_dir`, each written whole or not at all."""
    out_dir = Path(out_dir)
    text = json.dumps(report, indent=1, ensure_ascii=False) + "\n"
    atomic_write_bytes(out_dir / INSPECT_JSON, text.encode())
    atomic_write_bytes(out_dir / INSPECT_PNG, plot_report(report))
    return out_dir / INSPECT_JSON, out_dir / INSPECT_PNG


def load_base(adapter_dir, model: str | None = None, trust_remote_code: bool = False):
    """The adapter's base model (or `model`), fp32 on CPU: only its weights are read."""
    from .model import load_model

    name = base_model_of(adapter_dir, read_adapter_config(adapter_dir), model)
    return load_model(name, torch.float32, "cpu", trust_remote_code)


def run(args) -> None:
    """Inspect `args.adapter`, print the report, write the files (infer.py --inspect, and main)."""
    base = None if args.no_base else load_base(args.adapter, args.model, args.trust_remote_code)
    report = inspect_adapter(args.adapter, base, args.inspect_layers)
    print("\n".join(format_report(report)))
    for path in write_report(report, args.adapter):
        print(f"written: {path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m lora.inspect", description="What did training change? (see the docstring)"
    )
    p.add_argument("adapter", help="adapter directory (train.py's --output)")
    p.add_argument("--model", default=None, help="base model (default: the adapter's)")
    p.add_argument(
        "--layers", dest="inspect_layers", default=None,
        help="layers for the W0-SVD comparisons: 0,12,23 or all (default: first, middle, last)",
    )  # fmt: skip
    p.add_argument("--no-base", action="store_true", help="read only the adapter file (fast)")
    p.add_argument("--trust-remote-code", action="store_true")
    args = p.parse_args(argv)
    try:
        run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
