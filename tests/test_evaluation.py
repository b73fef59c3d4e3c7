"""The few-shot protocol: each method on hand-made episodes whose answer is known, the linear probe and the
tower-feature baselines against scikit-learn and numpy, identical episodes for every method, the CI formula,
held-out domains, and the copies that evaluation trains: together as if alone, what plain PyTorch training of
each copy gives, with the model's own forward."""
import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from torch import nn

from metacontrastive import evaluation, stacked
from metacontrastive.data.datamodule import EpisodicDataModule
from metacontrastive.data.episodes import Task
from metacontrastive.evaluation import METHODS, Episode, EvalOptions, evaluate, logistic_regression, methods_for, predict
from metacontrastive.losses import contrastive_loss
from metacontrastive.meta import TaskView, adapt_and_score, class_means
from metacontrastive.models.clip import EncoderConfig
from metacontrastive.module import MetaContrastiveModule

SMALL = dict(ways=3, shots=2, queries=3, image_size=16, test_episodes=6, val_episodes=2, tasks_per_batch=2)


def _task(ways=4, shots=3, queries=5, size=8, noise=0.02, seed=0, domain="natural"):
    """Each class a random pattern of its own plus a little noise per image."""
    g = torch.Generator().manual_seed(seed)
    support_labels, query_labels = torch.arange(ways).repeat_interleave(shots), torch.arange(ways).repeat_interleave(queries)
    patterns = torch.rand(ways, 3, size, size, generator=g)  # (N, 3, H, W)

    def images(labels):
        return (patterns[labels] + noise * torch.randn(len(labels), 3, size, size, generator=g)).clamp(0, 1)

    return Task(domain, 0, [f"a photo of class {c}" for c in range(ways)], images(support_labels), support_labels,
                images(query_labels), query_labels, [f"class {c}" for c in range(ways)])


def _separated(ways=4, shots=3, queries=5, dim=16, seed=0):
    """An episode whose embeddings are tight clusters around orthogonal class directions, with each class
    prompt on its class direction: every method that reads them must be exact."""
    task = _task(ways, shots, queries, seed=seed)
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(dim)[:ways]  # (N, D)
    labels = torch.cat([task.support_labels, task.query_labels])
    z_image = F.normalize(centres[labels] + 0.1 * torch.randn(len(labels), dim, generator=g), dim=-1)
    return Episode(task, h_image=z_image, h_text=centres, z_image=z_image, z_text=centres, scale=10.0)


def _accuracy(method, episodes, opts=EvalOptions()):
    predictions = predict(method, episodes, opts)
    targets = torch.stack([ep.task.query_labels for ep in episodes])
    return (predictions == targets).float().mean().item()


@pytest.mark.parametrize("method", ["pixels", "feature_centroid", "feature_probe", "zero_shot", "prototype", "linear_probe",
                                    "tip_adapter", "projection"])
def test_methods_are_exact_on_well_separated_clusters(method):
    assert _accuracy(method, [_separated(seed=0), _separated(seed=1)]) == 1.0


def test_zero_shot_reads_the_prompts_and_prototype_does_not():
    episode = _separated()
    episode.z_text = episode.z_text.roll(1, dims=0)  # every prompt now sits on the next class's cluster
    assert _accuracy("zero_shot", [episode]) == 0.0
    assert _accuracy("prototype", [episode]) == 1.0


def test_linear_probe_matches_scikit_learn():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    y = torch.arange(4).repeat_interleave(10)
    x += 0.8 * F.one_hot(y, 6)[:, :6].double()  # overlapping classes: the regulariser matters
    logits = logistic_regression(x, y, 4, c=1.0, iters=200)(x)
    reference = LogisticRegression(C=1.0, tol=1e-10, max_iter=5000).fit(x.numpy(), y.numpy())
    assert torch.allclose(logits.softmax(dim=1), torch.from_numpy(reference.predict_proba(x.numpy())), atol=1e-4)


def _on_features(h_image, ways, shots, queries, seed=0):
    """An episode whose tower features are ``h_image`` (support then query, class by class); other fields unused."""
    episode = _separated(ways, shots, queries, seed=seed)
    episode.h_image = h_image
    return episode


def _numpy_cl2n_centroid(support, labels, query):
    """SimpleShot's CL2N nearest centroid, by cosine, centred on the support mean: the reference implementation."""
    support, query = np.asarray(support, dtype=np.float64), np.asarray(query, dtype=np.float64)
    mean = support.mean(axis=0)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    s, q = unit(support - mean), unit(query - mean)
    centroids = unit(np.stack([s[labels == c].mean(axis=0) for c in np.unique(labels)]))
    return (q @ centroids.T).argmax(axis=1)


def test_feature_centroid_picks_what_a_numpy_cl2n_picks():
    g = torch.Generator().manual_seed(0)
    for seed in range(5):
        ways, shots, queries = 5, 3, 6
        labels = torch.cat([torch.arange(ways).repeat_interleave(shots), torch.arange(ways).repeat_interleave(queries)])
        means = torch.randn(ways, 32, generator=g).relu() + 1.0  # all-positive, like pooled features
        h = means[labels] + 0.8 * torch.randn(len(labels), 32, generator=g)  # overlapping classes: some answers wrong
        episode = _on_features(h, ways, shots, queries, seed)
        support, query = episode.split(h)
        expected = _numpy_cl2n_centroid(support.numpy(), episode.support_labels.numpy(), query.numpy())
        assert predict("feature_centroid", [episode])[0].tolist() == expected.tolist()


def test_feature_centroid_centres_on_the_support_mean():
    # class 0 near (1, 0), class 1 near (3, 0.3): a class-0 query at (1.2, 0.25) points (from the origin) closer to
    # class 1's direction, but from the support mean (2, 0.15) it lies on class 0's side
    support = torch.tensor([[1.0, 0.0], [1.0, 0.0], [3.0, 0.3], [3.0, 0.3]])
    query = torch.tensor([[1.2, 0.25], [1.2, 0.25], [3.1, 0.3], [3.1, 0.3]])
    episode = _on_features(torch.cat([support, query]), ways=2, shots=2, queries=2)
    uncentred = F.normalize(class_means(F.normalize(support, dim=-1), episode.support_labels, 2), dim=-1)
    assert (F.normalize(query, dim=-1) @ uncentred.t()).argmax(dim=1).tolist() == [1, 1, 1, 1]  # wrong without centring
    assert predict("feature_centroid", [episode])[0].tolist() == [0, 0, 1, 1]
    far = query.clone()
    far[0] = torch.tensor([-50.0, 40.0])
    moved = _on_features(torch.cat([support, far]), ways=2, shots=2, queries=2)
    assert predict("feature_centroid", [moved])[0].tolist()[1:] == [0, 1, 1]  # inductive: a query never moves the centre


def test_feature_probe_is_scikit_learn_on_the_centred_normalised_features():
    g = torch.Generator().manual_seed(1)
    ways, shots, queries = 4, 5, 5
    labels = torch.cat([torch.arange(ways).repeat_interleave(shots), torch.arange(ways).repeat_interleave(queries)])
    h = (torch.randn(ways, 24, generator=g).relu() + 1.0)[labels] + 0.7 * torch.randn(len(labels), 24, generator=g)
    episode = _on_features(h.double(), ways, shots, queries)
    opts = EvalOptions(feature_probe_c=3.0, probe_iters=500)
    support, query = episode.split(h.double().numpy())
    mean = support.mean(axis=0)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    reference = LogisticRegression(C=3.0, tol=1e-10, max_iter=5000).fit(unit(support - mean), episode.support_labels.numpy())
    assert predict("feature_probe", [episode], opts)[0].tolist() == reference.predict(unit(query - mean)).tolist()


def test_feature_probe_fits_separable_support_sets_perfectly():
    g = torch.Generator().manual_seed(2)
    ways, shots = 5, 4
    labels = torch.arange(ways).repeat_interleave(shots)
    support = torch.randn(ways * shots, 64, generator=g).relu() + 2.0  # random points in 64-d: linearly separable
    episode = _on_features(torch.cat([support, support]), ways, shots, shots)  # the queries are the support set
    assert predict("feature_probe", [episode])[0].tolist() == labels.tolist()


def test_the_tower_feature_baselines_are_methods_and_options():
    assert {"feature_centroid", "feature_probe"} <= set(METHODS)
    assert EvalOptions().feature_probe_c == 1.0


@pytest.fixture(scope="module")
def module():
    torch.manual_seed(0)
    return MetaContrastiveModule(domains=["natural", "medical"], encoder=EncoderConfig(embed_dim=32, hidden_dim=64), inner_lr=0.5).eval()


@pytest.fixture(scope="module")
def residual_module():
    """A residual image head (the identity at initialisation: its last layer is nudged off zero here)."""
    torch.manual_seed(0)
    encoder = EncoderConfig(embed_dim=128, hidden_dim=64, residual_image_head=True, center_support=True)
    module = MetaContrastiveModule(domains=["natural", "medical"], encoder=encoder, inner_lr=0.5).eval()
    with torch.no_grad():
        module.model.head_image.net[2].weight.normal_(std=0.05)
    return module


@pytest.fixture(params=["mlp", "residual"])
def either_module(request, module, residual_module):
    return module if request.param == "mlp" else residual_module


def test_finetune_trains_a_copy_per_episode_as_if_each_were_alone(module):
    episodes = [Episode.of(module, _task(seed=s), 0) for s in range(3)]
    before = {k: v.clone() for k, v in module.state_dict().items()}
    opts = EvalOptions(finetune_steps=30, finetune_lr=1e-2)
    together = predict("finetune", episodes, opts)
    alone = torch.cat([predict("finetune", [ep], opts) for ep in episodes])
    assert torch.equal(together, alone)
    assert (together == torch.stack([ep.task.query_labels for ep in episodes])).float().mean() == 1.0
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())  # the model itself is untouched
    assert all(p.grad is None for p in module.parameters())


def test_projection_trains_fresh_heads_per_episode_as_if_each_were_alone():
    episodes = [_separated(seed=s) for s in range(3)]
    assert torch.equal(predict("projection", episodes), torch.cat([predict("projection", [ep]) for ep in episodes]))


def test_projection_is_the_same_baseline_whatever_the_models_shared_space(module, residual_module):
    """Its fresh heads map into ``projection_dim``, not the evaluated model's space (32 and 128 here), so a
    checkpoint's row equals the study's, scored on an untrained model."""
    small, large = ([Episode.of(m, _task(seed=s, noise=0.3), 0) for s in range(2)] for m in (module, residual_module))
    assert (small[0].z_text.shape[1], large[0].z_text.shape[1]) == (32, 128)
    assert all(torch.equal(a.h_image, b.h_image) and torch.equal(a.h_text, b.h_text) for a, b in zip(small, large))
    opts = EvalOptions(projection_steps=5)
    assert torch.equal(predict("projection", small, opts), predict("projection", large, opts))
    # noisy enough that the heads' size shows (a 32-d space answers otherwise): the equality above is not vacuous
    assert not torch.equal(predict("projection", small, dataclasses.replace(opts, projection_dim=32)),
                           predict("projection", small, opts))
    heads = evaluation._FreshHeads(8, 8, 4, EvalOptions().projection_dim)
    assert heads.image.net[2].out_features == 128 and EvalOptions().projection_dim == EncoderConfig().embed_dim


def test_the_stacked_copies_compute_the_models_own_embeddings(either_module):
    model = either_module.model
    g = torch.Generator().manual_seed(0)
    h_image, h_text = torch.randn(2, 7, 128, generator=g), torch.randn(2, 3, 128, generator=g)  # (B, n, F)
    conds = torch.stack([evaluation._conditioning(model, row) for row in (0, 1)])  # (B, C), a domain per copy
    p = stacked.stacked_copies(evaluation._finetuned(model), 2)
    for modality, h, embed in (("image", h_image, model.embed_image), ("text", h_text, model.embed_text)):
        out = stacked.model_path(model, p, modality, conds).forward(h)
        assert torch.allclose(out, torch.stack([embed(h[0], 0), embed(h[1], 1)]), atol=1e-6)
    heads = evaluation._FreshHeads(128, 128, 16, 8)
    q = stacked.stacked_copies(heads, 2)
    assert torch.allclose(stacked.LayerPath.of(heads.image, q, "image.").forward(h_image),
                          F.normalize(heads.image(h_image), dim=-1), atol=1e-6)


def test_stacked_training_is_plain_pytorch_training_of_each_copy(either_module):
    """The stacked copies, their written-out backward and fused Adam give what each copy trained alone gives as an
    ``nn.Module`` with autograd and torch's reference Adam (float64: agreement to rounding)."""
    model = copy.deepcopy(either_module.model).double()
    g = torch.Generator().manual_seed(0)
    episodes, ways, shots, steps, lr = 3, 3, 2, 5, 1e-2
    labels = torch.arange(ways).repeat_interleave(shots)
    support = torch.randn(episodes, ways * shots, 128, generator=g, dtype=torch.float64)  # (B, S, F_I)
    texts = torch.randn(episodes, ways, 128, generator=g, dtype=torch.float64)  # (B, N, F_T)
    conds = torch.randn(episodes, model.domain.table.weight.shape[1], generator=g, dtype=torch.float64)  # (B, C)
    scale = model.scale().detach()
    parts = evaluation._finetuned(model)
    p = stacked.stacked_copies(parts, episodes)
    stacked.train_copies(p, stacked.model_path(model, p, "image", conds), support,
                             stacked.model_path(model, p, "text", conds), texts, scale, labels, steps, lr)
    for b in range(episodes):
        alone = copy.deepcopy(parts)
        optimizer = torch.optim.Adam(alone.parameters(), lr=lr, foreach=False)
        for _ in range(steps):
            z_image = model.embed_image(support[b], conds[b], fast=alone)
            z_text = model.embed_text(texts[b], conds[b], fast=alone)
            loss = contrastive_loss(z_image, z_text, scale, labels, torch.arange(ways))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        for name, value in alone.named_parameters():
            assert not torch.equal(value, dict(parts.named_parameters())[name])  # it trained
            copy_b = p[name][b].t() if value.ndim == 2 else p[name][b]  # weights are stored (in, out)
            torch.testing.assert_close(copy_b, value.detach(), rtol=1e-9, atol=1e-11)
    assert all(param.grad is None for param in model.parameters())


def test_frozen_parts_are_shared_views_and_stay_untrained():
    heads = evaluation._FreshHeads(6, 5, 4, 3)
    heads.text.requires_grad_(False)
    p = stacked.stacked_copies(heads, 2)
    assert all(p[k].requires_grad and p[k].grad is not None for k in p if k.startswith("image."))
    assert not any(p[k].requires_grad for k in p if k.startswith("text."))
    before = {k: v.clone() for k, v in p.items()}
    stacked.train_copies(p, stacked.LayerPath.of(heads.image, p, "image."), torch.randn(2, 4, 6),
                             stacked.LayerPath.of(heads.text, p, "text."), torch.randn(2, 2, 5), 10.0,
                             torch.tensor([0, 0, 1, 1]), steps=3, lr=0.1)
    assert all(torch.equal(p[k], before[k]) == k.startswith("text.") for k in p)
    with pytest.raises(TypeError, match="only Linear layers"):
        stacked.stacked_copies(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)), 2)


def test_dcmcl_is_the_meta_step_adaptation_and_zero_steps_is_zero_shot(module):
    episode = Episode.of(module, _task(), 0)
    expected = adapt_and_score(module.learner, TaskView(module.model, episode.task, 0), module.eval_steps).predictions()
    assert torch.equal(predict("dcmcl", [episode])[0], expected)
    assert torch.equal(predict("dcmcl", [episode], EvalOptions(inner_steps=0)), predict("zero_shot", [episode]))


@pytest.mark.parametrize("steps", [1, 3])
def test_dcmcl_adapts_a_chunk_at_once_as_each_episode_alone(either_module, steps):
    """A chunk's inner loops run together (torch.func) and predict what learn2learn's one-by-one adaptation does."""
    episodes = [Episode.of(either_module, _task(seed=s, noise=0.5), s % 2) for s in range(5)]
    alone = torch.stack([adapt_and_score(either_module.learner, ep.view, steps, first_order=True).predictions()
                         for ep in episodes])
    assert torch.equal(predict("dcmcl", episodes, EvalOptions(inner_steps=steps)), alone)


@pytest.fixture(scope="module")
def episode_sets(demo_root):
    dm = EpisodicDataModule(root=str(demo_root), **SMALL)
    return dm.episode_sets("test", [1, 2])


def _fingerprint(task):
    return hash(torch.cat([task.support_images, task.query_images]).numpy().tobytes())


def test_every_method_sees_the_same_episodes_in_the_same_order(module, episode_sets, monkeypatch):
    seen = {"a": [], "b": []}
    for name in seen:
        def spy(episodes, opts, name=name):
            seen[name] += [_fingerprint(ep.task) for ep in episodes]
            return torch.stack([ep.task.query_labels for ep in episodes])
        monkeypatch.setitem(METHODS, name, spy)
    evaluate(module, episode_sets, ["a", "b"], chunk=4, progress=False)
    first = list(seen["a"])
    seen["a"].clear()
    evaluate(module, episode_sets, ["a"], chunk=5, progress=False)  # another call, another chunking: same episodes
    assert seen["b"] == first == seen["a"] and len(first) == sum(len(s) for s in episode_sets)


def test_a_chunk_holds_at_most_chunk_images_and_the_scores_do_not_depend_on_it(module, episode_sets, monkeypatch):
    sizes = []
    centroid = METHODS["feature_centroid"]

    def spy(episodes, opts):
        sizes.append(sum(len(ep.task.support_labels) + len(ep.task.query_labels) for ep in episodes))
        return centroid(episodes, opts)
    monkeypatch.setitem(METHODS, "spy", spy)
    whole = evaluate(module, episode_sets, ["spy"], chunk=50, progress=False)
    assert max(sizes) > 30  # a chunk held several episodes
    sizes.clear()
    bounded = evaluate(module, episode_sets, ["spy"], chunk=50, chunk_images=30, progress=False)
    assert max(sizes) <= 30 and len(sizes) > len(episode_sets)
    assert [(r.acc, r.f1) for r in bounded] == [(r.acc, r.f1) for r in whole]


def test_results_hold_the_mean_and_the_95_ci_of_per_episode_scores(module, episode_sets):
    (result,) = evaluate(module, episode_sets[:1], ["prototype"], progress=False)
    episodes = episode_sets[0]
    accuracies = torch.tensor([_accuracy("prototype", [Episode.of(module, task, 0)]) for task in episodes])
    assert math.isclose(result.acc, accuracies.mean().item(), abs_tol=1e-6)
    assert math.isclose(result.acc_ci95, 1.96 * accuracies.std().item() / math.sqrt(len(episodes)), abs_tol=1e-6)
    assert (result.ways, result.shots, result.queries, result.episodes) == (3, 1, 3, 6)
    assert result.images == episodes.distinct_images() > 0


def test_a_held_out_domain_is_conditioned_on_the_unknown_row(module, demo_root, monkeypatch):
    rows = []
    monkeypatch.setitem(METHODS, "spy", lambda eps, opts: rows.append({ep.row for ep in eps}) or predict("zero_shot", eps))
    dm = EpisodicDataModule(root=str(demo_root), **SMALL)
    sets = dm.episode_sets("test")
    own = evaluate(module, sets, ["spy"], progress=False)
    held = evaluate(module, sets, ["spy"], holdout=["medical"], progress=False)
    unknown = module.model.unknown_domain
    assert [r.conditioning for r in own] == ["natural", "medical"] and [r.conditioning for r in held] == ["natural", "unknown"]
    assert rows[-1] == {unknown} and rows[1] == {1} and unknown == 2


def test_a_domain_the_model_was_not_trained_on_goes_through_unknown(demo_root):
    natural_only = MetaContrastiveModule(domains=["natural"]).eval()
    dm = EpisodicDataModule(domains=["natural"], test_domains=["natural", "medical"], root=str(demo_root), **SMALL)
    results = evaluate(natural_only, dm.episode_sets("test"), ["zero_shot"], progress=False)
    assert natural_only.domain_row("medical") == natural_only.model.unknown_domain == 1
    assert [(r.domain, r.conditioning) for r in results] == [("natural", "natural"), ("medical", "unknown")]


def test_unknown_methods_and_caption_tasks_are_clear_errors(module):
    with pytest.raises(ValueError, match="unknown evaluation method 'knn'"):
        predict("knn", [_separated()])
    caption = _task()
    caption.classes = []
    with pytest.raises(ValueError, match="needs labelled episodes"):
        Episode.of(module, caption, 0)


def test_evaluation_restores_the_training_mode_and_keeps_no_graph(module, episode_sets):
    module.train()
    results = evaluate(module, episode_sets[:1], methods_for(module), progress=False)
    assert module.training and len(results) == len(methods_for(module))
    assert all(p.grad is None for p in module.parameters())
    module.eval()


def test_evaluation_module_lists_what_it_exports():
    assert set(evaluation.__all__) >= {"METHODS", "Episode", "EvalOptions", "Result", "evaluate", "predict"}


def test_collapsed_zero_shot_prompts_are_named_in_a_warning(episode_sets, caplog):
    torch.manual_seed(0)
    collapsed = MetaContrastiveModule(domains=["natural", "medical"], encoder=EncoderConfig(embed_dim=32, hidden_dim=64))
    last = collapsed.model.head_text.net[-1]
    with torch.no_grad():  # every prompt maps to the same embedding
        last.weight.zero_()
        last.bias.fill_(1.0)
    with caplog.at_level("WARNING", logger="metacontrastive.evaluation"):
        evaluate(collapsed, episode_sets[:1], ["zero_shot", "prototype"], progress=False)
    assert "un-adapted class prompts have collapsed (mean cosine 1.000" in caplog.text and "zero_shot" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="metacontrastive.evaluation"):
        evaluate(collapsed, episode_sets[:1], ["prototype"], progress=False)  # no method reads the prompts
        evaluate(MetaContrastiveModule(domains=["natural", "medical"]), episode_sets[:1], ["zero_shot"], progress=False)
    assert "collapsed" not in caplog.text


def test_variable_way_variable_shot_episodes_score_every_method_in_groups_of_one_layout(module, demo_root):
    from metacontrastive.data.tasks import VariableShape
    from metacontrastive.reporting import markdown_table

    dm = EpisodicDataModule(root=str(demo_root), **SMALL)
    (variable,) = [s for s in dm.episode_sets("test", [1], count=8, variable=VariableShape(max_ways=4, queries=3)) if s.variable][:1]
    results = evaluate(module, [variable], methods_for(module), chunk=4, progress=False)
    assert {r.method for r in results} == set(methods_for(module)) and all(r.shots == 0 and r.episodes == 8 for r in results)
    assert all(0.0 <= r.acc <= 1.0 for r in results)
    assert "2-4-way variable-shot" in markdown_table(results)


def test_a_residual_image_head_starts_as_the_identity_and_centring_reads_the_support_mean():
    torch.manual_seed(0)
    encoder = EncoderConfig(embed_dim=128, residual_image_head=True, center_support=True, condition_image=False)
    module = MetaContrastiveModule(domains=["natural", "medical"], encoder=encoder).eval()
    task = _task()
    episode = Episode.of(module, task, 0)
    h = module.model.image_tower(torch.cat([task.support_images, task.query_images]))  # (S + Q, F)
    n = len(task.support_labels)
    assert torch.allclose(episode.h_image, h, atol=1e-6)  # the tower's own features, for the baselines
    assert torch.allclose(episode.h_model, h - h[:n].mean(dim=0), atol=1e-5)  # what the model reads
    assert torch.allclose(episode.z_image, F.normalize(h - h[:n].mean(dim=0), dim=-1), atol=1e-5)  # identity head
    with pytest.raises(ValueError, match="residual head keeps its input's size"):
        MetaContrastiveModule(domains=["natural"], encoder=EncoderConfig(embed_dim=64, residual_image_head=True))


def test_logistic_regression_solves_a_chunk_of_problems_as_each_alone():
    """B problems solved together as their sum reach each one's own minimiser (strictly convex, no shared weights)."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat_interleave(3)
    x = torch.randn(6, 12, 20, generator=g, dtype=torch.float64) + 2.0 * F.one_hot(y, 20).to(torch.float64)  # (B, n, F)
    q = torch.randn(6, 9, 20, generator=g, dtype=torch.float64)
    together = logistic_regression(x, y, 4, c=1.0, iters=100)(q)  # (B, Q, 4)
    alone = torch.stack([logistic_regression(x[b], y, 4, c=1.0, iters=100)(q[b]) for b in range(6)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-3)  # both stop within L-BFGS's tolerances
    assert torch.equal(together.argmax(-1), alone.argmax(-1))
