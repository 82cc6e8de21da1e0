"""fxopt.save / fxopt.load of a Hugging Face BERT compiled through the export frontend (auto mode falls back to
torch.export for ``BertModel``): file size, save and load time, and whether the round trip is bit-identical with
the same output type, per recipe and suffix.

    python -m bench.export_save [layers] [hidden] [rounds]

Defaults: 6 layers, 384 wide, 12 heads (all-MiniLM-L6-v2 size), 3 rounds (median). 1 thread. Times are wall
clock of ``fxopt.save`` / ``fxopt.load`` (load includes checking the file and re-packing int8 weights).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.utils._pytree as pytree
import transformers

import fxopt
from fxopt import recipes


def _median_seconds(fn, rounds: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(rounds):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main(layers: int = 6, hidden: int = 384, rounds: int = 3) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 32,
                                     intermediate_size=4 * hidden)
    bert = transformers.BertModel(config).eval()
    gen = torch.Generator().manual_seed(1)

    def tokens(batch: int, length: int):
        return torch.randint(1000, 30000, (batch, length), generator=gen), torch.ones(batch, length, dtype=torch.long)

    example, calibration, fresh = tokens(2, 16), [tokens(2, 16) for _ in range(4)], tokens(3, 21)
    cases = {"float": ([], None), "fp16": (recipes.fp16(), None), "dynamic int8": (recipes.dynamic_int8(), None),
             "static int8 x86": (recipes.static_int8(calibration), "x86")}
    print(f"BertModel {layers} layers x {hidden}, auto mode (export frontend); median of {rounds}, 1 thread")
    print(f"{'recipe':16} {'file':5} {'MB':>7} {'save s':>7} {'load s':>7}  round trip")
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for name, (passes, backend) in cases.items():
            compiled = fxopt.compile(bert, passes, example_inputs=example, backend=backend)
            expected = compiled(*fresh)
            for suffix in (".pt", ".pt2"):
                path = Path(tmp) / f"m{suffix}"
                save_s, _ = _median_seconds(lambda: fxopt.save(compiled, path), rounds)
                load_s, loaded = _median_seconds(lambda: fxopt.load(path), rounds)
                got = loaded(*fresh)
                same = type(got) is type(expected) and all(
                    torch.equal(a, b) for a, b in zip(pytree.tree_leaves(got), pytree.tree_leaves(expected)))
                print(f"{name:16} {suffix:5} {path.stat().st_size / 1e6:7.1f} {save_s:7.2f} {load_s:7.2f}  "
                      f"{'bit-identical ' + type(got).__name__ if same else 'DIFFERS'}", flush=True)


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
