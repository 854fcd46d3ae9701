"""ONNX export (issue 23 items 1-2): every tower kind round-trips through onnxruntime.

Each kind is exported from a bundle of small random-init towers (the shipped MiniLM once, in the
shared tiny bundle) and compared with the PyTorch forward on real inputs (demo-corpus digit
images, eSpeak speech and captions; depth maps for the plugin's tower) at batch 1 and 3:
max |diff| <= 1e-4. The numpy reference client reproduces the embeddings from raw files, an
unexportable tower is refused before anything is written, and serving gives the same ids on
both runtimes.
"""

from __future__ import annotations

import ast
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import modalign
from modalign.core.errors import UserInputError
from modalign.data.config import AudioConfig, DataConfig, ImageConfig
from modalign.pretrain import (
    PretrainConfig,
    TowerConfig,
    TowerParts,
    export_bundle,
    read_export_meta,
    save_bundle,
)
from modalign.pretrain.config import ModelConfig
from modalign.pretrain.model import build_encoder

from helpers.trained import TinyBundle

TOL = 1e-4
ROOT = Path(__file__).resolve().parents[2]


# -- inputs ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Any]]:
    """Four demo-corpus items: digit images (PNG), eSpeak speech (WAV, 16 kHz), captions, and
    16x16 depth maps for the plugin's modality."""
    from modalign.data.corpora.demo import build_demo_corpus

    root = tmp_path_factory.mktemp("demo")
    corpus = build_demo_corpus(root / "demo", limit=4, workers=1)
    rows = [json.loads(line) for line in corpus.train.read_text().splitlines()][:4]
    rng = np.random.default_rng(0)
    depth = []
    for i in range(4):
        path = root / f"depth{i}.npy"
        np.save(path, rng.uniform(0, 10, (16, 16)).astype(np.float32))
        depth.append(str(path))
    return {
        "image": [str(corpus.root / r["image"]) for r in rows],
        "audio": [str(corpus.root / r["audio"]) for r in rows],
        "text": [r["text"] for r in rows],
        "depth": depth,
    }


def assert_same(torch_model: Any, onnx_model: Any, modality: str, values: list[Any]) -> float:
    """Embeddings of both runtimes at batch 1 and 3 agree within TOL; returns max |diff|."""
    worst = 0.0
    for n in (1, 3):
        want = torch_model.encode(**{modality: values[:n]})[modality]
        got = onnx_model.encode(**{modality: values[:n]})[modality]
        assert got.shape == want.shape == (n, torch_model.embed_dim)
        worst = max(worst, float((got - want).abs().max()))
    assert worst <= TOL, f"{modality}: max |diff| {worst:.3g}"
    return worst


# -- tiny random-init models of every library --------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small transformers BERT / ViT / wav2vec2 directories and an open_clip checkpoint."""
    import open_clip
    from transformers import (
        BertConfig,
        BertModel,
        BertTokenizerFast,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
        Wav2Vec2Config,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2Model,
    )

    root = tmp_path_factory.mktemp("onnx-models")
    torch.manual_seed(0)
    bert = root / "bert"
    bert.mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "digit", "a", "one", "zero"]
    (bert / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(bert / "vocab.txt")).save_pretrained(bert)
    small = {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 37}
    BertModel(BertConfig(vocab_size=len(words), num_hidden_layers=2, **small)).save_pretrained(bert)
    vit = root / "vit"
    ViTModel(ViTConfig(num_hidden_layers=1, image_size=32, patch_size=8, **small)).save_pretrained(
        vit
    )
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(vit)
    w2v = root / "w2v"
    Wav2Vec2Model(
        Wav2Vec2Config(
            num_hidden_layers=1,
            conv_dim=(16, 16),
            conv_stride=(5, 4),
            conv_kernel=(10, 4),
            num_feat_extract_layers=2,
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=2,
            **small,
        )
    ).save_pretrained(w2v)
    Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True).save_pretrained(w2v)
    clip_cfg = root / "tiny-clip-onnx.json"
    clip_cfg.write_text(
        json.dumps(
            {
                "embed_dim": 16,
                "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                               "head_width": 16},
                "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2,
                             "layers": 1},
            }
        )
    )  # fmt: skip
    open_clip.add_model_config(str(clip_cfg))
    ckpt = root / "clip.pt"
    torch.save({"state_dict": open_clip.create_model("tiny-clip-onnx").state_dict()}, ckpt)
    return {"bert": bert, "vit": vit, "w2v": w2v, "clip_cfg": clip_cfg, "clip": ckpt}


DATA = DataConfig(
    image=ImageConfig(channels=3),
    audio=AudioConfig(sample_rate=16000, clip_seconds=0.25, n_mels=16, n_fft=256, hop_length=128),
    modalities={"depth": {"side": 16}},
)
COMPANION = {  # a cheap second tower (a bundle aligns two modalities); not exported
    "image": ("audio", TowerConfig(kind="timm_audio", arch="test_resnet")),
    "audio": ("image", TowerConfig(kind="timm_image", arch="test_resnet", input_size=32)),
    "text": ("image", TowerConfig(kind="timm_image", arch="test_resnet", input_size=32)),
    "depth": ("image", TowerConfig(kind="timm_image", arch="test_resnet", input_size=32)),
}


def _clip(part: str) -> Callable[[dict[str, Path]], TowerConfig]:
    return lambda m: TowerConfig(
        kind="open_clip", arch=str(m["clip_cfg"]), weights=str(m["clip"]), options={"part": part}
    )


# timm_image, timm_audio and sentence_transformer (the shipped MiniLM): the shared tiny bundle.
KINDS: dict[str, tuple[str, Callable[[dict[str, Path]], TowerConfig]]] = {
    "hf_text": ("text", lambda m: TowerConfig(kind="hf_text", arch=str(m["bert"]))),
    "hf_vision": ("image", lambda m: TowerConfig(kind="hf_vision", arch=str(m["vit"]))),
    "hf_audio": ("audio", lambda m: TowerConfig(kind="hf_audio", arch=str(m["w2v"]))),
    "open_clip_image": ("image", _clip("image")),
    "open_clip_text": ("text", _clip("text")),
    "depth_cnn (plugin)": ("depth", lambda m: TowerConfig(kind="depth_cnn")),
}


def make_bundle(out: Path, modality: str, tower: TowerConfig, **builders: Any) -> Path:
    """A random-init bundle: ``tower`` for ``modality`` plus its cheap companion."""
    other, companion = COMPANION[modality]
    model = ModelConfig(
        modalities=[modality, other], embed_dim=8, towers={modality: tower, other: companion}
    )
    cfg = PretrainConfig(data=DATA, model=model)
    torch.manual_seed(0)
    encoder = build_encoder(cfg.model, cfg.data, builders or None).encoder
    return save_bundle(out, encoder, cfg)


@pytest.mark.slow  # exports graphs (torch.export + onnxscript: seconds each)
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_tower_kind_matches_pytorch_in_onnxruntime(kind, models, demo, tmp_path) -> None:
    modality, tower = KINDS[kind]
    bundle = make_bundle(tmp_path / "model", modality, tower(models))
    out = export_bundle(bundle, tmp_path / "onnx", "onnx", {"modalities": [modality]})
    meta = read_export_meta(out, "onnx")
    graph = meta["graphs"][modality]
    assert list(meta["graphs"]) == [modality] and (out / graph["file"]).is_file()
    assert all(i["shape"][0] == "batch" for i in graph["inputs"])  # dynamic batch axis
    assert graph["output"]["shape"] == ["batch", 8] and graph["max_abs_diff"] <= TOL
    torch_model = modalign.load(bundle, device="cpu")
    onnx_model = modalign.load(out, device="cpu", runtime="onnx")
    assert onnx_model.fingerprint == torch_model.fingerprint
    assert_same(torch_model, onnx_model, modality, demo[modality])


# -- the shipped MiniLM (shared tiny bundle: timm image + audio + sentence-transformers) ---------
@pytest.fixture(scope="module")
def shipped(tiny_bundle: TinyBundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared bundle exported by the CLI: ``modalign export --format onnx``."""
    from modalign.cli import main

    out = tmp_path_factory.mktemp("shipped") / "onnx"
    code = main(
        ["export", "--model", str(tiny_bundle.model), "--format", "onnx", "--out", str(out)]
    )
    assert code == 0
    return out


@pytest.mark.slow  # exports graphs (torch.export + onnxscript: seconds each)
def test_shipped_minilm_matches_pytorch_and_states_its_inputs(
    shipped: Path, tiny_bundle: TinyBundle, demo
) -> None:
    meta = read_export_meta(shipped, "onnx")
    text = meta["graphs"]["text"]
    assert text["tower"]["kind"] == "sentence_transformer"
    assert [i["name"] for i in text["inputs"]] == list(text["feed"]["outputs"])
    assert (shipped / text["feed"]["file"]).is_file() and text["feed"]["max_length"] == 256
    image = meta["graphs"]["image"]["preprocessing"]
    assert image["center_crop"] == 16 and image["interpolation"] and image["channels"] == 1
    audio = meta["graphs"]["audio"]
    assert audio["front_end"]["in_graph"] and audio["front_end"]["mel"]["n_mels"] == 16
    assert audio["preprocessing"]["sample_rate"] == 8000
    torch_model = modalign.load(tiny_bundle.model, device="cpu")
    onnx_model = modalign.load(shipped, device="cpu", runtime="onnx")
    for modality in ("image", "audio", "text"):
        assert_same(torch_model, onnx_model, modality, demo[modality])


def _client_module() -> Any:
    path = ROOT / "scripts" / "onnx_client.py"
    imported = {
        (n.module or "").split(".")[0] if isinstance(n, ast.ImportFrom) else a.name.split(".")[0]
        for n in ast.walk(ast.parse(path.read_text()))
        if isinstance(n, ast.Import | ast.ImportFrom)
        for a in n.names
    }
    assert not imported & {"torch", "modalign", "transformers", "timm"}, imported
    spec = importlib.util.spec_from_file_location("onnx_client", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # exports graphs (torch.export + onnxscript: seconds each)
def test_numpy_client_reproduces_embeddings_from_raw_files(
    shipped: Path, tiny_bundle: TinyBundle
) -> None:
    client = _client_module().OnnxClient(shipped)
    rows = [json.loads(line) for line in tiny_bundle.corpus.read_text().splitlines()][:3]
    raw = {
        "image": [str(tiny_bundle.corpus.parent / r["image"]) for r in rows],
        "audio": [str(tiny_bundle.corpus.parent / r["audio"]) for r in rows],  # 8 kHz WAV
        "text": [r["text"] for r in rows],
    }
    torch_model = modalign.load(tiny_bundle.model, device="cpu")
    for modality, values in raw.items():
        want = torch_model.encode(**{modality: values})[modality].numpy()
        got = client.embed(modality, values)
        assert np.abs(got - want).max() <= TOL, modality


@pytest.mark.slow  # exports graphs (torch.export + onnxscript: seconds each)
def test_served_ids_are_the_same_on_both_runtimes(shipped: Path, tiny_bundle: TinyBundle) -> None:
    import httpx

    from modalign.retrieval.embed import embed_source
    from modalign.retrieval.index.corpus import build_corpus_index
    from modalign.server.app import create_app
    from modalign.server.searcher import Searcher

    from helpers.serve import ThreadedServer

    torch_model = modalign.load(tiny_bundle.model, device="cpu")
    emb, _ = embed_source(torch_model, tiny_bundle.corpus, batch_size=16)
    index = shipped.parent / "index"
    build_corpus_index(emb, index, torch_model.fingerprint, str(tiny_bundle.model))
    rows = [json.loads(line) for line in tiny_bundle.corpus.read_text().splitlines()]
    texts = [r["text"] for r in rows[:4]] + ["the sound", "zero one two"]
    files = [("image", rows[1]["image"]), ("audio", rows[2]["audio"])]
    ids: dict[str, list[list[str]]] = {}
    for runtime, model_dir in (("torch", None), ("onnx", shipped)):
        searcher = Searcher.open(index, model_dir, runtime=runtime, threads=1)
        if runtime == "onnx":  # serve's --torch-threads is also ONNX Runtime's intra-op threads
            sessions = searcher.model.sessions.values()
            assert {s.get_session_options().intra_op_num_threads for s in sessions} == {1}
        with ThreadedServer(create_app(searcher)) as srv, httpx.Client(base_url=srv.url) as c:
            served = [c.post("/search", json={"text": t, "k": 6}).json() for t in texts]
        ids[runtime] = [[h["id"] for h in body["results"]] for body in served]
        for m, rel in files:  # uploads: decode -> encode -> search, the server's own path
            raw = (tiny_bundle.corpus.parent / rel).read_bytes()
            vec = searcher.encode(m, [searcher.decode(m, raw)])
            ids[runtime].append([h.id for h in searcher.index.search(vec, k=6)[0]])
    assert len(ids["torch"]) == 8 and all(len(x) == 6 for x in ids["torch"])
    assert ids["onnx"] == ids["torch"]


@pytest.mark.slow  # exports graphs (torch.export + onnxscript: seconds each)
def test_onnx_runtime_refuses_a_bundle_dir_and_normalize_false(
    shipped: Path, tiny_bundle: TinyBundle
) -> None:
    with pytest.raises(UserInputError, match="not an ONNX export") as info:
        modalign.load(tiny_bundle.model, device="cpu", runtime="onnx")
    assert info.value.exit_code == 2
    model = modalign.load(shipped, device="cpu", runtime="onnx")
    with pytest.raises(UserInputError, match="normalize=False"):
        model.encode(text=["x"], normalize=False)


# -- refusals ------------------------------------------------------------------------------------
class _Spectral(nn.Module):
    """A trunk whose forward uses an SVD (aten._linalg_svd: no ONNX translation)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).flatten(2)
        return torch.linalg.svdvals(h)


def _spectral_tower(cfg: TowerConfig, data_cfg: DataConfig) -> TowerParts:
    return TowerParts(nn.Identity(), _Spectral(), 4)


@pytest.mark.slow  # exports graphs (torch.export + onnxscript: seconds each)
def test_unexportable_tower_is_refused_naming_it_before_anything_is_written(
    tmp_path: Path,
) -> None:
    bundle = make_bundle(
        tmp_path / "model",
        "image",
        TowerConfig(kind="spectral_test", input_size=32),
        spectral_test=_spectral_tower,
    )
    out = tmp_path / "onnx"
    with pytest.raises(UserInputError, match=r"'image'.*spectral_test.*aten\._linalg_svd") as info:
        export_bundle(bundle, out, "onnx", tower_builders={"spectral_test": _spectral_tower})
    assert info.value.exit_code == 2
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.slow  # exports graphs (torch.export + onnxscript: seconds each)
def test_export_above_tolerance_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    tower = TowerConfig(kind="timm_image", arch="test_resnet", input_size=32)
    bundle = make_bundle(tmp_path / "model", "image", tower)
    out = tmp_path / "onnx"
    with pytest.raises(UserInputError, match=r"'image'.*max \|diff\|.*> atol 1e-30") as info:
        export_bundle(bundle, out, "onnx", {"modalities": ["image"], "atol": 1e-30})
    assert info.value.exit_code == 2 and not out.exists()


def test_export_refuses_a_folder_of_other_files(tiny_bundle: TinyBundle, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(UserInputError, match="not a modalign model export"):
        export_bundle(tiny_bundle.model, out, "onnx")
    assert (out / "notes.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1


def test_serve_flag_runtime_reaches_modalign_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    from modalign.cli import main

    seen: dict[str, Any] = {}
    monkeypatch.setattr(modalign, "serve", lambda *a, **kw: seen.update(kw))
    assert main(["serve", "--index", "idx", "--model", "exp", "--runtime", "onnx"]) == 0
    assert seen["runtime"] == "onnx"


def test_serve_threads_are_both_runtimes_intra_op_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    from modalign.server import app
    from modalign.server.searcher import Searcher

    opened: dict[str, Any] = {}

    def fake_open(*args: Any, **kw: Any) -> Any:
        opened.update(kw)
        return SimpleNamespace(target_modalities=["image"])

    monkeypatch.setattr(Searcher, "open", fake_open)
    monkeypatch.setattr(app, "serve", lambda searcher, settings, **kw: opened.update(run=kw))
    modalign.serve("idx", "exp", runtime="onnx", torch_threads=3)
    assert opened["threads"] == 3 and opened["run"]["torch_threads"] == 3


def test_onnx_providers_cpu_by_default_and_cuda_needs_the_gpu_extra() -> None:
    import onnxruntime as ort

    from modalign.pretrain.export.runtime import providers_for

    assert providers_for("cpu") == ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert providers_for("cuda")[0] == "CUDAExecutionProvider"
    else:
        assert providers_for("auto") == ["CPUExecutionProvider"]
        with pytest.raises(UserInputError, match=r"modalign\[gpu\]"):
            providers_for("cuda")
