"""Peer formats (issue 23 item 4): a bundle as an open_clip checkpoint + config and as a
sentence-transformers directory, loaded back through the real libraries with the bundle's own
embeddings (max |diff| <= 1e-4) on demo-corpus images and captions; towers that do not fit get
an error naming the format that does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from modalign.cli import main
from modalign.config import load_config
from modalign.core.errors import UserInputError
from modalign.pretrain import load_bundle, read_card, save_bundle
from modalign.pretrain.export import export_bundle, read_export_meta
from modalign.pretrain.model import build_encoder

TOL = 1e-4
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
IMAGE = ["model.towers.image.arch=test_resnet", "model.towers.image.input_size=16"]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max())


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[str]]:
    """Real inputs: the first demo-corpus images and captions."""
    from modalign.data.corpora.demo import build_demo_corpus

    corpus = build_demo_corpus(tmp_path_factory.mktemp("demo") / "c", limit=5, workers=1)
    lines = (corpus.train.read_text() + corpus.test.read_text()).splitlines()
    rows = [json.loads(line) for line in lines]
    return [corpus.root / r["image"] for r in rows], [r["text"] for r in rows]


def _bundle(root: Path, sets: list[str], embed_dim: int = 12, seed: int = 5) -> Path:
    """A bundle of randomly initialised towers and heads (biases non-zero), no training."""
    cfg = load_config(
        None, ["model.modalities=[image,text]", f"model.embed_dim={embed_dim}", *sets]
    )
    torch.manual_seed(seed)
    enc = build_encoder(cfg.model, cfg.data).encoder
    with torch.no_grad():
        for head in enc.heads.values():
            for p in head.parameters():
                p.normal_(0, 0.3)
    save_bundle(root, enc, cfg)
    return root


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    import open_clip

    root = tmp_path_factory.mktemp("clip")
    cfg_path = root / "tiny-clip-peers.json"
    cfg_path.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(str(cfg_path))
    torch.manual_seed(2)
    model = open_clip.create_model("tiny-clip-peers").eval()
    ckpt = root / "tiny.pt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    return cfg_path, ckpt


def _clip_sets(cfg_path: Path, ckpt: Path, lock: str = "none", head: str = "linear") -> list[str]:
    return [
        f"model.towers.{m}.{k}={v}"
        for m in ("image", "text")
        for k, v in (("kind", "open_clip"), ("arch", cfg_path), ("weights", ckpt),
                     ("options", f"{{part: {m}}}"), ("lock", lock), ("head", head))
    ]  # fmt: skip


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT (transformers save_pretrained) with a vocabulary of demo words."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("bert")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "digit", "zero", "one", "two",
             "three", "written", "by", "hand", "a", "photo", "of"]  # fmt: skip
    (root / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(root / "vocab.txt")).save_pretrained(root)
    torch.manual_seed(3)
    cfg = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=37, max_position_embeddings=64)  # fmt: skip
    BertModel(cfg).eval().save_pretrained(root)
    return root


def test_open_clip_checkpoint_loads_in_open_clip_with_the_same_embeddings(
    tiny_clip, demo, tmp_path: Path
) -> None:
    import open_clip

    images, texts = demo
    bundle = _bundle(tmp_path / "b", _clip_sets(*tiny_clip))  # trained (stored) open_clip halves
    out = export_bundle(bundle, tmp_path / "oc", "open_clip")
    meta = read_export_meta(out, "open_clip")["open_clip"]
    ours = load_bundle(bundle)
    want = ours.encode(image=[str(p) for p in images], text=texts)
    # 1) local-dir: config + checkpoint found by open_clip itself
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tok = open_clip.get_tokenizer(f"local-dir:{out}")
    # open_clip's own preprocessing (the bundle's preset) on the demo PNGs: no modalign involved
    x = torch.stack([preprocess(Image.open(p)) for p in images])
    # 2) a model config JSON registered by name + pretrained=PATH
    open_clip.add_model_config(str(out / meta["config"]))
    named, _, _ = open_clip.create_model_and_transforms(
        meta["model_name"], pretrained=str(out / meta["checkpoint"])
    )
    with torch.no_grad():
        for m in (model.eval(), named.eval()):
            assert _max_diff(m.encode_image(x, normalize=True), want["image"]) <= TOL
            assert _max_diff(m.encode_text(tok(texts), normalize=True), want["text"]) <= TOL
    assert model.logit_scale.exp().item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert meta["probe_max_abs_diff"]["image"] <= TOL
    # open_clip_torch only loads this checkpoint: its code licence is not the weights' one
    card = read_card(bundle)
    assert card["modalign"]["towers"]["image"]["license"] == "unknown"
    assert "license" not in card  # no claim while a base tower's licence is unknown


def test_open_clip_export_refuses_what_it_cannot_fold(tiny_clip, tmp_path: Path) -> None:
    cfg_path, ckpt = tiny_clip
    wide = _bundle(tmp_path / "wide", _clip_sets(cfg_path, ckpt, "all"), embed_dim=24)
    with pytest.raises(UserInputError, match=r"bias cannot be folded.*export --format onnx"):
        export_bundle(wide, tmp_path / "x1", "open_clip")
    mlp = _bundle(tmp_path / "mlp", _clip_sets(cfg_path, ckpt, "all", head="mlp"))
    with pytest.raises(UserInputError, match=r"'mlp' projection head.*--format onnx"):
        export_bundle(mlp, tmp_path / "x2", "open_clip")
    assert not (tmp_path / "x1").exists() and not (tmp_path / "x2").exists()


def test_sentence_transformers_dir_of_a_transformers_tower_with_mlp_head(
    bert_dir: Path, demo, tmp_path: Path
) -> None:
    from sentence_transformers import SentenceTransformer

    _, texts = demo
    sets = [*IMAGE, "model.towers.text.kind=hf_text", f"model.towers.text.arch={bert_dir}",
            "model.towers.text.head=mlp", "model.towers.text.options={max_length: 8}"]  # fmt: skip
    bundle = _bundle(tmp_path / "b", sets)
    out = export_bundle(bundle, tmp_path / "st", "sentence_transformers")
    st = SentenceTransformer(str(out), device="cpu")
    assert [type(m).__name__ for m in st] == ["Transformer", "Pooling", "Dense", "Dense",
                                              "Normalize"]  # fmt: skip
    long = ["the digit zero written by hand " * 4]  # truncated at max_length like the tower
    want = load_bundle(bundle).encode(text=texts + long)["text"]
    assert _max_diff(st.encode(texts + long, convert_to_tensor=True), want) <= TOL
    # pooling modes sentence-transformers has no module for are refused naming onnx
    plain = _bundle(tmp_path / "p", [*sets[:-1], "model.towers.text.options={pooling: mean}"])
    with pytest.raises(UserInputError, match=r"pooling='mean'.*--format onnx"):
        export_bundle(plain, tmp_path / "st2", "sentence_transformers")
    lora = _bundle(tmp_path / "l", [*sets, "model.towers.text.lock=none",
                                     "model.towers.text.adapter={kind: lora}"])  # fmt: skip
    with pytest.raises(UserInputError, match=r"'lora' adapter.*--format bundle --merge"):
        export_bundle(lora, tmp_path / "st3", "sentence_transformers")


def test_sentence_transformers_dir_of_the_shipped_minilm(demo, tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    _, texts = demo
    bundle = _bundle(tmp_path / "b", IMAGE)  # text: the packaged MiniLM, frozen, linear head
    out = tmp_path / "st"
    argv = [
        "export",
        "--model",
        str(bundle),
        "--format",
        "sentence_transformers",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    st = SentenceTransformer(str(out), device="cpu")
    assert [type(m).__name__ for m in st][-2:] == ["Dense", "Normalize"]
    assert st.get_embedding_dimension() == 12
    want = load_bundle(bundle).encode(text=texts)["text"]
    assert _max_diff(st.encode(texts, convert_to_tensor=True), want) <= TOL
    # the bundle's model card names the MiniLM weights' own licence (their model card's)
    text = read_card(bundle)["modalign"]["towers"]["text"]
    assert text["source"] == "package" and text["license"] == "apache-2.0"
    assert read_card(bundle)["license"] == "apache-2.0"  # the image tower is from scratch


def test_towers_that_do_not_fit_name_the_format_that_does(
    tiny_clip, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg_path, ckpt = tiny_clip
    clip = _bundle(tmp_path / "clip", _clip_sets(cfg_path, ckpt, "all"))
    with pytest.raises(UserInputError, match=r"'text' tower is open_clip.*--format open_clip"):
        export_bundle(clip, tmp_path / "x", "sentence_transformers")
    timm_image = _bundle(tmp_path / "timm", [*IMAGE, *_clip_sets(cfg_path, ckpt, "all")[6:]])
    with pytest.raises(UserInputError, match=r"'image' tower is timm_image.*--format onnx"):
        export_bundle(timm_image, tmp_path / "x", "open_clip")
    argv = ["export", "--model", str(clip), "--format", "open_clip", "--out", str(tmp_path / "x"),
            "--option", "image=depth"]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 2  # a usage error, before anything is written
    assert "no 'depth' tower" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
