"""Throughput of `micromoe tokenize` on this CPU (tokens/s), on a plain text file and on JSON lines.

No model is downloaded: a GPT-2/Qwen-style byte-level BPE tokenizer (`--vocab` ids, default
32,000) is trained with `tokenizers` on the bundled tiny-shakespeare text, saved with a config.json
whose vocabulary is 151,936 (Qwen's, so ids are written as uint32), and the corpus is that text
repeated `--repeat` times (one document), or split into one JSON line per paragraph. Each case runs
the `micromoe tokenize` command in a fresh process; reported are the command's own tokens/s (from
reading the input to the last write) and the wall time of the whole command (start-up included).

    PYTHONPATH=. python benchmarks/bench_tokenize.py --json benchmarks/results/tokenize_devvm.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _env  # benchmarks/ (this script's folder) is on sys.path
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from micromoe.train.data import default_corpus
from micromoe.train.token_file import read_token_file


def make_model(folder: Path, vocab: int, model_vocab: int) -> None:
    """A folder with a byte-level BPE tokenizer.json trained on the bundled corpus and a config."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train([str(default_corpus())], trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": model_vocab, "eos_token_id": 0}
    (folder / "config.json").write_text(json.dumps(config))


def make_corpus(folder: Path, repeat: int) -> tuple[Path, Path]:
    """(text file, JSON-lines file with one paragraph per line) of the corpus repeated."""
    text = default_corpus().read_text() * repeat
    plain = folder / "corpus.txt"
    plain.write_text(text)
    lines = folder / "corpus.jsonl"
    with open(lines, "w") as f:
        for para in text.split("\n\n"):
            f.write(json.dumps({"text": para}) + "\n")
    return plain, lines


def run_case(model: Path, data: Path, out: Path) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "micromoe",
        "tokenize",
        "--hf",
        str(model),
        "--data",
        str(data),
        "--out",
        str(out),
    ]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    line = done.stderr.strip().splitlines()[-1]
    m = re.search(r"(\d+) documents, (\d+) tokens .* in ([\d.]+) s: (\d+) tokens/s", line)
    assert m, line
    ids, _ = read_token_file(out)
    return {
        "data": data.name,
        "input_mb": round(data.stat().st_size / 1e6, 2),
        "documents": int(m.group(1)),
        "tokens": int(m.group(2)),
        "id_dtype": str(ids.dtype),
        "tokenize_s": float(m.group(3)),
        "tokens_per_s": int(m.group(4)),
        "command_wall_s": round(wall, 2),
        "log": line,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=16, help="copies of the bundled corpus (1.1 MB each)")
    ap.add_argument("--vocab", type=int, default=32_000, help="BPE vocabulary trained")
    ap.add_argument("--json", help="write the results as JSON")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_tokenize_") as tmp:
        tmp = Path(tmp)
        make_model(tmp / "model", args.vocab, 151_936)
        rows = [run_case(tmp / "model", data, tmp / "out.bin") for data in make_corpus(tmp, args.repeat)]
    for r in rows:
        print(
            f"{r['data']:<14} {r['input_mb']:>7.1f} MB {r['documents']:>7} docs {r['tokens']:>10} tokens "
            f"({r['id_dtype']}): {r['tokens_per_s']:>9,} tokens/s, command {r['command_wall_s']:.1f} s"
        )
    if args.json:
        env = {
            "cpu": _env.cpu_name(),
            "cpu_count": os.cpu_count(),
            "rayon_threads": os.environ.get("RAYON_NUM_THREADS", "default (all cores)"),
            "load_average_1min_at_end": round(os.getloadavg()[0], 2),
            **_env.versions("python", "tokenizers", "numpy"),
            "commit": _env.git_commit(),
        }
        setup = {"repeat": args.repeat, "bpe_vocab": args.vocab, "model_vocab": 151_936}
        Path(args.json).write_text(json.dumps({"env": env, "setup": setup, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
