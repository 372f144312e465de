"""The end-of-run report: OUT/report.md plus PNG plots of loss, balance per layer (MicroEP against
the plain-EP counterfactual on the same routing) and throughput, all from OUT/log.jsonl."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from micromoe.plot_style import coincide_note, coinciding, overlap_style


def read_log(out: Path) -> list[dict[str, Any]]:
    """The records of OUT/log.jsonl (a torn last line is left out)."""
    path = Path(out) / "log.jsonl"
    if not path.exists():
        raise ValueError(f"{str(path)!r} does not exist: train into {out} first")
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines):
                break  # a torn last line: the write a crash interrupted
            raise ValueError(f"{str(path)!r} line {number} is not JSON ({exc.msg})") from None
    return records


def _steady(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records after the first 10% of steps, without the first step of each process (`cold`:
    one-time set-up), for rates and balance."""
    warm = [r for r in records if not r.get("cold")] or records
    return warm[len(warm) // 10 :] or warm


def summary_line(records: list[dict[str, Any]]) -> str:
    """One line over the records (the whole run when read back from log.jsonl): final loss,
    balance of the executed plans against plain EP, throughput, scheduler time (MicroEP only)
    and, apart from it, the one-time kernel compilation."""
    tail = _steady(records)
    ex = np.mean([r["max_mean_load"] for r in tail])
    cf = np.mean([r["ep_max_mean_load"] for r in tail])
    val = next((r["val_loss"] for r in reversed(records) if "val_loss" in r), None)
    text = (
        f"done: {records[-1]['step'] + 1} steps, loss {records[-1]['loss']:.4f}"
        + (f", val loss {val:.4f}" if val is not None else "")
        + f"; max/mean GPU load {ex:.3f} executed vs {cf:.3f} plain EP on the same routing"
        + f"; {np.median([r['tokens_per_s'] for r in tail]):,.0f} tokens/s"
    )
    sched = [r["sched_us"] for r in tail if r.get("sched_us") is not None]
    if sched:
        text += f"; scheduler {np.median(sched):.0f} us per layer and micro-batch"
    compile_s = sum(r.get("compile_s") or 0.0 for r in records)
    if compile_s:
        text += f"; kernels compiled or loaded once in {compile_s:.1f} s (left out of the times above)"
    mfus = [r["mfu"] for r in tail if r.get("mfu") is not None]
    return text + (f"; MFU {100 * np.median(mfus):.1f}%" if mfus else "")


def write_report(out: Path) -> Path:
    """Write report.md, loss.png, balance.png, throughput.png into `out`; return the .md path."""
    import matplotlib  # optional heavy dependency, only when a report is written

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    records = read_log(out)
    config = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else {}
    steps = np.array([r["step"] + 1 for r in records])
    _plot_loss(plt, records, steps, out / "loss.png")
    _plot_balance(plt, records, steps, out / "balance.png")
    _plot_throughput(plt, records, steps, out / "throughput.png")
    md = out / "report.md"
    md.write_text(_markdown(records, config))
    return md


def _plot_loss(plt, records, steps, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [r["loss"] for r in records], label="train")
    val = [(r["step"] + 1, r["val_loss"]) for r in records if "val_loss" in r]
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="Loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_balance(plt, records, steps, path: Path) -> None:
    ex = np.array([r["layer_max_mean_load"] for r in records])  # [steps, L]
    cf = np.array([r["layer_ep_max_mean_load"] for r in records])
    num_layers = ex.shape[1] if ex.ndim == 2 else 0
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    executed = {f"layer {i}": ex[:, i] for i in range(num_layers)}
    plain = {f"layer {i}": cf[:, i] for i in range(num_layers)}
    colors = [f"C{i % 10}" for i in range(num_layers)]
    for i, ys in enumerate(plain.values()):
        axes[0].plot(steps, ys, color=colors[i], alpha=0.35, lw=1)
    for i, (name, ys) in enumerate(executed.items()):
        axes[0].plot(
            steps, ys, color=colors[i], label=name, **overlap_style(i, num_layers, points=len(steps))
        )
    axes[0].axhline(1.0, color="k", lw=0.5)
    axes[0].set(
        xlabel="step", ylabel="max/mean GPU load", title="Per layer: executed (markers) vs plain EP (faint)"
    )
    note = coincide_note(coinciding(executed))
    if note:  # lines drawn on top of each other: say so (each is still drawn, thinner on top)
        axes[0].text(0.01, 0.98, f"executed, {note}", transform=axes[0].transAxes, va="top", fontsize=7)
    if num_layers <= 8:
        axes[0].legend(fontsize=7, loc="upper right")
    x = np.arange(num_layers)
    tail = slice(len(records) // 10, None)
    axes[1].bar(x - 0.2, cf[tail].mean(0) if num_layers else [], 0.4, label="plain EP (counterfactual)")
    axes[1].bar(x + 0.2, ex[tail].mean(0) if num_layers else [], 0.4, label="executed")
    axes[1].axhline(1.0, color="k", lw=0.5)
    axes[1].set_xticks(x)
    axes[1].set_ylim(bottom=0.95)
    axes[1].set(
        xlabel="MoE layer", ylabel="mean max/mean GPU load", title="Mean over steps (first 10% excluded)"
    )
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_throughput(plt, records, steps, path: Path) -> None:
    """Tokens/s per step, without the first step of each process (its one-time set-up: kernel
    loading, first allocations) that would squash the axis."""
    keep = np.array([not r.get("cold") for r in records], dtype=bool)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps[keep], np.array([r["tokens_per_s"] for r in records])[keep])
    left_out = int((~keep).sum())
    title = "Throughput" + (f" (first step of each process left out: {left_out})" if left_out else "")
    ax.set(xlabel="step", ylabel="tokens/s (all ranks)", title=title)
    ax.title.set_fontsize(9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _markdown(records: list[dict[str, Any]], config: dict[str, Any]) -> str:
    tail = _steady(records)
    ex = np.array([r["layer_max_mean_load"] for r in tail]).mean(0)
    cf = np.array([r["layer_ep_max_mean_load"] for r in tail]).mean(0)
    train = config.get("train", {})
    lines = [
        "# micromoe training report",
        "",
        f"Preset `{train.get('preset', '?')}`, dispatcher `{train.get('dispatcher', '?')}`, world size "
        f"{config.get('world', '?')}, layout {config.get('layout', '?')}.",
        "",
        summary_line(records),
        "",
        "Balance is max/mean rows computed per GPU of a MicroEP group, averaged over micro-batches and",
        "steps (the first 10% of steps excluded); plain EP is the counterfactual on the same routing.",
        "",
        "| MoE layer | executed max/mean | plain EP max/mean |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {i} | {e:.3f} | {c:.3f} |" for i, (e, c) in enumerate(zip(ex, cf, strict=True))]
    lines += ["", "![loss](loss.png)", "", "![balance](balance.png)", "", "![throughput](throughput.png)", ""]
    return "\n".join(lines)
