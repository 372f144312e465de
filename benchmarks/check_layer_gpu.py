"""One-GPU smoke check (not a test, not a timing): the single-device MoE layer in bf16 on CUDA
(dispatch pipeline without collectives, compiled row layout, `torch._grouped_mm`) against the
independent fp32 dense reference of the test suite, forward and input gradient.

    PYTHONPATH=. python3 benchmarks/check_layer_gpu.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _dist import dense_moe  # noqa: E402  (the test suite's reference, shared on purpose)

from micromoe.runtime import MoEConfig, MoELayer  # noqa: E402


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 2
    torch.manual_seed(0)
    dev = torch.device("cuda")
    layer = MoELayer(MoEConfig(hidden=2048, ffn_hidden=4096, num_experts=16, top_k=2)).to(dev)
    ref = [
        p.detach().clone().float()
        for p in (layer.router.weight, layer.experts.w_gate_up, layer.experts.w_down)
    ]
    layer = layer.to(torch.bfloat16)
    x = torch.randn(8192, 2048, device=dev)
    zipf = torch.arange(1, 17, dtype=torch.float32, device=dev) ** -1.0
    expert = torch.multinomial(zipf.expand(8192, 16), 2)
    xb = x.to(torch.bfloat16).requires_grad_(True)
    layer(xb, forced_expert=expert).float().pow(2).mean().backward()
    y = layer(xb.detach(), forced_expert=expert)
    xr = x.clone().requires_grad_(True)
    yr = dense_moe(xr, *ref, expert)
    yr.pow(2).mean().backward()
    err_y, err_gx = rel_err(y, yr), rel_err(xb.grad, xr.grad)
    print(f"forward rel err {err_y:.4f}, input grad rel err {err_gx:.4f} (bf16 vs fp32 reference)")
    return 0 if err_y < 0.02 and err_gx < 0.03 else 1


if __name__ == "__main__":
    sys.exit(main())
