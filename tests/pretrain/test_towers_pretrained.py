"""Pretrained towers: each library's own save format in, the library's own forward out (1e-5).

Tiny random-init models are saved the way each library saves them (timm state dict,
open_clip checkpoint of a custom model config, transformers ``save_pretrained``,
sentence-transformers ``save``), loaded through modalign's tower registry, and the trunk output
is compared with the source library's forward on the same input.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from modalign.core.errors import ConfigError, UserInputError
from modalign.data.config import AudioConfig, DataConfig, ImageConfig
from modalign.pretrain import TowerConfig
from modalign.pretrain.towers import build_tower

from helpers.corpus import tiny_overrides, write_tiny_corpus

RGB = DataConfig(image=ImageConfig(channels=3))
GREY = DataConfig(image=ImageConfig(channels=1))
TOL = {"atol": 1e-5, "rtol": 1e-5}


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, **TOL)


@pytest.fixture(scope="module")
def rgb_resnet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A random 3-channel ``test_resnet`` with a 10-class head, saved as a timm state dict."""
    torch.manual_seed(0)
    src = timm.create_model("test_resnet", num_classes=10).eval()
    path = tmp_path_factory.mktemp("timm") / "rgb.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    return path, src


def test_timm_state_dict_equals_timm_forward(rgb_resnet) -> None:
    path, src = rgb_resnet
    cfg = TowerConfig(kind="timm_image", arch="test_resnet", weights=str(path), input_size=32)
    parts = build_tower("image", cfg, RGB)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = src.forward_head(src.forward_features(x), pre_logits=True)
        close(parts.trunk.eval()(x), want)
    assert parts.external is not None and len(next(iter(parts.external.files.values()))) == 64


def test_rgb_weights_into_one_channel_tower_equal_timms_own_adaptation(rgb_resnet) -> None:
    path, _ = rgb_resnet
    cfg = TowerConfig(kind="timm_image", arch="test_resnet", weights=str(path), in_chans=1)
    trunk = build_tower("image", cfg, GREY).trunk.eval()
    ref = timm.create_model(
        "test_resnet",
        pretrained=True,
        pretrained_cfg_overlay={"file": str(path)},
        in_chans=1,
        num_classes=0,
    ).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        close(trunk(x), ref(x))
    rgb = load_file(str(path))["conv1.0.weight"]
    close(trunk.conv1[0].weight, rgb.sum(dim=1, keepdim=True))  # timm sums the RGB kernels


def test_timm_preset_comes_from_pretrained_config_unless_overridden(rgb_resnet) -> None:
    path, _ = rgb_resnet
    dc = timm.create_model("test_resnet").pretrained_cfg
    parts = build_tower("image", TowerConfig(arch="test_resnet", weights=str(path)), RGB)
    assert parts.input_preset.input_size == dc["input_size"][-1]
    assert parts.input_preset.mean == tuple(dc["mean"])
    cfg = TowerConfig(arch="test_resnet", input_size=48, options={"mean": [0.5] * 3})
    preset = build_tower("image", cfg, RGB).input_preset
    assert preset.input_size == 48 and preset.mean == (0.5, 0.5, 0.5)


def test_vit_position_embeddings_resampled_by_timm(tmp_path: Path) -> None:
    torch.manual_seed(1)
    src = timm.create_model("test_vit", num_classes=0)
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    cfg = TowerConfig(arch="test_vit", weights=str(path), options={"img_size": 64})
    trunk = build_tower("image", cfg, RGB).trunk.eval()
    ref = timm.create_model(
        "test_vit",
        pretrained=True,
        pretrained_cfg_overlay={"file": str(path)},
        num_classes=0,
        img_size=64,
    ).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        close(trunk(x), ref(x))


def test_in_chans_conflicting_with_data_channels_is_exit_2() -> None:
    with pytest.raises(ConfigError, match="in_chans=3.*data.image.channels=1") as info:
        build_tower("image", TowerConfig(arch="test_resnet", in_chans=3), GREY)
    assert info.value.exit_code == 2


@pytest.mark.parametrize("edit", ["missing", "extra"])
def test_checkpoint_with_missing_or_extra_key_names_it(rgb_resnet, tmp_path: Path, edit) -> None:
    path, _ = rgb_resnet
    state = load_file(str(path))
    if edit == "missing":
        del state["layer1.0.conv1.weight"]
        name = "layer1.0.conv1.weight"
    else:
        state["stray.weight"] = torch.zeros(2)
        name = "stray.weight"
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))
    cfg = TowerConfig(arch="test_resnet", weights=str(bad))
    with pytest.raises(ConfigError, match=name) as info:
        build_tower("image", cfg, RGB)
    assert str(bad) in str(info.value) and info.value.exit_code == 2


def test_cli_pretrain_with_bad_weights_exits_2_naming_the_key(tmp_path: Path, capsys) -> None:
    from modalign.cli import main

    torch.manual_seed(0)
    state = timm.create_model("test_resnet", num_classes=0, in_chans=1).state_dict()
    state = {k: v.contiguous() for k, v in state.items() if k != "conv1.0.weight"}
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))
    manifest = write_tiny_corpus(tmp_path / "corpus", n=8)
    sets = [*tiny_overrides(manifest, tmp_path / "run"), f"model.towers.image.weights={bad}"]
    assert main(["pretrain", "demo", "--set", *sets]) == 2
    err = capsys.readouterr().err
    assert "conv1.0.weight" in err and "bad.safetensors" in err


def test_frozen_timm_tower_runs_one_forward_per_distinct_input(rgb_resnet) -> None:
    path, src = rgb_resnet
    cfg = TowerConfig(arch="test_resnet", weights=str(path), lock="all")
    parts = build_tower("image", cfg, RGB)
    assert parts.cache_outputs
    trunk = parts.trunk.eval()
    x = torch.randn(4, 3, 32, 32)
    first = trunk(x)
    again = trunk(torch.cat([x[2:], x[:2]]))
    assert trunk.misses == 4 and trunk.hits == 4
    close(again, torch.cat([first[2:], first[:2]]))
    with torch.no_grad():
        close(first, src.forward_head(src.forward_features(x), pre_logits=True))


def test_hub_ids_are_refused_naming_the_key() -> None:
    cfg = TowerConfig(kind="hf_text", arch="bert-base/uncased-nope")
    with pytest.raises(ConfigError, match=r"arch.*hub id.*never downloads"):
        build_tower("text", cfg, RGB)
    cfg = TowerConfig(kind="open_clip", arch="hf-hub:laion/whatever")
    with pytest.raises(ConfigError, match="never downloads"):
        build_tower("image", cfg, RGB)


# -- open_clip -------------------------------------------------------------------------------
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory):
    import open_clip

    root = tmp_path_factory.mktemp("clip")
    cfg_path = root / "tiny-clip-test.json"
    cfg_path.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(str(cfg_path))
    torch.manual_seed(2)
    model = open_clip.create_model("tiny-clip-test").eval()
    ckpt = root / "tiny.pt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    return cfg_path, ckpt, model


def test_open_clip_image_and_text_equal_open_clip_forward(tiny_clip) -> None:
    import open_clip

    cfg_path, ckpt, model = tiny_clip
    base = {"kind": "open_clip", "arch": str(cfg_path), "weights": str(ckpt), "lock": "all"}
    image = build_tower("image", TowerConfig(**base, options={"part": "image"}), RGB)
    text = build_tower("text", TowerConfig(**base, options={"part": "text"}), RGB)
    assert image.input_preset.input_size == 32 and image.out_dim == 16 == text.out_dim
    x = torch.randn(2, 3, 32, 32)
    words = ["a photo of a cat", "the sound of a dog"]
    tok = open_clip.get_tokenizer("tiny-clip-test")
    with torch.no_grad():
        close(image.trunk.eval()(x), model.encode_image(x))
        close(text.trunk.eval()(words), model.encode_text(tok(words)))
    assert text.external.package == "open_clip_torch" and "tiny.pt" in text.external.files


def test_open_clip_checkpoint_with_extra_key_is_exit_2(tiny_clip, tmp_path: Path) -> None:
    cfg_path, _, model = tiny_clip
    state = dict(model.state_dict(), **{"visual.stray": torch.zeros(1)})
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    cfg = TowerConfig(kind="open_clip", arch=str(cfg_path), weights=str(bad))
    with pytest.raises(ConfigError, match="visual.stray"):
        build_tower("image", cfg, RGB)


# -- transformers ----------------------------------------------------------------------------
def _save_bert(root: Path) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat", "dog"]
    (root / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(root / "vocab.txt")).save_pretrained(root)
    torch.manual_seed(3)
    cfg = BertConfig(
        vocab_size=len(words),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    BertModel(cfg).eval().save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_bert(tmp_path_factory.mktemp("bert") / "bert")


def test_hf_text_masked_mean_equals_transformers_forward(bert_dir: Path) -> None:
    from transformers import AutoModel, AutoTokenizer

    parts = build_tower("text", TowerConfig(kind="hf_text", arch=str(bert_dir)), RGB)
    model = AutoModel.from_pretrained(bert_dir).eval()
    tok = AutoTokenizer.from_pretrained(bert_dir)
    words = ["a photo of a cat", "dog"]
    t = tok(words, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**t).last_hidden_state
        m = t["attention_mask"].unsqueeze(-1).float()
        close(parts.trunk.eval()(words), (h * m).sum(1) / m.sum(1))
    assert len(parts.groups()) == 3  # embeddings (+pooler), layer 0, layer 1


def test_hf_checkpoint_missing_a_key_is_exit_2(tmp_path: Path) -> None:
    root = _save_bert(tmp_path / "bert")
    state = load_file(str(root / "model.safetensors"))
    name = next(k for k in state if "encoder.layer.1.output.dense.weight" in k)
    del state[name]
    save_file(state, str(root / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="encoder.layer.1.output.dense.weight"):
        build_tower("text", TowerConfig(kind="hf_text", arch=str(root)), RGB)


def test_sentence_transformer_save_equals_its_own_forward(bert_dir: Path, tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer, models

    st = SentenceTransformer(
        modules=[models.Transformer(str(bert_dir)), models.Pooling(32, "mean")], device="cpu"
    )
    st.save(str(tmp_path / "st"))
    cfg = TowerConfig(kind="sentence_transformer", arch=str(tmp_path / "st"), lock="all")
    parts = build_tower("text", cfg, RGB)
    words = ["a photo of a cat", "dog"]
    want = torch.as_tensor(st.encode(words, convert_to_numpy=True))
    with torch.no_grad():
        close(parts.trunk(words), want)


def test_hf_vision_cls_equals_transformers_forward(tmp_path: Path) -> None:
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(4)
    cfg = ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        image_size=32,
        patch_size=8,
    )
    model = ViTModel(cfg).eval()
    model.save_pretrained(tmp_path / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "vit")
    parts = build_tower("image", TowerConfig(kind="hf_vision", arch=str(tmp_path / "vit")), RGB)
    assert parts.input_preset.input_size == 32 and parts.input_preset.mean == (0.5, 0.5, 0.5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        close(parts.trunk.eval()(x), model(pixel_values=x).last_hidden_state[:, 0])


@pytest.fixture(scope="module")
def w2v_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    root = tmp_path_factory.mktemp("w2v") / "w2v"
    torch.manual_seed(5)
    cfg = Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        conv_dim=(16, 16),
        conv_stride=(5, 4),
        conv_kernel=(10, 4),
        num_feat_extract_layers=2,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
    )
    model = Wav2Vec2Model(cfg).eval()
    model.save_pretrained(root)
    Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True).save_pretrained(root)
    return root, model


def test_hf_audio_mean_equals_transformers_forward(w2v_dir) -> None:
    from transformers import AutoFeatureExtractor

    root, model = w2v_dir
    data = DataConfig(audio=AudioConfig(sample_rate=16000, clip_seconds=0.1))
    parts = build_tower("audio", TowerConfig(kind="hf_audio", arch=str(root)), data)
    wave = torch.randn(2, 1600)
    fe = AutoFeatureExtractor.from_pretrained(root)
    feats = fe(list(wave.numpy()), sampling_rate=16000, return_tensors="pt", padding=True)
    with torch.no_grad():
        want = model(input_values=feats["input_values"]).last_hidden_state.mean(1)
        close(parts.trunk.eval()(wave), want)


def test_hf_audio_resamples_to_the_extractor_rate(w2v_dir) -> None:
    from scipy.signal import resample_poly

    root, model = w2v_dir
    data = DataConfig(audio=AudioConfig(sample_rate=8000, clip_seconds=0.1))
    trunk = build_tower("audio", TowerConfig(kind="hf_audio", arch=str(root)), data).trunk.eval()
    wave = torch.randn(1, 800)
    up = resample_poly(wave.numpy(), 2, 1, axis=-1).astype(np.float32)
    assert up.shape[-1] == 1600
    x = torch.as_tensor(up)
    x = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7)
    with torch.no_grad():
        close(trunk(wave), model(input_values=x).last_hidden_state.mean(1))


# -- bundles ---------------------------------------------------------------------------------
def _bundle_with_image_weights(tmp_path: Path, weights: Path, lock: str) -> Path:
    from modalign.config import load_config
    from modalign.pretrain.trainer import pretrain

    manifest = write_tiny_corpus(tmp_path / "corpus", n=8)
    out = tmp_path / f"model-{lock}"
    sets = [*tiny_overrides(manifest, out, steps=1, batch=8), "model.modalities=[image,audio]",
            f"model.towers.image.weights={weights}", f"model.towers.image.lock={lock}",
            "train.checkpoint_every=0"]  # fmt: skip
    pretrain(load_config(None, sets))
    return out


def test_bundle_records_timm_weights_and_refuses_changed_ones(tmp_path: Path) -> None:
    import modalign

    torch.manual_seed(0)
    src = timm.create_model("test_resnet", num_classes=0, in_chans=1)
    weights = tmp_path / "init.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(weights))
    frozen = _bundle_with_image_weights(tmp_path, weights, "all")
    trained = _bundle_with_image_weights(tmp_path, weights, "none")
    meta = json.loads((frozen / "modalign.json").read_text())
    assert meta["external_weights"]["image"]["files"]["init.safetensors"]
    stored = set(load_file(str(frozen / "model.safetensors")))
    assert not any(k.startswith("trunks.image.") for k in stored)  # referenced, not stored
    assert modalign.load(frozen).fingerprint == meta["fingerprint"]
    state = {k: v + 1 for k, v in load_file(str(weights)).items()}
    save_file(state, str(weights))
    with pytest.raises(UserInputError, match=r"tower .image. \(timm_image\).*differ"):
        modalign.load(frozen)
    weights.unlink()  # a trained tower's init file is not needed: the bundle stores its weights
    assert modalign.load(trained).fingerprint


def test_imagebind_config_trains_only_the_audio_tower(tiny_clip, tmp_path: Path) -> None:
    from modalign.config import load_config
    from modalign.pretrain.trainer import pretrain

    cfg_path, ckpt, model = tiny_clip
    manifest = write_tiny_corpus(tmp_path / "corpus", n=8)
    out = tmp_path / "model"
    sets = [
        f"data.train={manifest}", "data.num_workers=0", "data.audio.sample_rate=8000",
        "data.audio.clip_seconds=0.5", "data.audio.n_mels=16", "data.audio.n_fft=256",
        "data.audio.hop_length=128", "model.embed_dim=16", "model.towers.audio.arch=test_resnet",
        f"model.towers.image.arch={cfg_path}", f"model.towers.image.weights={ckpt}",
        f"model.towers.text.arch={cfg_path}", f"model.towers.text.weights={ckpt}",
        "train.steps=2", "train.batch_size=8", "train.progress=false", "train.checkpoint_every=0",
        "optim.warmup_steps=0", f"output.dir={out}",
    ]  # fmt: skip
    cfg = load_config("imagebind", sets)
    assert cfg.loss.pairs == "anchor" and cfg.model.towers["image"].lock == "all"
    pretrain(cfg)
    stored = load_file(str(out / "model.safetensors"))
    assert any(k.startswith("trunks.audio.") for k in stored)
    assert not any(k.startswith(("trunks.image.", "trunks.text.")) for k in stored)
    meta = json.loads((out / "modalign.json").read_text())
    assert set(meta["external_weights"]) == {"image", "text"}
    import modalign

    bundle = modalign.load(out)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():  # the frozen image trunk is still exactly open_clip's encoder
        close(bundle.encoder.trunks["image"].eval()(x), model.encode_image(x))


@pytest.mark.parametrize("lock", ["all", "partial", "none"])
def test_locking_applies_to_transformers_and_open_clip_kinds(bert_dir, tiny_clip, lock) -> None:
    cfg_path, ckpt, _ = tiny_clip
    cfgs = [
        TowerConfig(kind="hf_text", arch=str(bert_dir), lock=lock, unlocked_groups=1),
        TowerConfig(kind="open_clip", arch=str(cfg_path), weights=str(ckpt), lock=lock,
                    unlocked_groups=1, options={"part": "image"}),
    ]  # fmt: skip
    for cfg in cfgs:
        parts = build_tower("x", cfg, RGB)
        groups = parts.groups()
        trainable = [any(p.requires_grad for p in g) for g in groups]
        if lock == "all":
            assert not any(trainable) and parts.cache_outputs
        elif lock == "partial":
            assert trainable == [False] * (len(groups) - 1) + [True], cfg.kind
        else:
            assert all(trainable)
