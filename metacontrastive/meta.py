"""Adaptation: which parts adapt, MAML or MetaSGD around them, and adapt-and-score of one task.

The fast weights are a ``nn.ModuleDict`` of the model's parts named by ``ADAPT_SCOPES``; learn2learn
clones that dict per task and ``DomainConditionedCLIP.embed(..., fast=clone)`` uses the adapted copies
in place of the originals. Parts outside the scope (the towers, by default) are the slow weights: the
outer loop trains them, the inner loop does not touch them, and their features are computed once per
task (``TaskView``).

``adapt_and_score`` is the per-task algorithm of DCMCL, used alike by training (second order, the
query loss keeps its graph), validation and the ``dcmcl`` method of ``metacontrastive.evaluation``.
"""
from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from metacontrastive.data.episodes import Task
from metacontrastive.losses import contrastive_loss
from metacontrastive.models.clip import DomainConditionedCLIP

with contextlib.redirect_stderr(io.StringIO()):  # learn2learn imports gym, which prints a notice on import
    from learn2learn.algorithms import MAML, MetaSGD
    from learn2learn.algorithms.maml import maml_update
    from learn2learn.algorithms.meta_sgd import meta_sgd_update

__all__ = ["ADAPT_SCOPES", "ALGORITHMS", "ENGINES", "AdaptScope", "Adapted", "Algorithm", "Engine", "FunctionalParts",
           "Rows", "TaskView", "adapt", "adapt_and_score", "batch_features", "blend_domains", "build_learner",
           "class_means", "func_adapt_and_score", "func_batchable", "func_predictions", "task_cached", "task_images", "towers_batch"]

ADAPT_SCOPES: dict[str, tuple[str, ...]] = {
    "film": ("film_image", "film_tail", "film_text"),
    "heads": ("head_image", "head_text"),
    "film+heads": ("film_image", "film_tail", "film_text", "head_image", "head_text"),
    # inside the image tower (``models.tail``): the tail's FiLM; only the domain embedding that generates every FiLM
    # (CAVIA, Zintgraf et al. 2019: a small context vector adapted per task, the rest meta-learned); the tail's weights
    "tail_film": ("film_tail",),
    "context": ("domain",),
    "tail": ("image_tail",),
    "all": ("image_tower", "text_tower", "image_tail", "domain", "film_image", "film_tail", "film_text", "head_image",
            "head_text"),
}
ALGORITHMS = {"maml": MAML, "metasgd": MetaSGD}
ENGINES = ("l2l", "func")  # learn2learn's clone-and-update, or torch.func over the tasks of a meta-batch
Engine = Literal[ENGINES]
AdaptScope = Literal[tuple(ADAPT_SCOPES)]  # the allowed values, for LightningCLI, written once above
Algorithm = Literal[tuple(ALGORITHMS)]

Parts = Mapping[str, nn.Module]  # adapted replacements for parts of the model, by attribute name


def build_learner(model: nn.Module, scope: str, algorithm: str, inner_lr: float, first_order: bool) -> MAML | MetaSGD:
    """Wrap the parts of ``model`` named by ``scope`` in a learn2learn MAML or MetaSGD learner.

    Args:
        model: a ``DomainConditionedCLIP``.
        scope: a key of ``ADAPT_SCOPES``.
        algorithm: ``maml`` (one learning rate) or ``metasgd`` (a learned rate per parameter).
        inner_lr: the inner-loop learning rate alpha (MetaSGD's initial rate).
        first_order: drop second-order terms from the outer gradient.
    """
    if scope not in ADAPT_SCOPES:
        raise ValueError(f"unknown adapt_scope {scope!r}; choose one of {sorted(ADAPT_SCOPES)}")
    parts = nn.ModuleDict({name: getattr(model, name) for name in ADAPT_SCOPES[scope] if getattr(model, name) is not None})
    if not any(p.requires_grad for p in parts.parameters()):
        hint = {"tail_film": "it needs model.encoder.tail=head or last_stage and condition_image",
                "tail": "it needs model.encoder.tail=head or last_stage and model.encoder.train_tail=true",
                "context": "it needs domain conditioning"}.get(scope, "is conditioning off or the part frozen?")
        raise ValueError(f"adapt_scope {scope!r} holds no trainable parameter ({hint})")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {sorted(ALGORITHMS)}")
    if algorithm == "metasgd":
        if not all(p.requires_grad for p in parts.parameters()):
            raise ValueError(f"metasgd adapts every parameter of its scope, but {scope!r} holds frozen ones; "
                             "use algorithm=maml or a scope without the frozen towers")
        return MetaSGD(parts, lr=inner_lr, first_order=first_order)
    # allow_nograd: frozen parts inside the scope (a frozen tower under `all`) are carried, not adapted
    return MAML(parts, lr=inner_lr, first_order=first_order, allow_nograd=True)


def adapt(
    learner: MAML | MetaSGD,
    support_loss: Callable[[nn.ModuleDict], torch.Tensor],
    steps: int,
    first_order: bool | None = None,
) -> list[torch.Tensor]:
    """Take ``steps`` gradient steps of a cloned learner on its support loss, in place.

    Args:
        learner: a clone from ``build_learner(...).clone()``.
        support_loss: maps the learner's current parts to the support loss.
        steps: inner-loop steps k.
        first_order: override the learner's setting (evaluation adapts first order: it never needs
            the second-order graph, and the adapted weights are the same).

    Returns:
        The detached support loss before each step, for logging; no host sync happens here.
    """
    first_order = learner.first_order if first_order is None else first_order
    # Second-order MAML differentiates the support forward twice; the fused attention kernels have no
    # double backward, so attention inside the scope (adapt_scope=all) must use the math kernel.
    kernel = contextlib.nullcontext() if first_order else sdpa_kernel(SDPBackend.MATH)
    losses = []
    with kernel:
        for _ in range(steps):
            loss = support_loss(learner.module)
            learner.adapt(loss, first_order=first_order)
            losses.append(loss.detach())
    return losses


def towers_batch(model: DomainConditionedCLIP, towers_adapt: bool) -> bool:
    """Whether the tasks of a meta-batch can share one call of each tower: the towers are slow weights, and
    the image tower normalises each image on its own (no BatchNorm whose statistics would mix tasks, and no
    ``support_norm``, which normalises each task with its own support set outside training)."""
    if towers_adapt:
        return False
    normalises_batch = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.image_tower.modules())
    per_task_norm = model.config.support_norm and not model.training
    return not normalises_batch or (not model.image_tower.training and not per_task_norm)


def task_images(task: Task) -> torch.Tensor | None:
    """(S + Q, 3, H, W) a task's support then query images, or None when it carries only cached features."""
    return None if task.support_images is None else torch.cat([task.support_images, task.query_images])


def task_cached(task: Task) -> tuple[torch.Tensor, str] | None:
    """(S + Q, F_I) a task's cached image features with the tower id that made them, or None."""
    return (torch.cat([task.support_features, task.query_features]), task.features_of) if task.cached else None


def batch_features(model: DomainConditionedCLIP, tasks: list[Task]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every task's tower features from one call of each tower over the whole meta-batch, split per task
    (what ``towers_batch`` allows): one large batch keeps an accelerator busier than several small ones. Tasks
    that carry cached image features take them, the others share one image tower call."""
    h_image: list[torch.Tensor | None] = [None] * len(tasks)
    decoded = [i for i, t in enumerate(tasks) if not t.cached]
    if decoded:
        images = torch.cat([task_images(tasks[i]) for i in decoded])  # (sum S + Q, 3, H, W)
        for i, h in zip(decoded, model.image_features(images).split([tasks[i].size for i in decoded])):
            h_image[i] = h
    for i, task in enumerate(tasks):
        if task.cached:
            h_image[i] = model.image_features(None, cached=task_cached(task))
    h_text = model.text_features([text for t in tasks for text in t.texts]).split([len(t.texts) for t in tasks])
    return list(zip(h_image, h_text))


def class_means(x: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
    """(classes, D) the mean of the rows of ``x`` (n, D) with each label (zeros for a label with no row)."""
    sums = torch.zeros(classes, x.shape[1], dtype=x.dtype, device=x.device).index_add(0, labels, x)
    return sums / torch.bincount(labels, minlength=classes).clamp(min=1)[:, None].to(x.dtype)


@dataclass(frozen=True)
class Rows:
    """Some rows of a task: which images, their labels, and the texts those labels point at.

    Attributes:
        index: the rows of ``TaskView.images``.
        labels: (n,) each row's label, an index into the task's texts.
        texts: (m,) the sorted distinct labels: the rows of the task's texts this subset uses.
    """

    index: slice
    labels: torch.Tensor
    texts: torch.Tensor

    @classmethod
    def of(cls, index: slice, labels: torch.Tensor) -> Rows:
        # torch.unique syncs with the device: done once per subset, not once per inner step
        return cls(index, labels, torch.unique(labels))


class TaskView:
    """One task as the model reads it: its images (support, then query), its texts and three row subsets.

    The towers run once per task (``tower_features``) unless they sit inside the adapted scope, in which case
    they run again for every set of fast weights. With an image tail (``models.tail``), the tail runs once per
    task too, unless what its output depends on adapts (its FiLM, the domain embedding that generates the FiLM,
    its own weights): then it runs for every set of fast weights, from its prefix when its own weights stay put.
    Everything downstream takes ``fast``, the adapted parts, or None for the model's own weights.

    A label's embedding (what images are matched against) is the mean of its prompts' normalised embeddings
    (prompt ensembling, when the task has several prompts per class), and, with ``prototype_weight``, moved
    toward the normalised mean of its support images: c = normalise(t + beta * p). So the class prompts of
    a labelled task start near its support images before any inner step. With ``label_lr`` the inner loop adapts
    those label embeddings too, as fast weights of their own started there (Proto-MAML's classifier initialised at
    the prototypes, Triantafillou et al. 2020): ``labels`` gives the start, and ``loss`` / ``embed`` take the
    adapted ones (normalised where they are used: a cosine classifier) in place of recomputing them.

    Args:
        model: the dual encoder.
        task: the task.
        domain_row: the row of the model's domain table that conditions this task (``unknown`` for
            domains the model was not trained on, or under domain dropout), or a (C,) conditioning vector.
        adapted: the parts of the model the inner loop adapts (``ADAPT_SCOPES[scope]``).
        prototype_weight: beta, or None for prompts alone.
        features: the task's tower features when the caller computed them already (``batch_features``).
        label_lr: the inner-loop rate of the label embeddings, or None to recompute them from the fast weights.
    """

    def __init__(self, model: DomainConditionedCLIP, task: Task, domain_row: int | torch.Tensor,
                 adapted: tuple[str, ...] = (), prototype_weight: torch.Tensor | None = None,
                 features: tuple[torch.Tensor, torch.Tensor] | None = None, label_lr: float | None = None) -> None:
        self.model, self.task = model, task
        self.label_lr = label_lr if task.labelled else None  # caption batches have no labels to adapt
        self.towers_adapt = "image_tower" in adapted or "text_tower" in adapted
        self.prototype_weight = prototype_weight if task.labelled else None
        self.images = task_images(task)  # (S + Q, 3, H, W), or None with cached features
        n = len(task.support_labels)
        self.support = Rows.of(slice(0, n), task.support_labels)
        self.query = Rows.of(slice(n, None), task.query_labels)
        self.both = Rows.of(slice(None), torch.cat([task.support_labels, task.query_labels]))
        tail, film = model.image_tail, model.film_tail is not None
        # what a tail's output depends on: its weights, its FiLM and the domain embedding that generates the FiLM
        self.tail_adapts = tail is not None and ("image_tail" in adapted or film and ("film_tail" in adapted or "domain" in adapted))
        self._prefixed = tail is not None and "image_tail" not in adapted
        self._row = domain_row
        self._features: tuple[torch.Tensor, torch.Tensor] | None = None  # what FiLM and the heads read, when fixed
        self._start: torch.Tensor | None = None  # what the tail starts from, when it runs per set of fast weights
        if self.towers_adapt:
            if self.images is None:
                raise ValueError("the towers adapt in the inner loop (adapt_scope=all), so tasks need images, not cached "
                                 "features: set data.feature_cache=off")
            return
        self.tower_features = features if features is not None else model.features(
            self.images, task.texts, support=n, cached=task_cached(task))
        h_image, self._text = self.tower_features  # (S + Q, F_I) or trunk activations (S + Q, C, h, w); (M, F_T)
        self._start = tail.prefix(h_image) if self._prefixed else h_image
        if not self.tail_adapts:
            self._features = self._tail(None), self._text

    @property
    def domain_row(self) -> int | torch.Tensor:
        return self._row

    @domain_row.setter
    def domain_row(self, row: int | torch.Tensor) -> None:
        """Condition the task on another row (or vector): features that a tail FiLM made for the old one are remade."""
        self._row = row
        if self._features is not None and self.model.film_tail is not None:
            self._features = self._tail(None), self._text

    def _tail(self, fast: Parts | None, start: torch.Tensor | None = None) -> torch.Tensor:
        """(S + Q, F_I) the pooled features FiLM and the heads read: the tail (if any) on the task's trunk activations
        (or on ``start``), centred on the support set with ``center_support`` (SimpleShot's centring)."""
        h_image = self.model.tail_features(self._start if start is None else start, self._row, fast, self._prefixed)
        if not self.model.config.center_support:
            return h_image
        return h_image - h_image[self.support.index].mean(dim=0)

    def features(self, fast: Parts | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The features FiLM and the heads read: h_I (S + Q, F_I), centred on the support set with
        ``center_support``, and h_T (M, F_T). ``tower_features`` holds the towers' own (when they are slow weights)."""
        if self._features is not None:
            return self._features
        if self._start is not None:  # the tail adapts
            return self._tail(fast), self._text
        h_image, h_text = self.model.features(self.images, self.task.texts, fast=fast, support=len(self.task.support_labels))
        return self._tail(fast, self.model.image_tail.prefix(h_image) if self._prefixed else h_image), h_text

    def tower_pooled(self) -> torch.Tensor:
        """(S + Q, F_I) the frozen image tower's own pooled features, no conditioning (the tail without FiLM)."""
        return self.model.tail_features(self._start, None, None, self._prefixed)

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The per-task tensors the adaptation starts from (what the torch.func engine stacks over tasks): the fixed
        features, or the tail's start and the text features; None when the towers adapt."""
        if self._features is not None:
            return self._features
        return None if self._start is None else (self._start, self._text)

    def with_inputs(self, h_image: torch.Tensor, h_text: torch.Tensor, row: int | torch.Tensor) -> TaskView:
        """A copy of this view on other ``inputs`` (another task of the same layout) and domain row."""
        view = copy.copy(self)
        view._row, view._text = row, h_text  # the inputs were made for that row already: nothing to remake
        if self._features is not None:
            view._features = h_image, h_text
        else:
            view._start = h_image
        return view

    def texts(self, fast: Parts | None = None, features: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """(L, D) one normalised text embedding per label: its prompts' embeddings averaged (prompt ensembling)."""
        h_text = (features or self.features(fast))[1]
        z_text = self.model.embed_text(h_text, self.domain_row, fast)  # (L * P, D)
        prompts = self.task.prompts
        if prompts == 1:
            return z_text
        return F.normalize(z_text.view(-1, prompts, z_text.shape[-1]).mean(dim=1), dim=-1)  # (L, D)

    def labels(self, fast: Parts | None = None, features: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """(L, D) each label's embedding: its text embedding, moved toward its support prototype by beta."""
        features = features or self.features(fast)
        z_text = self.texts(fast, features)
        if self.prototype_weight is None:
            return z_text
        z_support = self.model.embed_image(features[0][self.support.index], self.domain_row, fast)  # (S, D)
        prototypes = F.normalize(class_means(z_support, self.support.labels, len(z_text)), dim=-1)  # (L, D)
        return F.normalize(z_text + self.prototype_weight * prototypes, dim=-1)

    def embed(self, rows: Rows, fast: Parts | None = None, labels: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised image embeddings of ``rows`` (n, D) and the embeddings of the labels they point at (m, D):
        ``labels`` (L, D), the adapted label embeddings (``label_lr``), or those of ``fast``."""
        features = self.features(fast)  # once: with an adapting tail, each call runs it
        z_image = self.model.embed_image(features[0][rows.index], self.domain_row, fast)
        z_labels = self.labels(fast, features) if labels is None else F.normalize(labels, dim=-1)
        return z_image, z_labels[rows.texts]

    def loss(self, rows: Rows, fast: Parts | None = None, labels: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The contrastive loss on ``rows`` and the embeddings it was computed from (``labels``: as ``embed``)."""
        z_image, z_text = self.embed(rows, fast, labels)
        return contrastive_loss(z_image, z_text, self.model.scale(), rows.labels, rows.texts), z_image, z_text


def blend_domains(view: TaskView, rows: list[int]) -> torch.Tensor:
    """Condition ``view`` on a blend of known domain embeddings (after FLUTE's blender, Triantafillou et al.
    2021): each known domain weighted by how well its conditioning explains the support set,
    w_d = softmax_d(-S * L_d), L_d the mean support loss under domain d and S the support size (so the
    weights are a posterior over domains given the support labels). Sets ``view.domain_row`` to the
    blended (C,) vector, the start of the inner loop.

    Returns:
        (len(rows),) the weights.
    """
    table = view.model.domain.table.weight  # (D + 1, C)
    with torch.no_grad():
        losses = []
        for row in rows:
            view.domain_row = row
            losses.append(view.loss(view.support)[0])
        weights = torch.softmax(-len(view.support.labels) * torch.stack(losses), dim=0)  # (len(rows),)
    view.domain_row = weights @ table[rows]  # (C,)
    return weights


@dataclass
class Adapted:
    """What adapting to one task's support set gives on its query set.

    Attributes:
        loss: the query loss at the adapted weights (with its graph when the caller trains).
        z_query: (Q, D) adapted query image embeddings.
        z_text: (m, D) adapted embeddings of the texts the query labels point at.
        text_ids: (m,) which texts those are.
        support_losses: the detached support loss before each inner step, and after the last one when
            the caller asked for it (``adapt_and_score(..., final_support_loss=True)``).
    """

    loss: torch.Tensor
    z_query: torch.Tensor
    z_text: torch.Tensor
    text_ids: torch.Tensor
    support_losses: list[torch.Tensor]

    def predictions(self) -> torch.Tensor:
        """(Q,) the text (class) each query is nearest to: the few-shot prediction."""
        return self.text_ids[(self.z_query @ self.z_text.t()).argmax(dim=1)]


def adapt_and_score(
    learner: MAML | MetaSGD, view: TaskView, steps: int, first_order: bool | None = None, final_support_loss: bool = False
) -> Adapted:
    """Clone the fast weights, take ``steps`` inner steps on the support loss, score the query set.

    Args:
        learner: the model's learner (``build_learner``); it is cloned here, never changed.
        view: the task.
        steps: inner-loop steps k (0: score the meta-learned initialisation itself).
        first_order: override the learner's setting (``adapt``).
        final_support_loss: also record the support loss after the last step (one more forward, no graph).
    """
    with torch.enable_grad():  # Lightning's evaluation loops run under no_grad; the inner loop needs gradients
        clone = learner.clone()
        if view.label_lr is None:
            labels = None
            support_losses = adapt(clone, lambda parts: view.loss(view.support, parts)[0], steps, first_order)
        else:
            support_losses, labels = _adapt_with_labels(clone, view, steps, first_order)
        loss, z_query, z_text = view.loss(view.query, clone.module, labels)
    if final_support_loss:
        with torch.no_grad():
            support_losses.append(view.loss(view.support, clone.module, labels)[0])
    return Adapted(loss, z_query, z_text, view.query.texts, support_losses)


def _adapt_with_labels(clone: MAML | MetaSGD, view: TaskView, steps: int, first_order: bool | None
                       ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``adapt`` for a view whose label embeddings adapt too (``label_lr``): each step moves the learner's parts
    (its own rule: MAML's rate or MetaSGD's) and the labels by ``label_lr`` on the same support loss, each the
    gradient with respect to itself. The labels start at ``view.labels`` of the slow weights, with their graph, so
    the outer loop learns their start.

    Returns:
        The detached support loss before each step, and the adapted (L, D) labels.
    """
    first_order = clone.first_order if first_order is None else first_order
    kernel = contextlib.nullcontext() if first_order else sdpa_kernel(SDPBackend.MATH)  # as ``adapt``
    # from the slow weights themselves, not the clone's copies: the labels are a variable of their own, so the inner
    # gradient of the parts does not run through their start (as ``func_adapt_and_score``'s separate argument)
    labels, losses = view.labels(), []
    with kernel:
        for _ in range(steps):
            loss = view.loss(view.support, clone.module, labels)[0]
            params = list(clone.module.parameters())
            trained = [p for p in params if p.requires_grad]  # MAML carries frozen parts (allow_nograd)
            # the labels may leave parts of the scope unused (the text side, when they start at the prompts alone)
            *grads, grad_labels = torch.autograd.grad(loss, [*trained, labels], retain_graph=not first_order,
                                                      create_graph=not first_order, allow_unused=True)
            grads = iter(grads)
            grads = [next(grads) if p.requires_grad else None for p in params]  # None: no update (learn2learn's rule)
            if isinstance(clone, MetaSGD):
                clone.module = meta_sgd_update(clone.module, clone.lrs, grads)
            else:
                clone.module = maml_update(clone.module, clone.lr, grads)
            labels = labels - view.label_lr * grad_labels
            losses.append(loss.detach())
    return losses, labels


class FunctionalParts(Mapping):
    """The adapted parts as pure functions of a flat parameter dict ``{"<part>.<parameter>": tensor}``
    (``torch.func.functional_call``): what ``TaskView`` takes as ``fast``, for transforms such as ``vmap``."""

    def __init__(self, parts: nn.ModuleDict, params: Mapping[str, torch.Tensor]) -> None:
        self.parts, self.params = parts, params

    def __getitem__(self, name: str) -> Callable[..., torch.Tensor]:
        own = {key.split(".", 1)[1]: value for key, value in self.params.items() if key.split(".", 1)[0] == name}
        module = self.parts[name]
        return lambda *args: functional_call(module, own, args)

    def __iter__(self):
        return iter(self.parts.keys())

    def __len__(self) -> int:
        return len(self.parts)


def func_batchable(views: list[TaskView]) -> bool:
    """Whether ``func_adapt_and_score`` can take these tasks in one ``vmap``: tower features computed, integer
    domain rows, and the same shape and label layout in every task."""
    first = views[0].inputs()
    return first is not None and all(
        v.inputs() is not None and isinstance(v.domain_row, int) and v.task.prompts == views[0].task.prompts
        and v.inputs()[0].shape == first[0].shape and v.inputs()[1].shape == first[1].shape
        and torch.equal(v.support.labels, views[0].support.labels) and torch.equal(v.query.labels, views[0].query.labels)
        and v.support.index == views[0].support.index and v.query.index == views[0].query.index
        for v in views)


def func_adapt_and_score(
    learner: MAML | MetaSGD, views: list[TaskView], steps: int, first_order: bool | None = None,
    with_labels: bool = False,
) -> tuple[torch.Tensor, ...]:
    """``adapt_and_score`` for a whole meta-batch at once with torch.func: ``grad`` for the inner steps and
    ``vmap`` over the tasks, from the same fast weights and learning rates as the learner's (the outer
    gradients equal learn2learn's; ``tests/test_meta.py``). The tasks must be ``func_batchable``.

    Returns:
        (T,) query losses, (T, Q, D) adapted query image embeddings, (T,) support losses before the first
        step (detached; the query loss when ``steps`` is 0), and with ``with_labels`` (T, m, D) the adapted
        embeddings of the labels the queries point at (``Rows.texts`` of the query rows).
    """
    first_order = learner.first_order if first_order is None else first_order
    parts = learner.module  # a ModuleDict: parameter names are "<part>.<parameter>"
    params = {name: p for name, p in parts.named_parameters() if p.requires_grad}
    if isinstance(learner, MetaSGD):  # one learned rate per parameter, in the order of the parts' parameters
        rates = dict(zip((name for name, _ in parts.named_parameters()), learner.lrs))
    else:
        rates = dict.fromkeys(params, learner.lr)
    template = views[0]

    def one_task(h_image, h_text, row):
        view = template.with_inputs(h_image, h_text, row)

        def support_loss(p, labels):
            return view.loss(view.support, FunctionalParts(parts, p), labels)[0]

        # the label embeddings as fast weights of their own (``TaskView.label_lr``), from the slow weights' labels
        labels = None if view.label_lr is None else view.labels(FunctionalParts(parts, params))
        fast, first_loss = params, None
        for _ in range(steps):
            if labels is None:
                grads, loss = torch.func.grad_and_value(support_loss)(fast, None)
            else:
                (grads, grad_labels), loss = torch.func.grad_and_value(support_loss, argnums=(0, 1))(fast, labels)
                labels = labels - view.label_lr * (grad_labels.detach() if first_order else grad_labels)
            first_loss = loss if first_loss is None else first_loss
            fast = {name: fast[name] - rates[name] * (grads[name].detach() if first_order else grads[name])
                    for name in fast}
        loss, z_query, z_text = view.loss(view.query, FunctionalParts(parts, fast), labels)
        return loss, z_query, (first_loss if first_loss is not None else loss), z_text

    h_image = torch.stack([v.inputs()[0] for v in views])  # (T, S + Q, F_I), or the tail's start (T, S + Q, C, h, w)
    h_text = torch.stack([v.inputs()[1] for v in views])  # (T, M, F_T)
    rows = torch.tensor([v.domain_row for v in views], device=h_image.device)  # (T,)
    kernel = contextlib.nullcontext() if first_order else sdpa_kernel(SDPBackend.MATH)
    with torch.enable_grad(), kernel:
        losses, z_query, support_losses, z_text = torch.func.vmap(one_task)(h_image, h_text, rows)
    if with_labels:
        return losses, z_query, support_losses.detach(), z_text
    return losses, z_query, support_losses.detach()


def func_predictions(learner: MAML | MetaSGD, views: list[TaskView], steps: int) -> torch.Tensor:
    """(T, Q) each query's nearest adapted label after ``steps`` first-order inner steps, for tasks that are
    ``func_batchable``: ``Adapted.predictions`` of ``adapt_and_score`` for a whole chunk of episodes at once."""
    with torch.no_grad():
        _, z_query, _, z_text = func_adapt_and_score(learner, views, steps, first_order=True, with_labels=True)
    text_ids = views[0].query.texts  # the same label layout in every task
    return text_ids[(z_query @ z_text.transpose(1, 2)).argmax(dim=2)]  # (T, Q)
