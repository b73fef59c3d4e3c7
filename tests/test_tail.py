"""Adaptation inside the image tower (``models.tail``): the cut tower is the whole tower, untrained FiLM changes
nothing, the split cache holds trunk activations and refuses another split's, every in-tower scope adapts on both
engines with the same gradients, and the in-tower baselines start at the feature centroid."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from metacontrastive import intower
from metacontrastive.data.datamodule import EpisodicDataModule
from metacontrastive.data.episodes import Task
from metacontrastive.data.features import FeatureSpec, StaleCache, read_shard
from metacontrastive.errors import BadInput
from metacontrastive.evaluation import METHODS, Episode, EvalOptions, evaluate, methods_for, predict
from metacontrastive.meta import ADAPT_SCOPES, adapt
from metacontrastive.models.clip import DomainConditionedCLIP, EncoderConfig
from metacontrastive.module import MetaContrastiveModule

DOMAINS = ["natural", "medical"]
LITE = dict(image_tower="efficientnet-lite0", freeze_image=True, image_size=64)  # 64 px: 2 x 2 trunk activations


def _encoder(tail: str = "head", **kwargs) -> EncoderConfig:
    return EncoderConfig(**{**LITE, "tail": tail, **kwargs})


@pytest.mark.parametrize("tail", ["head", "last_stage"])
def test_the_tail_on_the_trunk_is_the_whole_tower_and_untrained_film_changes_nothing(tail):
    torch.manual_seed(0)
    whole = DomainConditionedCLIP(2, EncoderConfig(**LITE))
    cut = DomainConditionedCLIP(2, _encoder(tail))
    images = torch.rand(5, 3, 64, 64)
    with torch.no_grad():
        expected = whole.image_tower(images)  # (5, 1280) the pretrained tower, pooled
        trunk = cut.image_tower(images)
        assert trunk.shape == (5, cut.image_tail.in_channels, 2, 2)
        torch.testing.assert_close(cut.tail_features(trunk), expected, rtol=1e-5, atol=1e-5)  # no FiLM
        torch.testing.assert_close(cut.tail_features(trunk, 1), expected, rtol=1e-5, atol=1e-5)  # FiLM at its init
        prefixed = cut.tail_features(cut.image_tail.prefix(trunk), cut.unknown_domain, prefixed=True)
        torch.testing.assert_close(prefixed, expected, rtol=1e-5, atol=1e-5)
        torch.nn.init.normal_(cut.film_tail.to_gamma_beta.weight, std=0.5)  # trained FiLM modulates, per domain
        moved = [cut.tail_features(trunk, row) for row in (0, 1)]
    assert not torch.allclose(moved[0], expected, atol=1e-3) and not torch.allclose(moved[0], moved[1], atol=1e-3)
    assert cut.film_image is None and cut.film_tail is not None  # image FiLM sits in the tail, not on the pooled features
    assert not any(p.requires_grad for p in cut.image_tail.parameters())  # frozen with the tower ...
    trained = DomainConditionedCLIP(2, _encoder(tail, train_tail=True))
    assert all(p.requires_grad for p in trained.image_tail.parameters())  # ... unless it trains
    assert whole.image_tower_id != cut.image_tower_id and cut.image_tower_id.endswith(f"trunk-{tail}")


def test_a_tail_needs_an_efficientnet_and_train_tail_needs_a_tail():
    with pytest.raises(BadInput, match="cannot be cut"):
        DomainConditionedCLIP(2, EncoderConfig(freeze_image=True, tail="head"))  # the tiny tower
    with pytest.raises(ValueError, match="needs a tail"):
        DomainConditionedCLIP(2, EncoderConfig(**LITE, train_tail=True))
    with pytest.raises(ValueError, match="tail_film.*needs model.encoder.tail"):
        MetaContrastiveModule(domains=DOMAINS, encoder=EncoderConfig(**LITE), adapt_scope="tail_film")
    with pytest.raises(ValueError, match="train_tail=true"):
        MetaContrastiveModule(domains=DOMAINS, encoder=_encoder("head"), adapt_scope="tail")


@pytest.fixture
def sharded(tmp_path, write_domain):
    for domain in DOMAINS:
        write_domain(tmp_path, domain, maxcount=10)
    return tmp_path


def _datamodule(root, small) -> EpisodicDataModule:
    dm = EpisodicDataModule(domains=DOMAINS, root=str(root), **{**small, "image_size": 64})
    dm.setup("fit")
    return dm


def test_the_split_cache_holds_float16_trunk_activations_is_hit_again_and_another_splits_is_refused(sharded, small):
    torch.manual_seed(0)
    module = MetaContrastiveModule(domains=DOMAINS, encoder=_encoder("head"), domain_dropout=0.0)
    dm = _datamodule(sharded, small)
    dm.attach(module.model.frozen_image_tower(), progress=False)
    task = dm.fixed_episodes("val")[0]
    assert task.support_features.dtype == torch.float16 and task.support_features.shape[1:] == (320, 2, 2)
    with torch.no_grad():  # the tail on cached activations is the whole tower on the images, to float16's precision
        images = torch.cat([task.support_images, task.query_images])
        expected = module.model.tail_features(module.model.image_tower(images))
        cached = module.model.tail_features(module.model.image_features(None, cached=(
            torch.cat([task.support_features, task.query_features]), task.features_of)))
    torch.testing.assert_close(cached, expected, rtol=2e-3, atol=2e-3)
    files = dm.cached[("natural", "train")]
    before = {p: p.stat().st_mtime_ns for p in files}
    again = _datamodule(sharded, small)
    again.attach(module.model.frozen_image_tower(), progress=False)
    assert {p: p.stat().st_mtime_ns for p in again.cached[("natural", "train")]} == before  # a hit
    # another split (or none) is another cache, and a file of this split is refused for it
    other = MetaContrastiveModule(domains=DOMAINS, encoder=_encoder("last_stage"), domain_dropout=0.0)
    third = _datamodule(sharded, small)
    third.attach(other.model.frozen_image_tower(), progress=False)
    assert third.cached[("natural", "train")][0].parent != files[0].parent
    with pytest.raises(StaleCache, match="was made for"):
        read_shard(files[0], FeatureSpec(other.model.image_tower_id, 64))
    with pytest.raises(BadInput, match="rebuild the feature cache"):
        other.view_of(task, 0)  # activations of another split never reach a model


def _tasks(seed: int = 0, dtype=torch.float64, size: int = 64) -> list[Task]:
    g = torch.Generator().manual_seed(seed)
    images = lambda: torch.rand(6, 3, size, size, generator=g, dtype=dtype)  # noqa: E731
    return [Task(domain=DOMAINS[t % 2], domain_id=t % 2, texts=[f"a photo of a thing {t} {c}" for c in range(3)],
                 support_images=images(), support_labels=torch.arange(3).repeat_interleave(2),
                 query_images=images(), query_labels=torch.arange(3).repeat_interleave(2),
                 classes=[f"thing {t} {c}" for c in range(3)]) for t in range(4)]


def _in_tower_module(scope: str, tail: str, size: int = 64, **options) -> MetaContrastiveModule:
    torch.manual_seed(0)
    encoder = _encoder(tail, image_tower="efficientnet-lite0:random", train_tail=scope == "tail", image_size=size)
    module = MetaContrastiveModule(domains=DOMAINS, encoder=encoder, adapt_scope=scope, domain_dropout=0.0, **options)
    module = module.double()
    for film in (module.model.film_tail, module.model.film_text):  # break FiLM's zero init: every part takes part
        torch.nn.init.normal_(film.to_gamma_beta.weight, std=0.1)
    module.log = lambda *args, **kwargs: None
    return module


SCOPES = [("tail_film", "head"), ("tail_film", "last_stage"), ("context", "head"), ("tail", "head"),
          ("tail", "last_stage")]


@pytest.mark.parametrize("scope, tail", SCOPES)
def test_each_in_tower_scope_adapts_only_its_parts(scope, tail):
    module = _in_tower_module(scope, tail, inner_lr=0.01 if scope == "tail" else 0.5)  # conv weights take small steps
    view = module.view_of(_tasks()[0], 0)
    assert view.tail_adapts and view.inputs() is not None  # the tail runs per set of fast weights, from its start
    learner = module.learner.clone()
    before = view.loss(view.support, learner.module)[0]
    adapt(learner, lambda parts: view.loss(view.support, parts)[0], steps=1)
    assert view.loss(view.support, learner.module)[0] < before
    changed = {name.split(".")[0] for name, p in learner.module.named_parameters()
               if not torch.equal(p, module.model.get_parameter(name))}
    assert changed == set(ADAPT_SCOPES[scope])


@pytest.mark.parametrize("scope, tail, label_lr", [(*s, None) for s in SCOPES] + [("tail_film", "head", 0.5)])
def test_each_in_tower_scope_gives_the_same_loss_and_outer_gradients_on_both_engines(scope, tail, label_lr):
    """``label_lr``: the labels adapt too, from the prototypes (``inner_label_lr``, ``prototype_prompts``)."""
    results = []
    labels = dict(inner_label_lr=label_lr, prototype_prompts=10.0) if label_lr else {}
    for engine in ("l2l", "func"):  # 32 px (1 x 1 trunk activations): the engines' mathematics, at a quarter of the cost
        # second order through the tail's convolutions is costly in float64: one inner step, two tasks, for its weights
        module = _in_tower_module(scope, tail, size=32, meta_engine=engine, inner_lr=0.5, inner_steps=1 if scope == "tail" else 2,
                                  **labels)
        loss = module.meta_step(_tasks(size=32)[:2 if scope == "tail" else 4], "train")
        loss.backward()
        results.append((loss, {n: p.grad for n, p in module.named_parameters() if p.grad is not None}))
    (loss_l2l, grads_l2l), (loss_func, grads_func) = results
    torch.testing.assert_close(loss_func, loss_l2l, rtol=1e-10, atol=1e-12)
    assert grads_func.keys() == grads_l2l.keys()
    assert any(name.startswith("model.film_tail" if scope != "tail" else "model.image_tail") for name in grads_l2l)
    for name in grads_l2l:
        torch.testing.assert_close(grads_func[name], grads_l2l[name], rtol=1e-6, atol=1e-9)


def _episodes(module, count: int = 3, seed: int = 0) -> list[Episode]:
    return [Episode.of(module, task, task.domain_id) for task in _tasks(seed, torch.float32)[:count]]


@pytest.mark.parametrize("method", ["tail_finetune", "tail_film"])
def test_the_in_tower_baselines_start_at_the_feature_centroid_and_train_each_copy_alone(method):
    torch.manual_seed(0)
    module = MetaContrastiveModule(domains=DOMAINS, encoder=_encoder("last_stage"), domain_dropout=0.0).eval()
    episodes = _episodes(module)
    untrained = predict(method, episodes, EvalOptions(tail_finetune_steps=0, tail_film_steps=0))
    assert torch.equal(untrained, predict("feature_centroid", episodes))
    opts = EvalOptions(tail_finetune_steps=3, tail_film_steps=3, tail_finetune_lr=1e-2, tail_film_lr=1e-1)
    alone = torch.cat([predict(method, [ep], opts) for ep in episodes])
    # a memory bound that splits the chunk into one copy at a time: each episode as alone
    assert torch.equal(predict(method, episodes, dataclasses.replace(opts, tail_values=1)), alone)
    # the copies of a chunk train as each would alone, in float64: Adam's first step is about lr * sign(gradient), so
    # in float32 a gradient near zero whose sign depends on how the batch was summed can move a prediction
    tail = module.model.image_tail.double()
    trunk = torch.stack([ep.h_trunk for ep in episodes]).double()  # (B, S + Q, C, h, w)
    train = getattr(intower, method)
    lr = opts.tail_finetune_lr if method == "tail_finetune" else opts.tail_film_lr
    together = train(tail, trunk, episodes[0].support_labels, episodes[0].ways, 3, lr, opts.tail_scale)
    assert torch.equal(together, torch.cat([train(tail, t[None], episodes[0].support_labels, episodes[0].ways,
                                                  3, lr, opts.tail_scale) for t in trunk]))
    assert not torch.equal(together, untrained)  # training moved them
    assert all(not p.requires_grad for p in module.model.image_tail.parameters())  # the model's own tail untouched


def test_the_in_tower_baselines_need_a_cut_tower_and_all_leaves_them_out_without_one():
    plain = MetaContrastiveModule(domains=DOMAINS, encoder=EncoderConfig(**LITE), domain_dropout=0.0).eval()
    cut = MetaContrastiveModule(domains=DOMAINS, encoder=_encoder("head"), domain_dropout=0.0).eval()
    assert methods_for(cut) == list(METHODS)
    assert "tail_film" not in methods_for(plain) and "feature_centroid" in methods_for(plain)
    with pytest.raises(ValueError, match="needs a model whose tower is cut"):
        predict("tail_film", _episodes(plain, 1))


def test_a_checkpoint_of_a_cut_tower_names_the_trunk_and_refuses_another_split(tmp_path):
    module = MetaContrastiveModule(domains=DOMAINS, encoder=_encoder("head"))
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                  "pytorch-lightning_version": "2.5.0"}
    module.on_save_checkpoint(checkpoint)
    assert not [k for k in checkpoint["state_dict"] if k.startswith("model.image_tower.")]
    assert [k for k in checkpoint["state_dict"] if k.startswith("model.film_tail.")]
    path = tmp_path / "cut.ckpt"
    torch.save(checkpoint, path)
    loaded = MetaContrastiveModule.load_from_checkpoint(path)
    for key, value in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    other = MetaContrastiveModule(domains=DOMAINS, encoder=_encoder("last_stage"))
    with pytest.raises(ValueError, match="encoder.tail: 'head' in the checkpoint, 'last_stage' here"):
        other.on_load_checkpoint(checkpoint)


def test_evaluate_scores_the_in_tower_methods_on_cached_trunk_activations(sharded, small):
    module = MetaContrastiveModule(domains=DOMAINS, encoder=_encoder("head"), adapt_scope="tail_film",
                                   domain_dropout=0.0)
    dm = _datamodule(sharded, small)
    dm.attach(module.model.frozen_image_tower(), progress=False)
    sets = dm.episode_sets("val", [2], 4)
    results = evaluate(module, sets, ["feature_centroid", "tail_finetune", "tail_film", "dcmcl"],
                       EvalOptions(tail_finetune_steps=2, tail_film_steps=2), progress=False)
    assert {r.method for r in results} == {"feature_centroid", "tail_finetune", "tail_film", "dcmcl"}
    assert all(0.0 <= r.acc <= 1.0 for r in results)


def test_dcmcl_inside_a_cut_tower_scores_in_memory_bounded_pieces_with_the_same_predictions(monkeypatch):
    import metacontrastive.evaluation as evaluation
    calls = []
    batched = evaluation.func_predictions
    monkeypatch.setattr(evaluation, "func_predictions", lambda learner, views, steps: calls.append(len(views))
                        or batched(learner, views, steps))
    torch.manual_seed(0)
    module = MetaContrastiveModule(domains=DOMAINS, encoder=_encoder("head"), adapt_scope="tail_film",
                                   meta_engine="func", domain_dropout=0.0).eval()
    episodes = _episodes(module)
    together = predict("dcmcl", episodes)
    torch.testing.assert_close(predict("dcmcl", episodes, EvalOptions(tail_values=1)), together, rtol=0, atol=0)
    assert calls == [3, 1, 1, 1]  # the chunk at once, then one episode at a time


@pytest.mark.parametrize("method", ["tail_finetune", "tail_film"])
def test_the_head_tails_matmul_path_trains_as_the_general_path(method, monkeypatch):
    torch.manual_seed(0)
    module = MetaContrastiveModule(domains=DOMAINS, encoder=_encoder("head"), domain_dropout=0.0).eval()
    episodes = _episodes(module)
    tail = module.model.image_tail.double()
    with torch.no_grad():  # BatchNorm statistics away from (0, 1), so that folding them into the conv is exercised
        tail.bn_head.running_mean.uniform_(-1.0, 1.0)
        tail.bn_head.running_var.uniform_(0.5, 2.0)
    trunk = torch.stack([ep.h_trunk for ep in episodes]).double()  # (B, S + Q, C, h, w)
    labels, ways = episodes[0].support_labels, episodes[0].ways
    train = getattr(intower, method)
    lr = 1e-2 if method == "tail_finetune" else 1e-1
    assert intower._pointwise_head(tail)
    own = {name: p for name, p in tail.named_parameters()}
    with torch.no_grad():  # the matmul form of the head is the tail's own function
        torch.testing.assert_close(intower._head_pooled(tail)(own, intower._channels_last(trunk)[0]), tail(trunk[0]),
                                   rtol=1e-12, atol=1e-12)
    for steps in (0, 3):
        matmul = train(tail, trunk, labels, ways, steps, lr, 10.0)
        with monkeypatch.context() as m:
            m.setattr(intower, "_pointwise_head", lambda tail: False)  # the general path: vmap of the tail module
            general = train(tail, trunk, labels, ways, steps, lr, 10.0)
        assert torch.equal(matmul, general), steps
    untrained = train(tail, trunk, labels, ways, 0, lr, 10.0)
    assert not torch.equal(matmul, untrained)  # the three steps moved a prediction: the comparison is not of no-ops


def test_the_in_tower_baselines_gradients_hold_no_graph():
    # a gradient computed from the trained leaves themselves holds a graph back to its leaf, which holds it as
    # .grad: a cycle no collector frees (evaluate grew by about 0.5 MB per scored image until it ran out of memory)
    torch.manual_seed(0)
    module = MetaContrastiveModule(domains=DOMAINS, encoder=_encoder("head"), domain_dropout=0.0).eval()
    episodes = _episodes(module, 2)
    tail = module.model.image_tail
    trunk = intower._channels_last(torch.stack([ep.h_trunk for ep in episodes]))
    params = intower._stacked({name: p for name, p in tail.named_parameters()}, len(episodes))
    intower._train_and_predict(params, intower._head_pooled(tail), trunk, episodes[0].support_labels, episodes[0].ways,
                               2, 1e-3, 10.0)
    assert all(p.grad is not None and p.grad.grad_fn is None for p in params.values())


def test_the_evaluation_benchmark_times_the_in_tower_model_and_compares_with_an_earlier_run(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("evaluate_speed", Path(__file__).resolve().parents[1] / "bench" / "evaluate_speed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    before = tmp_path / "before.json"
    before.write_text(json.dumps({"ms_per_episode": {"tail_finetune": 1e6, "feature_centroid": 1e6}}))
    monkeypatch.setattr(sys, "argv", ["evaluate_speed", "--episodes", "2", "--chunk", "2", "--methods",
                                      "feature_centroid,tail_finetune", "--json", str(tmp_path / "now.json"),
                                      "--before", str(before)])
    bench.main()
    now = json.loads((tmp_path / "now.json").read_text())
    assert set(now["ms_per_episode"]) == {"feature_centroid", "tail_finetune"} and now["tail"] == "head"
    assert all(0 < ms < 1e6 for ms in now["ms_per_episode"].values())
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    assert lines["tail_finetune"].split()[-1].endswith("x") and "(before: 2400000 s)" in lines["all"]
