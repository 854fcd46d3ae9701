"""The top-level API (``modalign.__all__``): every name documented and typed, ``import modalign``
cheap, and each CLI command a thin caller of its function (one code path per job)."""

from __future__ import annotations

import ast
import inspect
import json
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest

import modalign
from modalign.cli import build_parser, main
from modalign.core.errors import UserInputError
from modalign.retrieval import IndexBuildOptions

from helpers.trained import TinyBundle

FUNCTIONS = [n for n in modalign.__all__ if n != "__version__"]


def annotation_names() -> dict[str, Any]:
    """The names ``modalign/__init__``'s ``if TYPE_CHECKING:`` block imports, imported for real
    (so the annotations resolve, and a stale import there fails here)."""
    tree = ast.parse(Path(modalign.__file__).read_text(encoding="utf-8"))
    block = next(
        n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"
    )
    names: dict[str, Any] = {}
    exec(compile(ast.Module(block.body, []), "TYPE_CHECKING", "exec"), names)
    return names


def test_all_names_resolve_with_docstrings_and_type_hints() -> None:
    assert isinstance(modalign.__version__, str)
    assert set(FUNCTIONS) >= {"load", "load_config", "load_classifier", "embed", "build_index",
                              "search", "serve", "run_pretrain", "run_finetune",
                              "run_benchmark", "run_tune"}  # fmt: skip
    namespace = annotation_names()
    for name in FUNCTIONS:
        fn = getattr(modalign, name)
        assert inspect.isfunction(fn) and fn.__module__ == "modalign", name
        assert fn.__doc__ and len(fn.__doc__.strip()) > 40, f"modalign.{name} has no docstring"
        hints = typing.get_type_hints(fn, localns=namespace)  # raises on an unresolvable one
        params = [p for p in inspect.signature(fn).parameters if p not in ("self",)]
        missing = [p for p in params if p not in hints]
        assert not missing and "return" in hints, f"modalign.{name}: untyped {missing}"


def test_import_modalign_is_cheap() -> None:
    """``import modalign`` loads none of the heavy libraries (every function imports lazily)."""
    code = (
        "import sys, modalign; heavy = [m for m in ('torch', 'faiss', 'fastapi', 'numpy', "
        "'transformers') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def index(tiny_bundle: TinyBundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared tiny bundle's corpus, indexed through the API (exact Flat index)."""
    out = tmp_path_factory.mktemp("api-index") / "index"
    res = modalign.build_index(
        out,
        model=tiny_bundle.model,
        data=tiny_bundle.corpus,
        options=IndexBuildOptions(factory="Flat"),
        batch_size=16,
    )
    assert res["out"] == str(out) and set(res["modalities"]) == {"image", "audio", "text"}
    return out


def cli_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> Any:
    code = main([*argv, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    return json.loads(captured.out)


def test_search_cli_and_function_agree(
    index: Path, tiny_bundle: TinyBundle, capsys: pytest.CaptureFixture[str]
) -> None:
    image = str(tiny_bundle.corpus.parent / "img" / "2.png")
    queries = [("text", "the sound two"), ("image", image)]
    hits = modalign.search(index, queries, k=4)
    argv = ["search", "--index", str(index), "-k", "4"]
    cli = cli_json(capsys, [*argv, "--query", "text=the sound two", "--query", f"image={image}"])
    assert [a["results"] for a in cli["queries"]] == [[h.to_dict() for h in q] for q in hits]
    assert [len(q) for q in hits] == [4, 4]
    assert {h.modality for h in hits[0]} <= {"image", "audio"}  # default: the other modalities
    # the same through a loaded model, a mapping, and explicit targets
    model = modalign.load(tiny_bundle.model, device="cpu")
    only_text = modalign.search(index, {"image": image}, k=3, targets=["text"], model=model)
    cli = cli_json(capsys, [*argv[:-1], "3", "--image", image, "--target", "text"])
    assert cli["results"] == [h.to_dict() for h in only_text[0]]
    assert {h.modality for h in only_text[0]} == {"text"}


def test_search_refuses_bad_queries_before_searching(index: Path) -> None:
    with pytest.raises(UserInputError, match="at least one query"):
        modalign.search(index, {})
    with pytest.raises(UserInputError, match="query image=.*file not found"):
        modalign.search(index, [("text", "fine"), ("image", "missing.png")])
    with pytest.raises(UserInputError, match="no 'depth' modality"):
        modalign.search(index, {"depth": "x.npy"})


SPIED = [
    ("search", ["search", "--index", "IDX", "--text", "a red car", "-k", "3"]),
    ("embed", ["embed", "--model", "M", "--data", "D.jsonl", "--out", "E"]),
    ("build_index", ["index", "build", "--model", "M", "--data", "D.jsonl", "--out", "I"]),
    ("add_to_index", ["index", "add", "--index", "I", "--embeddings", "E"]),
    ("serve", ["serve", "--index", "IDX"]),
    ("run_pretrain", ["pretrain", "demo", "--set", "train.steps=1"]),
    ("run_finetune", ["finetune", "demo"]),
    ("run_benchmark", ["benchmark", "demo", "--model", "M"]),
    ("run_tune", ["tune", "demo", "--budget", "2"]),
    ("load_classifier", ["predict", "--model", "C", "--data", "D.jsonl"]),
    ("load_config", ["pretrain", "demo", "--set", "train.steps=1"]),
]


class Called(Exception):
    """Raised by the spy: the command reached the API function (nothing else runs)."""


@pytest.mark.parametrize(("name", "argv"), SPIED, ids=[f"{n}:{a[0]}" for n, a in SPIED])
def test_each_command_calls_its_api_function(
    name: str, argv: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append((args, kwargs))
        raise Called(name)

    monkeypatch.setattr(modalign, name, spy)
    args = build_parser().parse_args(argv)
    with pytest.raises(Called):
        args.func(args)
    assert len(seen) == 1
    if name == "search":
        assert seen[0][0] == ("IDX", [("text", "a red car")]) and seen[0][1]["k"] == 3
    if name == "build_index":
        assert seen[0][0] == ("I",) and seen[0][1]["options"].factory == "auto"


def test_embed_takes_rank_and_device_from_the_launcher(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Under ``accelerate launch``/torchrun (RANK, WORLD_SIZE, LOCAL_RANK set), ``embed`` writes
    its rank's block on ``cuda:LOCAL_RANK``; only rank 0 claims ``out``."""
    import modalign.pretrain
    import modalign.retrieval

    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    loaded: list[tuple[Any, str]] = []
    written: list[dict[str, Any]] = []

    def load_bundle(path: Any, device: str) -> str:
        loaded.append((path, device))
        return "model"

    def write_embedding_shards(model: Any, data: Any, out: Any, **kw: Any) -> dict[str, Any]:
        written.append({"model": model, "data": data, **kw})
        return {"written": 0}

    monkeypatch.setattr(modalign.pretrain, "load_bundle", load_bundle)
    monkeypatch.setattr(modalign.retrieval, "write_embedding_shards", write_embedding_shards)
    assert modalign.embed("M", "D.jsonl", tmp_path / "emb", device="cuda") == {"written": 0}
    assert loaded == [("M", "cuda:1")]
    assert written[0]["model"] == "model" and (written[0]["rank"], written[0]["world_size"]) == (
        1,
        2,
    )
    assert not (tmp_path / "emb").exists()  # rank 1 does not claim (create, lock) the folder
    modalign.embed("M", "D.jsonl", tmp_path / "emb", rank=0, world_size=1)  # explicit wins
    assert (written[1]["rank"], written[1]["world_size"]) == (0, 1)
