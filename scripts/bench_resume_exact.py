"""Finish a run at N steps, extend it to M with ``--resume``, compare with a straight M-step run.

Issue 21 item 3: the figures are the number of weight tensors that differ (and the largest
difference) between "N, then resume to M" and "straight to M", and between two straight runs
(the noise floor, 0 when runs are deterministic). Built-in ``demo`` config on the demo corpus
(built once into ``--work/corpus`` from pip-only sources), no validation.

    python scripts/bench_resume_exact.py --work runs/resume-exact --n 30 --m 40 \
        --set train.threads=2
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

import modalign
from modalign.data.corpora.demo import build_demo_corpus


def _run(corpus: Path, out: Path, steps: int, extra: list[str], resume: str | None = None) -> None:
    sets = [f"data.train={corpus / 'train.jsonl'}", f"output.dir={out}", f"train.steps={steps}",
            "data.val=", "train.val_every=0", "train.progress=false", *extra]  # fmt: skip
    modalign.run_pretrain(modalign.load_config("demo", sets), resume=resume)


def _diff(a: Path, b: Path) -> tuple[int, int, float]:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    worst = max(((wa[k] - wb[k]).abs().max().item() for k in differ), default=0.0)
    return len(differ), len(wa), worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--n", type=int, default=30, help="steps of the first, finished run")
    ap.add_argument("--m", type=int, default=40, help="steps it is extended to")
    ap.add_argument("--items", type=int, default=400, help="demo corpus rows")
    ap.add_argument("--set", nargs="*", default=[], help="extra key=value overrides")
    args = ap.parse_args()
    corpus = args.work / "corpus"
    if not (corpus / "train.jsonl").exists():
        build_demo_corpus(corpus, limit=args.items)
    runs = {name: args.work / name for name in ("straight", "extended", "straight2")}
    for path in runs.values():
        shutil.rmtree(path, ignore_errors=True)
    _run(corpus, runs["straight"], args.m, args.set)
    _run(corpus, runs["extended"], args.n, args.set)
    _run(corpus, runs["extended"], args.m, args.set, resume="latest")
    _run(corpus, runs["straight2"], args.m, args.set)
    for label, other in (("extended", runs["extended"]), ("straight twice", runs["straight2"])):
        n, total, worst = _diff(runs["straight"], other)
        print(f"{label}: {n} of {total} tensors differ from the straight run (max |d| {worst:.3g})")


if __name__ == "__main__":
    main()
