"""MAML invariants (after learn2learn's own tests): a clone equals the original, an inner step lowers the
support loss, and outer gradients match a hand-written second-order (or first-order) computation."""
import pytest
import torch
from torch.func import functional_call

from metacontrastive.losses import contrastive_loss
from metacontrastive.meta import adapt, build_learner
from metacontrastive.models.clip import DomainConditionedCLIP, EncoderConfig

INNER_LR = 0.5


def _learner(model, scope="film+heads", algorithm="maml", inner_lr=0.1, first_order=False):
    return build_learner(model, scope, algorithm, inner_lr, first_order)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = DomainConditionedCLIP(2, EncoderConfig(embed_dim=16, hidden_dim=32, domain_dim=8))
    # break FiLM's zero init so that every fast parameter takes part in second-order terms
    for film in (model.film_image, model.film_text):
        torch.nn.init.normal_(film.to_gamma_beta.weight, std=0.1)
    h_img = torch.randn(12, model.image_tower.out_dim)  # 3-way: 2 support + 2 query images per class
    h_txt = torch.randn(3, model.text_tower.out_dim)
    labels = torch.arange(3).repeat_interleave(2)
    return model, h_img[:6], h_img[6:], h_txt, labels


def _loss(model, parts, h_img, h_txt, labels):
    z_i, z_t = model.embed(h_img, h_txt, 1, fast=parts)
    return contrastive_loss(z_i, z_t, model.scale(), labels, torch.arange(3))


def test_clone_equals_original(setup):
    model, hs, _, ht, y = setup
    learner = _learner(model, "film+heads").clone()
    for (n1, p1), (n2, p2) in zip(learner.module.named_parameters(), _learner(model).module.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    assert torch.equal(_loss(model, learner.module, hs, ht, y), _loss(model, None, hs, ht, y))


def test_inner_step_lowers_support_loss(setup):
    model, hs, _, ht, y = setup
    learner = _learner(model, "film+heads", inner_lr=1e-3).clone()
    before = _loss(model, learner.module, hs, ht, y)
    adapt(learner, lambda parts: _loss(model, parts, hs, ht, y), steps=1)
    assert _loss(model, learner.module, hs, ht, y) < before


@pytest.mark.parametrize("scope", ["film", "heads", "film+heads"])
def test_adapt_changes_only_the_scope(setup, scope):
    model, hs, _, ht, y = setup
    learner = _learner(model, scope).clone()
    adapt(learner, lambda parts: _loss(model, parts, hs, ht, y), steps=1)
    changed = {name.split(".")[0] for name, p in learner.module.named_parameters()
               if not torch.equal(p, model.get_parameter(name))}
    assert changed == set(learner.module.keys())


def _fast_names(model):
    return [n for n, _ in model.named_parameters() if n.split(".")[0] in ("film_image", "film_text", "head_image", "head_text")]


def _hand_meta_gradient(model, hs, hq, ht, y, first_order):
    """One inner SGD step on the support loss, query loss at the adapted weights, gradient w.r.t. phi."""
    names = _fast_names(model)
    params = dict(model.named_parameters())
    phi = [params[n] for n in names]

    def loss_at(weights, h):
        return _loss_with(model, dict(zip(names, weights)), h, ht, y)

    support = loss_at(phi, hs)
    grads = torch.autograd.grad(support, phi, create_graph=not first_order)
    adapted = [p - INNER_LR * (g.detach() if first_order else g) for p, g in zip(phi, grads)]
    query = loss_at(adapted, hq)
    return torch.autograd.grad(query, phi)


def _loss_with(model, weights, h, ht, y):
    """The loss with ``weights`` substituted functionally (torch.func), independent of learn2learn."""
    class Embed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, h_img, h_txt):
            return self.m.embed(h_img, h_txt, 1)

    z_i, z_t = functional_call(Embed(), {f"m.{k}": v for k, v in weights.items()}, (h, ht), strict=False)
    return contrastive_loss(z_i, z_t, model.scale(), y, torch.arange(3))


@pytest.mark.parametrize("first_order", [False, True])
def test_outer_gradient_matches_hand_computation(setup, first_order):
    model, hs, hq, ht, y = setup
    expected = _hand_meta_gradient(model, hs, hq, ht, y, first_order)

    learner = _learner(model, "film+heads", inner_lr=INNER_LR, first_order=first_order).clone()
    adapt(learner, lambda parts: _loss(model, parts, hs, ht, y), steps=1)
    model.zero_grad()
    _loss(model, learner.module, hq, ht, y).backward()
    params = dict(model.named_parameters())
    for name, g in zip(_fast_names(model), expected):
        assert params[name].grad is not None, name
        torch.testing.assert_close(params[name].grad, g, atol=1e-5, rtol=1e-5, msg=name)


def test_second_and_first_order_differ(setup):
    model, hs, hq, ht, y = setup
    second = _hand_meta_gradient(model, hs, hq, ht, y, first_order=False)
    first = _hand_meta_gradient(model, hs, hq, ht, y, first_order=True)
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(second, first))


def test_unknown_scope_and_algorithm_are_errors(setup):
    model = setup[0]
    with pytest.raises(ValueError, match="unknown adapt_scope"):
        _learner(model, "towers")
    with pytest.raises(ValueError, match="unknown algorithm"):
        _learner(model, "heads", algorithm="reptile")


def test_metasgd_learns_a_rate_per_parameter_and_rejects_frozen_parts(setup):
    model, hs, hq, ht, y = setup
    learner = _learner(model, "heads", algorithm="metasgd", inner_lr=0.01)
    assert [lr.shape for lr in learner.lrs] == [p.shape for p in learner.module.parameters()]
    clone = learner.clone()
    adapt(clone, lambda parts: _loss(model, parts, hs, ht, y), steps=1)
    _loss(model, clone.module, hq, ht, y).backward()
    assert all(lr.grad is not None and lr.grad.abs().sum() > 0 for lr in learner.lrs)
    for p in model.image_tower.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        _learner(model, "all", algorithm="metasgd")
    assert _learner(model, "all", algorithm="maml")  # MAML carries frozen parts (allow_nograd)


def _meta_batch(seed=0, dtype=torch.float32):
    from metacontrastive.data.episodes import Task

    g = torch.Generator().manual_seed(seed)
    images = lambda: torch.rand(6, 3, 16, 16, generator=g, dtype=dtype)  # noqa: E731
    return [Task(domain=("natural", "medical")[t % 2], domain_id=t % 2, texts=[f"a photo of a thing {t} {c}" for c in range(3)],
                 support_images=images(), support_labels=torch.arange(3).repeat_interleave(2),
                 query_images=images(), query_labels=torch.arange(3).repeat_interleave(2),
                 classes=[f"thing {t} {c}" for c in range(3)]) for t in range(4)]


def _outer_gradients(**options) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss of a float64 module on ``_meta_batch`` and every parameter's outer gradient."""
    from metacontrastive.module import MetaContrastiveModule

    torch.manual_seed(0)
    module = MetaContrastiveModule(domain_dropout=0.0, inner_lr=0.5, **options).double()
    for film in (module.model.film_image, module.model.film_text):  # break FiLM's zero init (see setup)
        torch.nn.init.normal_(film.to_gamma_beta.weight, std=0.1)
    module.log = lambda *args, **kwargs: None
    loss = module.meta_step(_meta_batch(dtype=torch.float64), "train")
    loss.backward()
    return loss, {n: p.grad for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("algorithm, first_order, steps, prototype, label_lr", [
    ("maml", False, 1, None, None), ("maml", True, 1, None, None), ("maml", False, 3, 1.0, None),
    ("metasgd", False, 2, None, None),
    # the label embeddings adapted as fast weights of their own (inner_label_lr: Proto-MAML's classifier)
    ("maml", False, 2, 1.0, 0.5), ("maml", True, 2, 1.0, 0.5), ("metasgd", False, 1, None, 0.5),
])
def test_the_func_engine_gives_learn2learns_loss_and_outer_gradients(algorithm, first_order, steps, prototype, label_lr):
    """In float64, so that only the mathematics is compared (in float32 vmap's batched products reorder sums
    and the two engines differ by about 1e-5 relative on the tower gradients)."""
    options = dict(algorithm=algorithm, first_order=first_order, inner_steps=steps, prototype_prompts=prototype,
                   inner_label_lr=label_lr)
    (loss_l2l, grads_l2l), (loss_func, grads_func) = (_outer_gradients(meta_engine=e, **options) for e in ("l2l", "func"))
    torch.testing.assert_close(loss_func, loss_l2l, rtol=1e-10, atol=1e-12)
    assert grads_func.keys() == grads_l2l.keys()
    for name in grads_l2l:
        torch.testing.assert_close(grads_func[name], grads_l2l[name], rtol=1e-5, atol=1e-8)


def test_adapted_labels_are_fast_weights_of_their_own_from_the_prototypes():
    """With ``inner_label_lr`` the inner loop moves each task's label embeddings: with the scope's own rate near 0,
    the support loss falls only through them; their start is the labels of the slow weights (the outer loop trains
    it), and both engines predict the same classes."""
    from metacontrastive.meta import adapt_and_score, func_predictions
    from metacontrastive.module import MetaContrastiveModule

    task = _meta_batch()[0]
    gains, outer = {}, {}
    for label_lr in (None, 2.0):
        torch.manual_seed(0)
        module = MetaContrastiveModule(domain_dropout=0.0, inner_lr=1e-9, prototype_prompts=1.0, inner_label_lr=label_lr)
        view = module.view_of(task, 0)
        adapted = adapt_and_score(module.learner, view, steps=3, first_order=True, final_support_loss=True)
        gains[label_lr] = float(adapted.support_losses[0] - adapted.support_losses[-1])
        adapted.loss.backward()
        outer[label_lr] = module.log_prototype_weight.grad.clone()  # beta reaches the query loss through the start
        assert torch.equal(func_predictions(module.learner, [view], 3)[0], adapted.predictions())
    assert abs(gains[None]) < 1e-6 and gains[2.0] > 0.05, gains
    assert not torch.allclose(outer[None], outer[2.0])


def test_the_func_engine_is_used_for_same_shaped_tasks_and_falls_back_otherwise(monkeypatch):
    import metacontrastive.module as module_code
    from metacontrastive.module import MetaContrastiveModule

    calls = []
    real = module_code.func_adapt_and_score
    monkeypatch.setattr(module_code, "func_adapt_and_score", lambda *a, **k: calls.append(1) or real(*a, **k))
    module = MetaContrastiveModule(meta_engine="func", domain_dropout=0.0)
    module.log = lambda *args, **kwargs: None
    module.meta_step(_meta_batch(), "train")
    assert calls == [1]
    odd = _meta_batch()
    odd[0].query_images, odd[0].query_labels = odd[0].query_images[:3], torch.arange(3)  # one query per class
    assert torch.isfinite(module.meta_step(odd, "train"))
    assert calls == [1]  # fell back to learn2learn, one task after another


@pytest.mark.parametrize("options", [
    dict(algorithm="maml", first_order=False, inner_steps=2),
    dict(algorithm="metasgd", first_order=True, align="coral", align_on="base"),
    dict(algorithm="maml", prototype_prompts=1.0, align_weight=0.0),
    dict(method="contrastive"),
    dict(adapt_scope="all", inner_steps=1),
])
def test_a_backward_per_task_gives_the_meta_batch_gradients(options):
    """``backward_per_task`` frees each task's graph as soon as it is differentiated; the loss and every outer
    gradient (towers included) must equal those of one backward through the whole meta-batch."""
    (loss_batch, grads_batch), (loss_task, grads_task) = (_outer_gradients(backward_per_task=b, **options) for b in (False, True))
    torch.testing.assert_close(loss_task, loss_batch, rtol=1e-12, atol=1e-12)
    assert grads_task.keys() == grads_batch.keys()
    assert any(name.startswith("model.image_tower") for name in grads_batch)  # the towers' gradients are compared too
    for name in grads_batch:
        torch.testing.assert_close(grads_task[name], grads_batch[name], rtol=1e-9, atol=1e-12)
