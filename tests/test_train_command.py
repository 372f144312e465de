"""`micromoe train` from the command line: option precedence, clear errors, outputs."""

from __future__ import annotations

import dataclasses
import json
import re
from importlib import resources
from pathlib import Path

import pytest

from micromoe.cli import build_parser, main
from micromoe.sim import load_trace
from micromoe.train.config import RUN_PRESETS, TrainConfig, resolve

TINY = [
    "--layers",
    "1",
    "--hidden",
    "16",
    "--heads",
    "2",
    "--ffn-hidden",
    "16",
    "--seq-len",
    "8",
    "--micro-batch",
    "2",
]


def _err(capsys, argv: list[str]) -> str:
    assert main(["train", *argv]) == 2
    return capsys.readouterr().err


def test_defaults_then_preset_then_flags():
    assert resolve("tiny", {}).lr == 3e-3
    assert resolve("small", {}).lr == 6e-4  # the preset overrides the default
    assert resolve("small", {"lr": 1e-3, "max_steps": None}).lr == 1e-3  # a flag overrides the preset
    assert resolve("small", {"max_steps": None}).max_steps == 1000  # None means "not given"


def _help_defaults(capsys, monkeypatch) -> dict[str, str]:
    """Option dest -> the text of '(default: ...)' at the end of its help in `micromoe train
    --help`, read from the printed help (one line per option with a wide terminal)."""
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    lines = capsys.readouterr().out.splitlines()
    shown = {}
    for i, line in enumerate(lines):
        option = re.match(r"^  (--[\w-]+)\S*(?: \S+)*?(?:\s{2,}(\S.*))?$", line)
        if option is None:
            continue
        text = option.group(2) or lines[i + 1].strip()
        default = re.search(r"\(default: (.*)\)$", text)
        if default is not None:
            shown[option.group(1)[2:].replace("-", "_")] = default.group(1)
    return shown


def _parse_shown(text: str) -> dict[str, object]:
    """'V' -> {preset: V} for every preset; 'V1 for p1/p2, V2 for p3' -> {p1: V1, p2: V1, p3: V2};
    values as bool (on/off), int, float or str."""

    def value(v: str) -> object:
        if v in ("on", "off"):
            return v == "on"
        for kind in (int, float):
            try:
                return kind(v)
            except ValueError:
                pass
        return v

    if " for " not in text:
        return dict.fromkeys(RUN_PRESETS, value(text))
    out = {}
    for part in text.split(", "):
        v, presets = part.split(" for ")
        out.update(dict.fromkeys(presets.split("/"), value(v)))
    return out


def test_help_shows_the_defaults_a_run_gets(capsys, monkeypatch):
    """Every default in --help is the value the run really gets without the flag: TrainConfig's
    field default, or each preset's where RUN_PRESETS sets it (resolved here from parsed empty
    flags). Every option backed by a TrainConfig field with a non-None default shows one."""
    shown = _help_defaults(capsys, monkeypatch)
    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    dests = {a.dest for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions}
    # --resume is a plain switch (off unless given); None defaults, and the model options' (the
    # preset's), are explained in words
    want = {d for d in dests & fields.keys() if fields[d] is not None} - {"resume"}
    words = {name: shown.pop(name) for name in set(shown) - want}
    assert set(shown) == want, want - set(shown)
    assert not any(re.search(r"\d", text) for text in words.values()), words  # no copied numbers
    assert shown.pop("preset") == fields["preset"]
    for name, text in shown.items():
        per_preset = _parse_shown(text)
        assert set(per_preset) == set(RUN_PRESETS), (name, text)
        for p, v in per_preset.items():
            args = build_parser().parse_args(["train", "--preset", p])
            real = getattr(resolve(p, vars(args)), name)
            assert (type(v), v) == (type(real), real), (name, p, text)
            if not any(name in values for values in RUN_PRESETS.values()):
                assert v == fields[name], (name, text)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dispatcher", "ep", "--merge", "2", "--nproc", "4"], "needs --merge 1"),
        (["--nproc", "3", "--ep", "2"], "EP=2 must divide DP=3"),
        (["--nproc", "4", "--dp", "2"], "DP=2 must equal the world size 4"),
        (["--global-batch", "10", "--micro-batch", "4"], "not a multiple of micro-batch x world = 4"),
        (["--vocab-size", "100"], "smaller than the data's 256"),
        (["--data", "/nonexistent/corpus.txt"], "does not exist"),
        (["--max-steps", "0"], "--max-steps must be a positive integer"),
        (["--lr", "0.1", "--min-lr", "0.5"], "min_lr <= lr"),
        (["--seq-len", "1000000"], "too few for sequences"),
        (["--dispatcher", "ep", "--cost-model", "auto"], "--dispatcher ep has none"),
        (["--nproc", "4", "--dispatcher", "ep", "--placement", "random"], "drop --placement"),
        (["--replace-cooldown", "-1"], "--replace-cooldown must be an integer >= 0"),
        (["--replace-trigger-after", "0"], "--replace-trigger-after must be a positive integer"),
        (["--replace-threshold", "0.9"], "--replace-threshold must be >= 1"),
    ],
)
def test_user_mistakes_are_one_line_errors(capsys, argv, message):
    err = _err(capsys, argv)
    assert message in err and "Traceback" not in err


def test_resume_without_checkpoint(capsys, tmp_path):
    assert "no checkpoint under" in _err(capsys, ["--resume", "--out", str(tmp_path)])


def test_nproc_under_a_launcher(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert "drop --nproc" in _err(capsys, ["--nproc", "4"])


def test_unknown_option_and_preset_exit():
    with pytest.raises(SystemExit) as unknown:
        main(["train", "--no-such-option"])
    assert unknown.value.code == 2
    with pytest.raises(SystemExit) as bad_preset:
        main(["train", "--preset", "gpt-5"])
    assert bad_preset.value.code == 2


def test_two_process_run_writes_log_report_and_routing(tmp_path):
    """Also plans with a cost model calibrated at start-up (--cost-model auto)."""
    out, routing = tmp_path / "run", tmp_path / "routing.jsonl"
    argv = [*TINY, "--nproc", "2", "--max-steps", "3", "--eval-interval", "2", "--out", str(out)]
    argv += ["--cost-model", "auto"]
    assert main(["train", *argv, "--record-routing", str(routing), "--no-save"]) == 0
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [0, 1, 2]
    assert "val_loss" in recs[1] and "val_loss" in recs[2] and "val_loss" not in recs[0]
    for key in ("loss", "tokens_per_s", "max_mean_load", "ep_max_mean_load", "sched_us"):
        assert all(isinstance(r[key], float) for r in recs), key
    config = json.loads((out / "config.json").read_text())
    assert (
        config["world"] == 2
        and config["model"]["hidden"] == 16
        and config["train"]["dispatcher"] == "microep"
    )
    for name in ("report.md", "loss.png", "balance.png", "throughput.png"):
        assert (out / name).stat().st_size > 0, name
    assert "plain EP" in (out / "report.md").read_text()
    assert len(routing.read_text().splitlines()) == 3  # steps x layers x micro-batches
    assert not (out / "checkpoints").exists()


def test_bundled_routing_log_of_a_tiny_run_replays():
    trace = load_trace(Path(str(resources.files("micromoe") / "data" / "traces" / "tiny_routing.jsonl")))
    # 200 steps x 1 micro-batch, 4 MoE layers, 4 source ranks, 8 experts; 8 x 64 tokens x top-2 per rank
    assert trace.counts.shape == (200, 4, 4, 8)
    assert (trace.counts.sum(axis=3) == 8 * 64 * 2).all()


def test_replacement_with_plain_ep_is_refused_before_any_process_starts(capfd, tmp_path):
    """A mistake the ranks would find while building (adaptive replacement with plain EP) is found
    before they start: one error line, exit code 2, and nothing written into --out."""
    argv = [*TINY, "--nproc", "2", "--dispatcher", "ep", "--replace-interval", "2", "--max-steps", "1"]
    argv += ["--out", str(tmp_path / "run"), "--no-report"]
    want = "micromoe train: error: adaptive replacement moves MicroEP replicas; --dispatcher is 'ep'"
    assert main(["train", *argv]) == 2
    err = capfd.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("micromoe train: error:")]
    assert len(errors) == 1 and errors[0].startswith(want), err
    assert "Traceback" not in err and not (tmp_path / "run").exists()
