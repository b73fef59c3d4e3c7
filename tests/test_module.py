"""MetaContrastiveModule: gradients reach every trainable parameter; projection mode freezes the towers."""
from pathlib import Path

import pytest
import torch
import yaml

from metacontrastive.data.episodes import Task
from metacontrastive.meta import TaskView, adapt_and_score
from metacontrastive.models.clip import EncoderConfig
from metacontrastive.module import MetaContrastiveModule


def _task(domain_id, ways=3, shots=2, queries=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Task(
        domain=("natural", "medical")[domain_id], domain_id=domain_id,
        texts=[f"a photo of a class {i} thing" for i in range(ways)],
        support_images=torch.rand(ways * shots, 3, size, size, generator=g),
        support_labels=torch.arange(ways).repeat_interleave(shots),
        query_images=torch.rand(ways * queries, 3, size, size, generator=g),
        query_labels=torch.arange(ways).repeat_interleave(queries),
        classes=[f"class {i}" for i in range(ways)],
    )


def _batch():
    return [_task(0, seed=1), _task(1, seed=2), _task(0, seed=3), _task(1, seed=4)]


def _one_step(module):
    module.meta_step(_batch(), "train").backward()


@pytest.mark.parametrize("algorithm", ["maml", "metasgd"])
def test_full_method_gives_every_trainable_parameter_a_gradient(algorithm):
    torch.manual_seed(0)
    module = MetaContrastiveModule(algorithm=algorithm, domain_dropout=0.0)
    _one_step(module)
    missing = [n for n, p in module.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing


def test_projection_mode_freezes_towers():
    torch.manual_seed(0)
    module = MetaContrastiveModule(method="projection", encoder=EncoderConfig(condition_image=False, condition_text=False),
                                   align_weight=0.0)
    towers = {n: p.detach().clone() for n, p in module.named_parameters() if ".image_tower." in n or ".text_tower." in n}
    assert towers and not any(module.get_parameter(n).requires_grad for n in towers)
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.1)
    _one_step(module)
    optimizer.step()
    for name, before in towers.items():
        assert module.get_parameter(name).grad is None
        assert torch.equal(module.get_parameter(name), before), name
    assert module.model.head_image.net[0].weight.grad.abs().sum() > 0


def test_evaluation_adapts_under_no_grad_and_predicts_the_adapted_nearest_prompt():
    torch.manual_seed(0)
    module = MetaContrastiveModule(eval_inner_steps=3, inner_lr=0.05)
    task = _task(0)
    with torch.no_grad():  # as in Lightning's validation loop: adaptation must still get gradients
        adapted = adapt_and_score(module.learner, TaskView(module.model, task, 0), steps=3, first_order=True)
        result = module.task_step(module.task_view(task, train=False), train=False)
    losses = torch.stack(adapted.support_losses)
    assert len(losses) == 3 and (losses[1:] < losses[:-1]).all()  # each inner step lowers the support loss
    assert torch.equal(result.predictions, adapted.predictions())
    assert result.predictions.shape == task.query_labels.shape


def test_nan_loss_stops_with_the_step_and_terms_or_is_skipped_and_counted():
    batch = _batch()
    batch[0].query_images[:] = float("nan")
    with pytest.raises(FloatingPointError, match=r"outer loss is nan at step 0 \(query nan, align .*model.nonfinite=skip"):
        MetaContrastiveModule().meta_step(batch, "train")
    module = MetaContrastiveModule(nonfinite="skip")
    module.log = lambda *args, **kwargs: None
    with pytest.warns(UserWarning, match="step skipped, no update \\(1 skipped so far\\)"):
        assert module.training_step(batch, 0) is None  # Lightning takes no optimiser step for None
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    fresh = MetaContrastiveModule(nonfinite="skip")
    fresh.on_load_checkpoint({**checkpoint, "hyper_parameters": dict(fresh.hparams)})
    assert fresh.nonfinite_skipped == 1  # the count survives a resume


@pytest.mark.parametrize("options, message", [
    (dict(inner_steps=-1), r"model.inner_steps=-1: the dcmcl method adapts on every support set: use 1 or more"),
    (dict(inner_steps=0), r"model.inner_steps=0: the dcmcl method"),
    (dict(inner_lr=-1.0), r"model.inner_lr=-1.0: a learning rate must be a finite number above 0"),
    (dict(inner_lr=float("inf")), r"model.inner_lr=inf"),
    (dict(lr=0.0), r"model.lr=0.0"),
    (dict(tower_lr=-1e-4), r"model.tower_lr=-0.0001: .* or null for model.lr"),
    (dict(inner_label_lr=0.0), r"model.inner_label_lr=0.0: .* or null to leave the labels to the fast weights"),
    (dict(domain_dropout=1.5), r"model.domain_dropout=1.5: a probability"),
    (dict(eval_inner_steps=-1), r"model.eval_inner_steps=-1: use 0 or more"),
    (dict(align_weight=-0.1), r"model.align_weight=-0.1: use 0 or more"),
    (dict(domains=[]), r"model.domains=\[\]: name at least one domain"),
    (dict(prototype_prompts=0.0), r"model.prototype_prompts=0.0: give beta's starting value, > 0"),
])
def test_meaningless_settings_are_refused_naming_option_and_range(options, message):
    with pytest.raises(ValueError, match=message):
        MetaContrastiveModule(**options)


def test_validation_warns_when_the_inner_loop_cannot_help():
    from metacontrastive.checks import score_warnings as _warnings
    healthy = {"acc": 0.8, "chance": 0.2, "support_gain": 0.3, "label_cos": 0.5, "image_cos": 0.5, "constant": 0.0}
    assert _warnings(healthy, acc_ci95=0.02) == []
    exploding = _warnings({**healthy, "support_gain": -4.0}, 0.02)
    assert len(exploding) == 1 and "raises the support loss by 4.000" in exploding[0] and "inner_lr" in exploding[0]
    stuck = _warnings({**healthy, "acc": 0.21}, acc_ci95=0.02)
    assert len(stuck) == 1 and "is at chance (20.0%)" in stuck[0]
    collapsed = _warnings({**healthy, "acc": 0.2, "label_cos": 0.999, "constant": 1.0}, acc_ci95=0.0)
    assert sum("collapsing" in m for m in collapsed) == 2 and any("at chance" in m for m in collapsed)


def test_a_checkpoint_of_another_configuration_is_refused_naming_what_differs():
    checkpoint = {"hyper_parameters": dict(MetaContrastiveModule(encoder=EncoderConfig(embed_dim=64)).hparams)}
    with pytest.raises(ValueError, match=r"encoder.embed_dim: 64 in the checkpoint, 128 here.*config.yaml"):
        MetaContrastiveModule().on_load_checkpoint(checkpoint)
    MetaContrastiveModule(encoder=EncoderConfig(embed_dim=64, support_norm=True)).on_load_checkpoint(checkpoint)  # same shapes


@pytest.mark.parametrize("algorithm", ["maml", "metasgd"])
def test_the_state_dict_holds_each_tensor_once_and_loads_into_a_fresh_module(algorithm):
    state = MetaContrastiveModule(algorithm=algorithm).state_dict()
    pointers = [t.data_ptr() for t in state.values()]
    assert len(pointers) == len(set(pointers))  # the learner's FiLM and heads are the model's, stored once
    assert not any(k.startswith("learner") for k in state)
    assert any(k.startswith("inner_lrs.") for k in state) == (algorithm == "metasgd")
    fresh = MetaContrastiveModule(algorithm=algorithm)
    fresh.load_state_dict(state)  # strict
    assert fresh.learner.module["head_image"] is fresh.model.head_image  # the learner adapts what was loaded
    assert all(torch.equal(v, state[k]) for k, v in fresh.state_dict().items())


def test_param_groups_cover_every_trainable_parameter_once():
    module = MetaContrastiveModule(algorithm="metasgd", lr=1e-3, tower_lr=1e-4, domain_lr=1e-2, metasgd_lr=1e-5)
    groups = module.param_groups()
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in module.parameters() if p.requires_grad)
    lr = {g["name"]: g["lr"] for g in groups}
    assert lr["towers"] == 1e-4 and lr["domain_no_decay"] == 1e-2 and lr["metasgd_no_decay"] == 1e-5 and lr["fast"] == 1e-3
    assert all(g["weight_decay"] == 0.0 for g in groups if g["name"].endswith("_no_decay"))


@pytest.mark.parametrize("first_order", [False, True])
def test_adapting_everything_works_through_attention(first_order):
    # scope `all` differentiates through the towers' attention twice (second order)
    torch.manual_seed(0)
    module = MetaContrastiveModule(adapt_scope="all", first_order=first_order, domain_dropout=0.0)
    _one_step(module)
    assert module.model.text_tower.token.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("preset", sorted(p.stem for p in (Path(__file__).parents[1] / "conf" / "ablations").glob("*.yaml")))
def test_every_ablation_preset_trains_every_trainable_parameter(preset):
    """An unused trainable parameter would stop DDP (and silently never learn)."""
    config = yaml.safe_load((Path(__file__).parents[1] / "conf" / "ablations" / f"{preset}.yaml").read_text())
    torch.manual_seed(0)
    module = MetaContrastiveModule(**config.get("model", {}), domain_dropout=0.0)
    _one_step(module)
    unused = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused


@pytest.mark.parametrize("image_tower", ["tiny", "conv4"])
def test_towers_run_once_per_meta_batch_with_the_same_loss_and_gradients(monkeypatch, image_tower):
    import metacontrastive.module as module_code
    from metacontrastive.meta import towers_batch

    def step(batched: bool):
        torch.manual_seed(0)
        module = MetaContrastiveModule(encoder=EncoderConfig(image_tower=image_tower), domain_dropout=0.0).eval()
        monkeypatch.setattr(module_code, "towers_batch", lambda model, adapt: batched and towers_batch(model, adapt))
        calls = []
        module.model.image_tower.register_forward_hook(lambda *_: calls.append(1))
        loss = module.meta_step(_batch(), "train")
        loss.backward()
        return loss, {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}, len(calls)

    (loss_1, grads_1, calls_1), (loss_n, grads_n, calls_n) = step(True), step(False)
    assert (calls_1, calls_n) == (1, len(_batch()))
    torch.testing.assert_close(loss_1, loss_n, rtol=1e-5, atol=1e-6)
    assert grads_1.keys() == grads_n.keys()
    for name in grads_1:
        torch.testing.assert_close(grads_1[name], grads_n[name], rtol=1e-4, atol=1e-6, msg=name)
