"""The tower factory: shapes, gradients, HF CLIP and MiniLM loading, freezing, name errors."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from metacontrastive.models import towers
from metacontrastive.models.clip import DomainConditionedCLIP, EncoderConfig
from metacontrastive.models.towers import build_image_tower, build_text_tower, build_towers

CONF = Path(__file__).resolve().parents[1] / "conf"
TEXTS = ["a photo of a cat", "a photo of a dog on grass", "an MRI scan of a brain tumour"]


def _bytes_to_unicode() -> list[str]:
    """CLIP's byte-level alphabet: 256 printable characters standing for the 256 byte values."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = keep + [256 + i for i, _ in enumerate(b for b in range(256) if b not in keep)]
    return [chr(c) for c in chars]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A random CLIPModel (width 32, one layer, 32 px, 16-d projection) and a byte-level CLIP tokenizer."""
    from transformers import CLIPConfig, CLIPModel

    folder = tmp_path_factory.mktemp("tiny-clip")
    alphabet = _bytes_to_unicode()  # no merges: every word splits into bytes, the last one marked </w>
    vocab = {c: i for i, c in enumerate(alphabet)} | {c + "</w>": 256 + i for i, c in enumerate(alphabet)}
    vocab |= {"<|startoftext|>": 512, "<|endoftext|>": 513}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer_config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(vocab_size=514, max_position_embeddings=77, bos_token_id=512, eos_token_id=513,
                         pad_token_id=513, **small),
        vision_config=dict(image_size=32, patch_size=8, **small),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    return folder


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------ shapes and gradients
@pytest.mark.parametrize("size", [16, 32])
def test_tiny_towers_shapes_and_finite(size):
    image, text = build_towers("tiny", "tiny", None, None, False, False)
    h_image = image(torch.rand(4, 3, size, size))
    h_text = text(TEXTS)
    assert h_image.shape == (4, image.out_dim) and h_text.shape == (3, text.out_dim)
    assert torch.isfinite(h_image).all() and torch.isfinite(h_text).all()


@pytest.mark.parametrize("name", ["tiny", "conv4", "resnet12", "timm:resnet18", "timm:vit_tiny_patch16_224"])
def test_every_image_tower_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    tower = build_image_tower(name, image_size=32)
    features = tower(torch.rand(4, 3, 16, 16))  # resized to 32 px by the tower
    assert features.shape == (4, tower.out_dim) and torch.isfinite(features).all()
    features.square().mean().backward()
    missing = [n for n, p in tower.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


def test_every_text_tower_parameter_gets_a_gradient():
    tower = build_text_tower("tiny")
    tower(TEXTS).square().mean().backward()
    missing = [n for n, p in tower.named_parameters() if p.grad is None]
    assert not missing, missing


def test_timm_tower_uses_model_data_config_and_a_local_weight_file(tmp_path):
    import timm
    from safetensors.torch import save_file

    reference = timm.create_model("resnet18")  # with its classifier, as released checkpoints are
    save_file(reference.state_dict(), str(tmp_path / "resnet18.safetensors"))
    tower = build_image_tower("timm:resnet18", pretrained=str(tmp_path / "resnet18.safetensors"))
    assert tower.input_size == (224, 224) and tower.out_dim == 512
    assert torch.allclose(tower.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    assert torch.equal(tower.model.conv1.weight, reference.conv1.weight)
    with pytest.raises(FileNotFoundError, match="no weight file"):
        build_image_tower("timm:resnet18", pretrained=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="applies to timm"):
        build_image_tower("tiny", pretrained=str(tmp_path / "resnet18.safetensors"))


# ------------------------------------------------------------------ HF CLIP
def test_hf_clip_towers_load_once_with_the_right_shapes(clip_dir, monkeypatch):
    from transformers import CLIPModel

    loads = []
    load_clip = towers.factory.load_clip
    monkeypatch.setattr(towers.factory, "load_clip", lambda path: loads.append(path) or load_clip(path))
    image, text = build_towers(f"hf-clip:{clip_dir}", "hf-clip", None, None, False, False)  # the text tower takes the image tower's folder
    assert len(loads) == 1
    assert image.out_dim == text.out_dim == 16
    h_image, h_text = image(torch.rand(2, 3, 24, 24)), text(TEXTS)  # 24 px resized to the model's 32
    assert h_image.shape == (2, 16) and h_text.shape == (3, 16)
    assert torch.isfinite(h_image).all() and torch.isfinite(h_text).all()
    assert not torch.allclose(h_text[0], h_text[1])
    saved = CLIPModel.from_pretrained(clip_dir)
    assert torch.equal(image.projection.weight, saved.visual_projection.weight)
    assert torch.equal(text.projection.weight, saved.text_projection.weight)


def test_hf_clip_image_tower_runs_at_another_size(clip_dir):
    tower = build_image_tower(f"hf-clip:{clip_dir}", image_size=48)  # position embeddings interpolated
    assert tower(torch.rand(2, 3, 48, 48)).shape == (2, 16)


def test_clip_preset_without_a_folder_names_the_option(tmp_path):
    from metacontrastive.cli import main

    with pytest.raises(ValueError, match=r"needs a folder.*--model.encoder.image_tower=hf-clip:"):
        main(["fit", "-c", str(CONF / "default.yaml"), "-c", str(CONF / "clip_vit_b32.yaml"), f"--data.root={tmp_path}",
              f"--trainer.logger.init_args.save_dir={tmp_path}"])


@pytest.mark.slow
def test_clip_preset_trains_with_the_folder_named_once(clip_dir, demo_root, tmp_path):
    from metacontrastive.cli import main

    cli = main(["fit", "-c", str(CONF / "default.yaml"), "-c", str(CONF / "clip_vit_b32.yaml"),
                f"--model.encoder.image_tower=hf-clip:{clip_dir}", f"--data.root={demo_root}", "--data.image_size=16",
                "--data.ways=2", "--data.shots=1", "--data.queries=1", "--data.tasks_per_batch=2",
                "--data.steps_per_epoch=1", "--data.val_episodes=1", "--trainer.max_steps=1",
                "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={tmp_path}"])
    model = cli.model.model
    assert type(model.image_tower).__name__ == "CLIPImageTower" and type(model.text_tower).__name__ == "CLIPTextTower"
    assert cli.trainer.global_step == 1 and cli.trainer.precision == "bf16-mixed"


def test_hf_clip_without_a_folder_names_the_option():
    with pytest.raises(ValueError, match=r"needs a folder.*--model.encoder.image_tower=hf-clip:"):
        build_towers("hf-clip", "hf-clip", None, None, False, False)
    with pytest.raises(ValueError, match=r"--model.encoder.text_tower=hf-clip:"):
        build_text_tower("hf-clip")


# ------------------------------------------------------------------ MiniLM
def test_minilm_loads_offline_and_embeds_by_meaning(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("the network was touched")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    tower = build_text_tower("minilm").eval()  # eval: no dropout, so the embedding is a function of the text
    with torch.no_grad():
        z = F.normalize(tower(["a photo of a cat", "a photo of a cat", "a picture of a kitten", TEXTS[2]]), dim=-1)
    assert z.shape == (4, 384) and tower.out_dim == 384
    assert torch.equal(z[0], z[1])
    similarity = z @ z.t()  # (4, 4)
    assert similarity[0, 2] > similarity[0, 3] + 0.3  # pretrained: a paraphrase is much closer than a brain scan


# ------------------------------------------------------------------ freezing
def test_frozen_tower_gets_no_gradient_stays_in_eval_and_keeps_its_weights():
    torch.manual_seed(0)
    model = DomainConditionedCLIP(2, EncoderConfig(image_tower="timm:resnet18", image_size=32, freeze_image=True))
    model.train()
    assert not model.image_tower.training and not model.image_tower.model.layer1[0].bn1.training
    assert model.text_tower.training
    assert not any(p.requires_grad for p in model.image_tower.parameters())
    before_image, before_text = _params(model.image_tower), _params(model.text_tower)  # BatchNorm statistics too
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    z_image, z_text = model(torch.rand(4, 3, 32, 32), TEXTS[:2] * 2, domain_id=0)
    (z_image @ z_text.t()).diagonal().neg().mean().backward()
    optimizer.step()
    assert all(p.grad is None for p in model.image_tower.parameters())
    after_image = _params(model.image_tower)
    assert all(torch.equal(before_image[k], after_image[k]) for k in before_image)
    assert any(not torch.equal(before_text[k], v) for k, v in _params(model.text_tower).items())


def test_projection_method_freezes_both_towers():
    from metacontrastive.module import MetaContrastiveModule

    module = MetaContrastiveModule(method="projection").train()
    for tower in (module.model.image_tower, module.model.text_tower):
        assert tower.frozen and not tower.training
        assert not any(p.requires_grad for p in tower.parameters())


# ------------------------------------------------------------------ names
@pytest.mark.parametrize("name", ["vit", "timm", "timm:", "tiny:big", "conv4:wide", "hf:/some/folder", "minilm"])
def test_unknown_image_tower_lists_the_known_forms(name):
    with pytest.raises(ValueError, match=r"unknown image tower .*known forms: tiny, conv4, resnet12, timm:<timm model name>, hf-clip:"):
        build_image_tower(name)


@pytest.mark.parametrize("name", ["bert", "hf", "minilm:large", "timm:resnet18"])
def test_unknown_text_tower_lists_the_known_forms(name):
    with pytest.raises(ValueError, match=r"unknown text tower .*known forms: tiny, minilm, hf:<folder or hub id>, hf-"):
        build_text_tower(name)


def test_unknown_timm_model():
    with pytest.raises(ValueError, match="unknown timm model 'resnet_nope'"):
        build_image_tower("timm:resnet_nope")


def test_importing_the_factory_leaves_timm_and_transformers_unimported():
    code = "import sys, metacontrastive.models.towers; print('timm' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_text_towers_tokenize_on_the_device_of_their_parameters(clip_dir):
    for tower in (build_text_tower("tiny"), build_text_tower(f"hf-clip:{clip_dir}")):
        assert tower.cuda()(TEXTS).device.type == "cuda"


@pytest.mark.parametrize("image, text", [("timm:vit_tiny_patch16_224", "tiny"), ("tiny", "minilm")])
def test_gradient_checkpointing_keeps_the_gradients(image, text):
    """Checkpointed towers recompute their activations in the backward pass: the same loss and gradients."""
    from metacontrastive.models.clip import DomainConditionedCLIP, EncoderConfig

    def grads(checkpointing):
        torch.manual_seed(0)
        model = DomainConditionedCLIP(2, EncoderConfig(image_tower=image, text_tower=text, image_size=32,
                                                       grad_checkpointing=checkpointing))
        tower = model.image_tower if image.startswith("timm") else model.text_tower
        on = tower.model.grad_checkpointing if image.startswith("timm") else tower.model.is_activation_checkpointing
        assert on == checkpointing
        z_image, z_text = model(torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)), TEXTS, 0)
        (z_image[:3] * z_text).sum().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and any("tower" in n for n in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)


def test_gradient_checkpointing_names_the_towers_that_have_it():
    from metacontrastive.models.clip import DomainConditionedCLIP, EncoderConfig

    with pytest.raises(ValueError, match="no trainable tower supports it"):
        DomainConditionedCLIP(2, EncoderConfig(grad_checkpointing=True))
