"""``modalign demo``: build-demo -> pretrain -> finetune -> index -> search -> evaluate -> report."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from modalign.config import load_config
from modalign.core.artifact import LOCK_FILE, OutputKind, atomic_write_text, output_dir
from modalign.report import classify_table, plot_loss, retrieval_table, table

log = logging.getLogger(__name__)

DEMO_KIND = OutputKind(
    "modalign.demo",
    "demo run",
    (  # a demo folder written before lock files recorded kinds: its report or its model
        ("report.json", None),
        ("model/modalign.json", "modalign.model-bundle"),
        ("model/checkpoints/step-*/state.json", "modalign.checkpoint"),
    ),
)
"""``modalign demo``'s folder: corpus/, model/, classifier/, index/, benchmark/, reports."""


def _demo_config(out: Path, steps: int | None) -> Any:
    corpus = out / "corpus"
    overrides = [
        f"data.train={corpus / 'train.jsonl'}",
        f"data.val={corpus / 'test.jsonl'}",
        f"output.dir={out / 'model'}",
        f"finetune.model={out / 'model'}",
        f"finetune.train={corpus / 'train.jsonl'}",
        f"finetune.test={corpus / 'test.jsonl'}",
        f"finetune.out={out / 'classifier'}",
    ]
    if steps is not None:
        overrides.append(f"train.steps={steps}")
    return load_config("demo", overrides)


def _index_and_evaluate(cfg: Any, out: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from modalign.pretrain.bundle import load_bundle
    from modalign.retrieval.embed import embed_source
    from modalign.retrieval.evaluate import evaluate_pairs
    from modalign.retrieval.index.corpus import CorpusIndex, build_corpus_index

    model = load_bundle(cfg.output.dir)
    emb, _ = embed_source(model, out / "corpus" / "test.jsonl", batch_size=128)
    build_corpus_index(emb, out / "index", model.fingerprint, str(Path(cfg.output.dir).resolve()))
    index = CorpusIndex.open(out / "index", expected_fingerprint=model.fingerprint)
    return evaluate_pairs(emb), _example_searches(model, index, emb)


def run_demo(
    out: Path, steps: int | None = None, fresh: bool = False
) -> tuple[dict[str, Any], str]:
    """Run the whole pipeline into ``out``; returns (JSON report, readable report).

    Re-running resumes: the corpus is reused and pretraining continues from its latest
    checkpoint (``--fresh`` starts over). ``out`` is claimed for the whole run
    (:func:`~modalign.core.artifact.output_dir`: a folder holding other files, or a demo already
    running into it, is refused with exit 2).
    """
    with output_dir(out, DEMO_KIND, "--out") as held:
        return _run_demo(held, steps, fresh)


def _run_demo(out: Path, steps: int | None, fresh: bool) -> tuple[dict[str, Any], str]:
    import shutil

    import modalign
    from modalign.data.corpora.demo import build_demo_corpus
    from modalign.finetune.pipeline import run_finetune

    started = time.perf_counter()
    if fresh:  # everything but the lock this run holds
        for child in out.iterdir():
            if child.name != LOCK_FILE:
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    corpus = out / "corpus"
    timings: dict[str, float] = {}
    t = time.perf_counter()
    if not (corpus / "train.jsonl").is_file() or not (corpus / "test.jsonl").is_file():
        log.info("building the demo corpus in %s", corpus)
        build_demo_corpus(corpus)
    timings["corpus"] = time.perf_counter() - t
    cfg = _demo_config(out, steps)

    t = time.perf_counter()
    log.info("pretraining %d steps (batch %d) -> %s", cfg.train.steps, cfg.train.batch_size,
             cfg.output.dir)  # fmt: skip
    modalign.run_pretrain(cfg, resume="latest")
    timings["pretrain"] = time.perf_counter() - t
    t = time.perf_counter()
    ft = run_finetune(cfg.finetune, out / "classifier")
    timings["finetune"] = time.perf_counter() - t
    t = time.perf_counter()
    retrieval, searches = _index_and_evaluate(cfg, out)
    timings["index+evaluate"] = time.perf_counter() - t
    t = time.perf_counter()
    value = _value_of_pretraining(cfg, out)
    timings["baselines"] = time.perf_counter() - t

    plot = plot_loss(Path(cfg.output.dir) / "metrics.jsonl", out / "loss.png")
    result = {
        "retrieval": retrieval,
        "classify": {"fused": ft.fused, "labels_only": ft.labels_only},
        "pseudo_labels": ft.pseudo,
        "value": value,
        "searches": searches,
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "wall_s": round(time.perf_counter() - started, 2),
        "out": str(out),
        "serve_command": f"modalign serve --index {out / 'index'}",
    }
    text = _report_text(result, cfg.finetune.labels_per_class, plot)
    atomic_write_text(out / "report.md", text + "\n")
    atomic_write_text(out / "report.json", json.dumps(result, indent=2, default=str))
    return result, text


def _demo_suite(cfg: Any, out: Path) -> Any:
    """A small benchmark suite: few labels with/without pretraining and pseudo-labels."""
    import dataclasses

    from modalign.benchmark.suite import TaskSpec, load_suite

    corpus, f = out / "corpus", cfg.finetune
    suite = load_suite(
        "demo",
        [
            f"corpora.demo.train={corpus / 'train.jsonl'}",
            f"corpora.demo.test={corpus / 'test.jsonl'}",
            "resamples=500",
        ],
    )
    k, pl = f.labels_per_class, f.pseudo_label
    few = {"shots": [1, k], "heads": [f.head.kind], "pseudo_labels": ["none", pl], "seeds": 1}
    return dataclasses.replace(
        suite,
        finetune={
            "epochs": f.epochs,
            "labels_per_class": k,
            "pseudo_label": pl,
            "head": f.head.kind,
        },
        tasks=[
            TaskSpec("few_label", options=few),
            TaskSpec("scratch", options={"shots": [k], "epochs": 15}),
            TaskSpec("missing_modality"),
        ],
    )


def _value_of_pretraining(cfg: Any, out: Path) -> dict[str, Any]:
    """Labels only from scratch vs pretrained (+ pseudo-labels), and missing-modality accuracy.

    Runs the benchmark suite above into ``out/benchmark`` (figures with 95% bootstrap CIs).
    """
    from modalign.benchmark.run import run_benchmark

    report = run_benchmark(_demo_suite(cfg, out), [cfg.output.dir], out / "benchmark")
    (cell,) = (m["corpora"]["demo"] for m in report["models"].values())
    tasks = {name: t["result"] for name, t in cell["tasks"].items()}
    rows = [
        {
            "setting": "labels only, towers from scratch",
            "shots": r["shots"],
            "accuracy": r["accuracy"],
        }
        for r in tasks["scratch"]["rows"]
    ] + [
        {
            "setting": "pretrained, labels only"
            if r["pseudo_label"] == "none"
            else f"pretrained + {r['pseudo_label']} pseudo-labels",
            "shots": r["shots"],
            "accuracy": r["accuracy"],
        }
        for r in tasks["few_label"]["rows"]
    ]
    return {"rows": rows, "missing_modality": tasks["missing_modality"]["by_subset"]}


def _value_table(value: dict[str, Any]) -> str:
    from modalign.benchmark.task_registry import fmt_figure

    rows = [
        [r["setting"], r["shots"], fmt_figure(r["accuracy"]), r["accuracy"]["n"]]
        for r in value["rows"]
    ]
    rows += [
        [f"missing modality: only {s} present", "", fmt_figure(f), f["n"]]
        for s, f in value["missing_modality"].items()
        if "+" not in s
    ]
    return table(["setting", "labels/class", "test accuracy [95% CI]", "n"], rows)


def _example_searches(model: Any, index: Any, emb: dict) -> list[dict[str, Any]]:
    """A text query, an audio query and an image query against the held-out index."""
    # (modality, query, its digit): the digit comes with the query, no lookup needed.
    queries: list[tuple[str, str, str | None]] = [("text", "the digit seven", "seven")]
    if "audio" in emb:
        queries.append(("audio", emb["audio"].values[0], emb["audio"].labels[0]))
    if "image" in emb:
        queries.append(("image", emb["image"].values[1], emb["image"].labels[1]))
    out = []
    for modality, value, truth in queries:
        vec = model.encode(**{modality: [value]})[modality].numpy()
        target = "image" if modality != "image" else "audio"
        hits = index.search(vec, k=5, targets=[target])[0]
        out.append(
            {
                "query": {modality: value},
                "query_label": truth,
                "target": target,
                "results": [h.to_dict() for h in hits],
            }
        )
    return out


def _report_text(result: dict[str, Any], k: int, plot: Path | None) -> str:
    r = result["retrieval"]
    c = result["classify"]
    lines = [
        "# modalign demo report",
        "",
        f"Held-out split: {r['queries']} items; retrieval is judged at {r['level']} level "
        "(a hit is any item of the same digit).",
        "",
        "## Cross-modal retrieval (held-out)",
        "",
        retrieval_table(r),
        "",
        f"## Few-label classification ({k} labels per class, fused = image+audio)",
        "",
        classify_table({"labels + pseudo-labels": c["fused"], "labels only": c["labels_only"]}),
        "",
        "## What pretraining and pseudo-labels buy (held-out, 95% bootstrap CI)",
        "",
        _value_table(result["value"]),
        "",
        "Full benchmark report: `benchmark/report.md`.",
        "",
        "## Pseudo-labels",
        "",
        table(
            ["round", "method", "coverage", "accuracy", "selected"],
            [
                [
                    p.get("round"),
                    p.get("method"),
                    p.get("coverage"),
                    p.get("accuracy"),
                    p.get("num_selected"),
                ]
                for p in result["pseudo_labels"]
            ],
        ),
        "",
        "## Example searches",
        "",
    ]
    for s in result["searches"]:
        ((modality, value),) = s["query"].items()
        shown = value if modality == "text" else Path(value).name
        labels = ", ".join(str(h.get("label")) for h in s["results"])
        lines.append(
            f"- {modality} `{shown}` (digit {s['query_label']}) -> top-5 {s['target']} labels: {labels}"
        )
    return "\n".join(lines + _closing_lines(result, plot))


def _closing_lines(result: dict[str, Any], plot: Path | None) -> list[str]:
    """Timings, the loss plot and the command that serves the demo's index."""
    timings = [*list(result["timings_s"].items()), ["total", result["wall_s"]]]
    lines = ["", "## Time", "", table(["stage", "seconds"], timings)]
    if plot is not None:
        lines += ["", f"![training loss]({plot.name})"]
    serve = f"Serve the index and open http://127.0.0.1:8000/ :  `{result['serve_command']}`"
    return [*lines, "", "## Browse it", "", serve]
