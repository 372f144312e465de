"""Hugging Face interop on this CPU: parity with `transformers` per architecture, and the memory of
a streaming import.

Parity (fp32, tiny random models built with `transformers` as in tests/_hf_models.py): max
|our logits - theirs| / max |theirs|, whether every router picked the same experts, and the
relative loss difference before and after one AdamW step from the same weights. Import memory: a
generated Mixtral-layout folder of 16 MiB shards is read tensor by tensor in a fresh process;
reported is the peak RSS increase (VmHWM after a reset) against the largest shard.

    PYTHONPATH=.:tests python benchmarks/bench_hf.py --json benchmarks/results/hf_devvm.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import _env  # benchmarks/ (this script's folder) is on sys.path
import torch
from _hf_models import ARCHS, save_hf  # tests/ on PYTHONPATH
from test_hf_source import PEAK  # the measuring process of the import-memory test

from micromoe.model import ModelConfig, MoETransformer
from micromoe.model.hf import hf_config, hf_source, hf_tensors, load_into_model, logical_rules, write_shards
from micromoe.runtime.router import TopKRouter


def parity(arch: str, folder: Path, seq: int = 16) -> dict:
    theirs = save_hf(arch, folder, seed=3)
    source = hf_source(folder, seq_len=seq)
    ours = MoETransformer(source.config)
    load_into_model(ours, source)
    routes: dict[str, list[torch.Tensor]] = {"ours": [], "theirs": []}
    for key, model in (("ours", ours), ("theirs", theirs)):
        for m in model.modules():
            if isinstance(m, TopKRouter) or type(m).__name__.endswith("TopKRouter"):
                m.register_forward_hook(
                    lambda _m, _i, out, key=key: routes[key].append(
                        (out.expert if key == "ours" else out[2]).sort(-1).values
                    )
                )
    idx = torch.randint(0, 96, (3, seq + 1), generator=torch.Generator().manual_seed(2))
    x, y = idx[:, :-1], idx[:, 1:]
    with torch.no_grad():
        got, want = ours.eval()(x)[0], theirs.eval()(x).logits
    same_routes = all(torch.equal(a, b) for a, b in zip(routes["ours"], routes["theirs"], strict=True))
    ours.train()
    theirs.train()
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1) for m in (ours, theirs)]

    def losses() -> list[torch.Tensor]:
        theirs_loss = torch.nn.functional.cross_entropy(theirs(x).logits.flatten(0, 1), y.flatten())
        return [ours(x, y)[1], theirs_loss]

    before = losses()
    for loss in before:
        loss.backward()
    for opt in opts:
        opt.step()
    with torch.no_grad():
        after = losses()
    return {
        "arch": arch,
        "logits_rel_diff": float((got - want).abs().max() / want.abs().max()),
        "same_experts": same_routes,
        "loss_rel_diff_before": abs(before[0].item() - before[1].item()) / before[1].item(),
        "loss_rel_diff_after_adamw": abs(after[0].item() - after[1].item()) / after[1].item(),
        "loss_before": before[1].item(),
        "loss_after": after[1].item(),
    }


def import_memory(folder: Path) -> dict:
    cfg = ModelConfig(
        vocab_size=512, seq_len=32, num_layers=4, hidden=256, num_heads=4, ffn_hidden=1024, num_experts=8
    )
    (folder / "config.json").write_text(json.dumps(hf_config(cfg)))
    rules = logical_rules(cfg, "MixtralForCausalLM")
    gen = torch.Generator().manual_seed(0)
    shards = write_shards(
        folder,
        hf_tensors(rules, lambda n: torch.randn(rules[n].shape, generator=gen)),
        max_shard_bytes=16 << 20,
    )
    largest = max(s.stat().st_size for s in shards)
    out = subprocess.run(
        [sys.executable, "-c", PEAK, str(folder), str(2 * largest)],
        capture_output=True,
        text=True,
        check=True,
    )
    return {
        "shards": len(shards),
        "largest_shard_bytes": largest,
        "total_bytes": sum(s.stat().st_size for s in shards),
        "address_space_cap_over_start_bytes": 2 * largest,
        "peak_rss_increase_bytes": json.loads(out.stdout)["peak"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results as JSON")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_hf_") as tmp:
        rows = [parity(arch, Path(tmp) / arch) for arch in ARCHS]
        (Path(tmp) / "import").mkdir()
        memory = import_memory(Path(tmp) / "import")
    for r in rows:
        print(
            f"{r['arch']:<22} logits {r['logits_rel_diff']:.1e}  same experts {r['same_experts']}  "
            f"loss {r['loss_rel_diff_before']:.1e} -> after AdamW {r['loss_rel_diff_after_adamw']:.1e}"
        )
    print(
        f"import: {memory['shards']} shards, largest {memory['largest_shard_bytes'] / 2**20:.1f} MiB, "
        f"peak RSS +{memory['peak_rss_increase_bytes'] / 2**20:.1f} MiB"
    )
    if args.json:
        env = {
            "cpu": _env.cpu_name(),
            **_env.versions("python", "torch", "transformers"),
            "commit": _env.git_commit(),
        }
        Path(args.json).write_text(
            json.dumps({"env": env, "parity": rows, "import": memory}, indent=1) + "\n"
        )


if __name__ == "__main__":
    main()
