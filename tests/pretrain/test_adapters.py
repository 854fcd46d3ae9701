"""Adapters (peft LoRA / IA3 / LoHa) on pretrained towers.

Tiny random-init towers of every kind (timm CNN, transformers ViT / BERT / HuBERT, open_clip)
and the shipped MiniLM: only the adapter gets gradients, merging gives the unmerged output, a
pattern matching nothing is exit 2 naming the tower. One adapted training run (timm tower with
a weights file) checks the bundle (adapter tensors only, base referenced by sha256, small), its
round trip, the merged standalone bundle, that the base stays as loaded, the frozen-tower cache
skipped; GradCache accumulation and bit-exact resume with an adapted tower.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from modalign.core.errors import ConfigError
from modalign.data.config import AudioConfig, DataConfig, ImageConfig
from modalign.pretrain import TowerConfig
from modalign.pretrain.towers import build_tower
from modalign.pretrain.towers.adapters import AdapterConfig, adapter_parameter_names

from helpers.corpus import tiny_overrides, write_tiny_corpus

RGB = DataConfig(image=ImageConfig(channels=3))
LORA = AdapterConfig("lora", {"r": 2, "alpha": 4})


# -- tiny towers of each kind, saved the way each library saves them ---------------------------
def _vit(root: Path) -> Path:
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    cfg = ViTConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=24,
        image_size=16,
        patch_size=8,
    )
    ViTModel(cfg).save_pretrained(root)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(root)
    return root


def _bert(root: Path) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat", "dog"]
    (root / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(root / "vocab.txt")).save_pretrained(root)
    cfg = BertConfig(
        vocab_size=len(words),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=32,
    )
    BertModel(cfg).save_pretrained(root)
    return root


def _hubert(root: Path) -> Path:
    from transformers import HubertConfig, HubertModel, Wav2Vec2FeatureExtractor

    cfg = HubertConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=24,
        conv_dim=(8, 8),
        conv_stride=(5, 4),
        conv_kernel=(10, 4),
        num_feat_extract_layers=2,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
    )
    HubertModel(cfg).save_pretrained(root)
    Wav2Vec2FeatureExtractor(sampling_rate=16000).save_pretrained(root)
    return root


TINY_CLIP = {
    "embed_dim": 8,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 16, "patch_size": 8, "head_width": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}


def _clip(root: Path) -> tuple[Path, Path]:
    import open_clip

    root.mkdir(parents=True, exist_ok=True)
    cfg = root / "tiny-adapter-clip.json"
    cfg.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(str(cfg))
    ckpt = root / "tiny.pt"
    torch.save({"state_dict": open_clip.create_model("tiny-adapter-clip").state_dict()}, ckpt)
    return cfg, ckpt


@pytest.fixture(scope="module")
def towers(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Tower configs (without adapter) + a matching input, per kind."""
    root = tmp_path_factory.mktemp("adapter-towers")
    torch.manual_seed(0)
    clip_cfg, clip_ckpt = _clip(root / "clip")
    images = torch.randn(2, 3, 16, 16)
    words = ["a photo of a cat", "dog"]
    return {
        "timm": (dict(kind="timm_image", arch="test_resnet", input_size=16), images),
        "hf_vision": (dict(kind="hf_vision", arch=str(_vit(root / "vit"))), images),
        "hf_text": (dict(kind="hf_text", arch=str(_bert(root / "bert"))), words),
        "hf_audio": (
            dict(kind="hf_audio", arch=str(_hubert(root / "hubert"))),
            torch.randn(2, 800),
        ),
        "open_clip": (
            dict(kind="open_clip", arch=str(clip_cfg), weights=str(clip_ckpt)),
            images,
        ),
        "minilm": (dict(kind="sentence_transformer", arch=""), words),
    }


def _perturb_adapter(trunk: torch.nn.Module, scale: float = 0.02) -> None:
    """Move the adapter off its identity start (LoRA B = 0, IA3 = 1), as training would."""
    gen = torch.Generator().manual_seed(1)
    names = adapter_parameter_names(trunk)
    params = [p for n, p in trunk.named_parameters() if n in names]
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=gen))


AUDIO = DataConfig(audio=AudioConfig(sample_rate=16000, clip_seconds=0.05))


@pytest.mark.parametrize(
    ("tower", "adapter"),
    [
        ("timm", LORA),
        ("hf_vision", LORA),
        ("hf_text", LORA),
        ("hf_audio", LORA),
        ("open_clip", LORA),
        ("timm", AdapterConfig("ia3")),
        ("hf_text", AdapterConfig("loha", {"r": 2})),
    ],
)
def test_only_the_adapter_trains_and_merging_keeps_the_output(towers, tower, adapter) -> None:
    from modalign.pretrain.towers.adapters import merge_into_base

    base, x = towers[tower]
    data = AUDIO if tower == "hf_audio" else RGB
    parts = build_tower("m", TowerConfig(**base, adapter=adapter), data)
    trunk = parts.trunk
    names = adapter_parameter_names(trunk)
    total = sum(p.numel() for p in trunk.parameters())
    assert names and sum(p.numel() for n, p in trunk.named_parameters() if n in names) < total
    trunk.train()
    trunk(x).square().sum().backward()
    with_grad = {n for n, p in trunk.named_parameters() if p.grad is not None}
    assert with_grad == names  # every adapter tensor, and nothing of the base
    _perturb_adapter(trunk)
    trunk.eval()
    with torch.no_grad():
        before = trunk(x)
        assert merge_into_base(trunk) > 0
        after = trunk(x)
    assert not adapter_parameter_names(trunk)  # the plain base layers are back, still frozen
    assert (before - after).abs().max() <= 1e-5


def test_target_pattern_matching_nothing_is_exit_2_naming_the_tower_and_layers(towers) -> None:
    base, _ = towers["hf_vision"]
    bad = AdapterConfig("lora", {"target_modules": ["no_such_layer"]})
    with pytest.raises(ConfigError, match="no_such_layer") as info:
        build_tower("image", TowerConfig(**base, adapter=bad), RGB)
    msg = str(info.value)
    assert "model.towers.image.adapter.options.target_modules" in msg and "q_proj" in msg
    assert info.value.exit_code == 2


def test_adapter_with_lock_is_refused_naming_the_key() -> None:
    cfg = TowerConfig(kind="timm_image", arch="test_resnet", lock="all", adapter=LORA)
    with pytest.raises(ConfigError, match=r"model.towers.image.adapter.*lock=none"):
        build_tower("image", cfg, RGB)


def test_unknown_adapter_kind_or_option_names_the_key() -> None:
    from modalign.config import load_config

    with pytest.raises(ConfigError, match=r"model.towers.image.adapter.kind: .*prefix_tuning"):
        load_config(None, ["model.towers.image.adapter.kind=prefix_tuning"])
    sets = ["model.towers.audio.adapter.kind=lora", "model.towers.audio.adapter.options.rank=4"]
    with pytest.raises(ConfigError, match=r"model.towers.audio.adapter.options.rank"):
        load_config(None, sets)
    with pytest.raises(ConfigError, match=r"model.towers.text.adapter: .*lock=none"):
        load_config(None, ["model.towers.text.adapter.kind=lora"])  # the text tower is locked
    with pytest.raises(ConfigError, match=r"model.towers.m.adapter.options.rank"):  # built alone
        build_tower("m", TowerConfig(adapter=AdapterConfig("lora", {"rank": 4})), RGB)


# -- training with an adapted tower -----------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_corpus(tmp_path_factory.mktemp("adapter-corpus"), n=16)


@pytest.fixture(scope="module")
def base_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 'pretrained' one-channel image trunk the adapted runs start from."""
    torch.manual_seed(0)
    state = timm.create_model("test_resnet", num_classes=0, in_chans=1).state_dict()
    path = tmp_path_factory.mktemp("adapter-base") / "base.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def _sets(corpus: Path, out: Path, weights: Path, steps: int = 2, batch: int = 8) -> list[str]:
    return [
        *tiny_overrides(corpus, out, steps=steps, batch=batch),
        "model.modalities=[image,audio]",
        f"model.towers.image.weights={weights}",
        "model.towers.image.adapter.kind=lora",
        "model.towers.image.adapter.options.r=2",
        "model.towers.image.drop_rate=0.2",
        "optim.lr=0.01",
        "train.threads=1",
    ]


def _train(sets: list[str], resume: str | None = None):
    from modalign.config import load_config
    from modalign.pretrain.trainer import pretrain

    return pretrain(load_config(None, sets), resume=resume)


@pytest.fixture(scope="module")
def adapted_run(corpus: Path, base_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("adapted") / "run"
    _train([*_sets(corpus, out, base_weights, steps=4), "train.keep_checkpoints=0"])
    return out


def test_bundle_stores_the_adapter_and_references_the_base(adapted_run, base_weights) -> None:
    from modalign.pretrain.bundle import load_bundle, read_bundle_meta

    state = load_file(str(adapted_run / "model.safetensors"))
    image = {k for k in state if k.startswith("trunks.image.")}
    assert image and all(".lora_" in k for k in image)  # no base tensor stored
    assert any(k.startswith("trunks.audio.") for k in state)  # the plain tower is stored whole
    meta = read_bundle_meta(adapted_run)
    assert meta["adapters"]["image"]["name"] == "lora"
    assert meta["adapters"]["image"]["base"] == "external"
    assert "base.safetensors" in meta["external_weights"]["image"]["files"]
    size = lambda k: state[k].numel()  # noqa: E731
    base = load_file(str(base_weights))
    assert sum(map(size, image)) < 0.2 * sum(v.numel() for v in base.values())

    model = load_bundle(adapted_run)
    trunk = model.encoder.trunks["image"]
    for k, v in base.items():  # the base is exactly the referenced file, BN statistics too
        key = k if k in dict(trunk.named_buffers()) else None
        got = dict(trunk.state_dict())
        name = key or next(n for n in got if n.replace(".base_layer", "") == k)
        assert torch.equal(got[name], v), k
    assert any(state[k].abs().max() > 0 for k in image if "lora_B" in k)  # the adapter trained


def test_merged_bundle_is_standalone_and_equal(adapted_run, base_weights, tmp_path, capsys):
    import modalign
    from modalign.cli import main
    from modalign.pretrain import merge_adapters
    from modalign.pretrain.bundle import read_bundle_meta

    merged = merge_adapters(adapted_run, tmp_path / "merged")
    meta = read_bundle_meta(merged)
    assert meta["adapters"] == {}
    assert meta["merged_from"] == read_bundle_meta(adapted_run)["fingerprint"]
    state = load_file(str(merged / "model.safetensors"))
    assert not any(".lora_" in k for k in state) and "trunks.image.conv1.0.weight" in state
    images = [str(p) for p in sorted(adapted_run.parents[1].glob("adapter-corpus*/img/*.png"))]
    assert images
    a = modalign.load(str(adapted_run)).encode(image=images)["image"]
    b = modalign.load(str(merged)).encode(image=images)["image"]
    assert (a - b).abs().max() <= 1e-5
    base_weights.rename(base_weights.with_suffix(".moved"))  # merged: base file not needed
    try:
        modalign.load(str(merged))
        with pytest.raises(ConfigError, match="base.safetensors"):  # the adapted one needs it
            modalign.load(str(adapted_run))
    finally:
        base_weights.with_suffix(".moved").rename(base_weights)
    # the CLI's --merge reaches the exporter: a bundle without adapters is refused (exit 2)
    args = ["export", "--model", str(merged), "--format", "bundle", "--merge"]
    assert main([*args, "--out", str(tmp_path / "again")]) == 2
    assert "no tower of this bundle has an adapter" in capsys.readouterr().err


def test_adapted_tower_is_not_frozen_for_the_caches(towers, adapted_run) -> None:
    from modalign.pretrain.bundle import load_bundle
    from modalign.pretrain.towers.in_loader import frozen_modalities

    encoder = load_bundle(adapted_run).encoder
    assert frozen_modalities(encoder) == []
    base, words = towers["minilm"]  # the shipped MiniLM, adapted
    trunk = build_tower("text", TowerConfig(**base, adapter=LORA), RGB).trunk
    assert not trunk.locked  # the per-string cache is off: the adapter changes the outputs
    trunk(words[:1]).sum().backward()
    assert trunk._cache == {}
    with_grad = {n for n, p in trunk.named_parameters() if p.grad is not None}
    assert with_grad == adapter_parameter_names(trunk) and any(".query." in n for n in with_grad)


def test_resume_with_an_adapter_is_exact(corpus, base_weights, adapted_run, tmp_path) -> None:
    import shutil

    out = tmp_path / "run"
    step = adapted_run / "checkpoints" / "step-2"
    shutil.copytree(step, out / "checkpoints" / "step-2")
    _train(_sets(corpus, out, base_weights, steps=4), resume="latest")
    want = load_file(str(adapted_run / "model.safetensors"))
    got = load_file(str(out / "model.safetensors"))
    assert set(got) == set(want)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, atol=1e-7, rtol=0, msg=k)


def test_accumulation_with_an_adapted_batchnorm_tower_equals_the_big_batch(
    corpus, base_weights, tmp_path
) -> None:
    """An adapted trunk's BatchNorm keeps its loaded statistics: no batch statistics, so
    GradCache's 2 x 8 gives the 16-batch weights (a plain BatchNorm tower would not)."""
    common = [
        "train.checkpoint_every=0",
        "model.towers.image.drop_rate=0.0",
        "model.towers.audio.adapter.kind=ia3",  # both towers adapted: no batch statistics
        "optim.lr=0.0005",  # AdamW on near-zero LoRA gradients magnifies float32 rounding
    ]
    big = tmp_path / "big"
    _train([*_sets(corpus, big, base_weights, steps=1, batch=16), *common])
    acc = tmp_path / "acc"
    _train([*_sets(corpus, acc, base_weights, steps=1, batch=8), *common, "train.accum_steps=2"])
    want, got = load_file(str(big / "model.safetensors")), load_file(str(acc / "model.safetensors"))
    assert set(got) == set(want)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, atol=1e-5, rtol=1e-5, msg=k)


def test_cli_bad_target_pattern_exits_2_before_training(corpus, base_weights, tmp_path, capsys):
    from modalign.cli import main

    out = tmp_path / "run"
    sets = [
        *_sets(corpus, out, base_weights),
        "model.towers.image.adapter.options.target_modules=[qkv]",
    ]
    assert main(["pretrain", "demo", "--set", *sets]) == 2
    err = capsys.readouterr().err
    assert "model.towers.image.adapter.options.target_modules" in err and "conv1" in err
    assert not (out / "checkpoints").exists()


def test_sharded_engine_with_an_adapter_is_refused_up_front(monkeypatch) -> None:
    from modalign.config import load_config
    from modalign.pretrain.engines import check_engine_options

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    cfg = load_config(None, ["model.towers.image.adapter.kind=lora", "train.val_every=0"])
    with pytest.raises(ConfigError, match=r"model.towers.image.adapter with FSDP"):
        check_engine_options(cfg)


def test_tune_searches_adapter_rank_and_target_set() -> None:
    import optuna

    from modalign.config import load_config
    from modalign.core.config_io import to_dict
    from modalign.tune.finetune_stage import config_with
    from modalign.tune.space import PretrainSpace

    sets = [
        "model.towers.image.adapter.kind=lora",
        "model.towers.image.adapter.options.r=8",
        "model.towers.image.adapter.options.target_modules=[conv_pw,conv_pwl]",
    ]
    tree = to_dict(load_config(None, sets))
    space = PretrainSpace.around(tree)
    assert space.adapter_ranks == {"image": [4, 8, 16]}
    assert space.adapter_targets == {"image": [["conv_pw", "conv_pwl"], []]}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(20):
        params = space.suggest(study.ask())
        cfg = config_with(tree, params)  # every suggestion is a valid config
        opts = cfg.model.towers["image"].adapter.options
        seen.add((opts["r"], tuple(opts["target_modules"])))
    assert {r for r, _ in seen} == {4, 8, 16} and {t for _, t in seen} == {
        (),
        ("conv_pw", "conv_pwl"),
    }


def test_distributed_exactness_covers_an_adapted_tower() -> None:
    """``tests/system/test_distributed.py`` runs every ``loss_exactness`` case as 2 processes x
    B vs 1 x 2B; the LoRA case trains only the adapter and keeps the BatchNorm statistics."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dist_scripts"))
    import loss_exactness as lx

    case = next(c for c in lx.cases() if c.adapter)
    got = lx.run_case(case)
    image = {n: g for n, g in got["grads"].items() if n.startswith("towers.image.")}
    assert all(g.abs().max() > 0 for n, g in image.items() if "lora_" in n)
    assert all(g.abs().max() == 0 for n, g in image.items() if "lora_" not in n)
    torch.manual_seed(0)
    fresh = lx.ToyTask(case.loss)
    for n, b in fresh.named_buffers():  # BatchNorm statistics untouched by the step
        if n.startswith("towers.image."):
            assert torch.equal(got["buffers"][n].to(b.dtype), b), n


def test_every_adapter_option_declares_a_range() -> None:
    from modalign.core.config_io import unranged_numeric_keys
    from modalign.pretrain import ADAPTERS

    assert {"lora", "ia3", "loha"} <= set(ADAPTERS.names())
    assert [f"{e.name}: {k}" for e in ADAPTERS for k in unranged_numeric_keys(e.options)] == []
