"""lora.inspect: the cheap spectrum is ΔW's, a planted update is found exactly, files, the CLIs."""

import json
import math

import pytest
import torch

from lora.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, save_adapter
from lora.errors import UserError
from lora.inject import apply_lora, lora_layers
from lora.inspect import (
    INSPECT_JSON,
    INSPECT_PNG,
    delta_svd,
    effective_rank,
    inspect_adapter,
    main,
)
from lora.model import load_model
from lora.spec import LoRASpec

PLANTED = "model.layers.1.self_attn.q_proj"
PLANTED_SIGMA = (3.0, 1.0)  # ΔW = 3·u1 v1ᵀ + 1·u2 v2ᵀ: ‖ΔW‖_F = √10, rank 2


@pytest.mark.parametrize("out,inp,r", [(64, 48, 4), (32, 64, 8), (3, 10, 4), (20, 2, 4)])
@pytest.mark.parametrize("scaling", [2.0, 16 / math.sqrt(8)])
def test_cheap_singular_values_equal_svdvals_of_the_full_delta(out, inp, r, scaling):
    g = torch.Generator().manual_seed(out * inp + r)
    B, A = torch.randn(out, r, generator=g), torch.randn(r, inp, generator=g)
    U, sigma, V = delta_svd(B, A, scaling)
    delta = scaling * B.double() @ A.double()
    full = torch.linalg.svdvals(delta)
    k = min(out, inp, r)
    assert sigma.shape == (k,) and U.shape == (out, k) and V.shape == (inp, k)
    torch.testing.assert_close(sigma, full[:k], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(U * sigma @ V.T, delta, rtol=1e-10, atol=1e-10)  # ΔW = U Σ Vᵀ


def test_effective_rank_is_one_for_one_direction_and_k_for_k_equal_ones():
    assert effective_rank(torch.tensor([5.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert effective_rank(torch.tensor([2.0, 2.0, 2.0])) == pytest.approx(3.0)
    assert effective_rank(torch.zeros(4)) == 0.0


def orthonormal(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64))[0]


def plant(layer, U, V, sigma=PLANTED_SIGMA):
    """Make this layer's ΔW = s·B A equal U diag(σ) Vᵀ exactly: rank 2 whatever r is."""
    k = len(sigma)
    with torch.no_grad():
        layer.lora_A.weight[:k] = V.T.float()
        layer.lora_B.weight.zero_()
        layer.lora_B.weight[:, :k] = (
            U * torch.tensor(sigma, dtype=U.dtype) / layer.scaling
        ).float()


@pytest.fixture(scope="module")
def planted(tiny_models, tmp_path_factory):
    """A trained-looking adapter on all-linear where only layer 1's q_proj changed (rank 2)."""
    model = load_model(str(tiny_models["qwen2"]))
    apply_lora(model, LoRASpec("all-linear", r=4, alpha=8))  # B = 0: every other ΔW is exactly zero
    layer = lora_layers(model)[PLANTED]
    plant(layer, orthonormal(64, 2, seed=1), orthonormal(64, 2, seed=2))
    out = tmp_path_factory.mktemp("planted")
    save_adapter(model, out, base_model_name_or_path=str(tiny_models["qwen2"]))
    return out, load_model(str(tiny_models["qwen2"]))


def test_report_finds_exactly_the_planted_layer_rank_and_norms(planted):
    adapter, base = planted
    report = inspect_adapter(adapter, base, layers="all")
    changed = [m for m in report["modules"] if m["delta_norm"] > 1e-6]
    assert [m["module"] for m in changed] == [PLANTED]
    (m,) = changed
    assert m["rank"] == 2 and m["layer"] == 1 and m["projection"] == "q_proj"
    assert m["singular_values"][:2] == pytest.approx(PLANTED_SIGMA, rel=1e-6)
    assert m["delta_norm"] == pytest.approx(math.sqrt(10), rel=1e-6)
    w0_norm = float(base.get_submodule(PLANTED).weight.detach().norm())
    assert m["relative"] == pytest.approx(math.sqrt(10) / w0_norm, rel=1e-6)
    p = 0.75, 0.25  # σ / Σσ
    assert m["effective_rank"] == pytest.approx(math.exp(-sum(x * math.log(x) for x in p)))
    layers = {g["layer"]: g["delta_norm"] for g in report["by_layer"]}
    projections = {g["projection"]: g["delta_norm"] for g in report["by_projection"]}
    assert layers == {0: 0.0, 1: pytest.approx(math.sqrt(10), rel=1e-6)}
    assert max(projections, key=projections.get) == "q_proj"
    assert sum(projections.values()) == pytest.approx(math.sqrt(10), rel=1e-6)


def test_amplification_is_the_papers_projection_of_w0_on_the_update_directions(planted):
    adapter, base = planted
    (m,) = [m for m in inspect_adapter(adapter, base)["modules"] if m["module"] == PLANTED]
    W0 = base.get_submodule(PLANTED).weight.detach().double()
    delta = orthonormal(64, 2, 1) @ torch.diag(torch.tensor(PLANTED_SIGMA).double())
    U, _, Vh = torch.linalg.svd(delta @ orthonormal(64, 2, 2).T)  # the full (64, 64) SVD
    along = float(torch.linalg.matrix_norm(U[:, :2].T @ W0 @ Vh[:2].T))
    assert m["w0_along_delta"] == pytest.approx(along, rel=1e-6)
    assert m["amplification"] == pytest.approx(math.sqrt(10) / along, rel=1e-6)
    top2 = torch.linalg.svdvals(W0)[:2].norm()
    assert m["w0_along_w0_top"] == pytest.approx(float(top2), rel=1e-6)


def test_an_update_inside_w0s_top_directions_has_share_one(tiny_models, tmp_path):
    model = load_model(str(tiny_models["qwen2"]))
    apply_lora(model, LoRASpec("q_proj", r=4, alpha=8))
    U0, _, V0h = torch.linalg.svd(model.get_submodule(PLANTED).base_layer.weight.double())
    plant(lora_layers(model)[PLANTED], U0[:, :2], V0h[:2].T)
    save_adapter(model, tmp_path)
    report = inspect_adapter(tmp_path, load_model(str(tiny_models["qwen2"])), layers="1")
    (m,) = [m for m in report["modules"] if "delta_share_in_w0_top" in m]
    assert m["module"] == PLANTED and m["delta_share_in_w0_top"] == pytest.approx(1.0, abs=1e-6)
    assert report["w0_svd_layers"] == [1]


def test_adapter_only_needs_no_base_model_and_writes_both_files(planted, tmp_path, capsys):
    adapter, _ = planted
    copy = tmp_path / "adapter"
    copy.mkdir()
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        (copy / name).write_bytes((adapter / name).read_bytes())
    config = json.loads((copy / ADAPTER_CONFIG).read_text())
    config["base_model_name_or_path"] = "/no/such/model"
    (copy / ADAPTER_CONFIG).write_text(json.dumps(config))
    assert main([str(copy), "--no-base"]) == 0
    report = json.loads((copy / INSPECT_JSON).read_text())
    (m,) = [m for m in report["modules"] if m["delta_norm"] > 1e-6]
    assert m["module"] == PLANTED and m["rank"] == 2 and "relative" not in m
    assert (copy / INSPECT_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(copy.glob("*.tmp")) and PLANTED in capsys.readouterr().out


def test_infer_inspect_prints_the_report_and_writes_the_files(planted, capsys):
    import infer

    adapter, _ = planted
    assert infer.main(["--adapter", str(adapter), "--inspect", "--inspect-layers", "0,1"]) == 0
    out = capsys.readouterr().out
    assert "by layer" in out and "Hu et al." in out and PLANTED in out
    report = json.loads((adapter / INSPECT_JSON).read_text())
    assert report["w0_svd_layers"] == [0, 1] and report["base_model"]


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--inspect-layers", "7"], "are not adapted"),
        (["--inspect-layers", "one"], "give layer numbers"),
    ],
)
def test_bad_inspect_layers_is_one_clear_line(planted, capsys, argv, needle):
    import infer

    adapter, _ = planted
    assert infer.main(["--adapter", str(adapter), "--inspect", "--no-base", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0]


def test_a_lonely_a_matrix_is_a_clear_error(planted, tmp_path):
    from safetensors.torch import load_file, save_file

    adapter, _ = planted
    tensors = load_file(adapter / ADAPTER_WEIGHTS)
    tensors.pop(f"base_model.model.{PLANTED}.lora_B.weight")
    save_file(tensors, tmp_path / ADAPTER_WEIGHTS)
    (tmp_path / ADAPTER_CONFIG).write_bytes((adapter / ADAPTER_CONFIG).read_bytes())
    with pytest.raises(UserError, match="no A/B pair"):
        inspect_adapter(tmp_path)


def test_groups_add_updates_as_one_vector_root_sum_of_squares():
    from lora.inspect import group

    modules = [
        {"layer": 2, "projection": "v_proj", "delta_norm": 3.0, "base_norm": 30.0},
        {"layer": 2, "projection": "q_proj", "delta_norm": 4.0, "base_norm": 40.0},
        {"layer": 10, "projection": "q_proj", "delta_norm": 0.0, "base_norm": 1.0},
    ]
    by_layer = group(modules, "layer")
    assert [g["layer"] for g in by_layer] == [2, 10]  # by number, not as text
    assert by_layer[0] == {"layer": 2, "modules": 2, "delta_norm": 5.0, "relative": 0.1}
    assert [g["projection"] for g in group(modules, "projection")] == ["q_proj", "v_proj"]
