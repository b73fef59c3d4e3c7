"""The few-shot evaluation protocol: every method on the same seeded episodes, with 95% confidence intervals.

One implementation serves the ``FewShotEvalCallback``, ``python -m metacontrastive evaluate``, the
notebooks and the benchmarks. A method maps one labelled episode to a predicted class per query:

==================== =============================================================== ===========
method               what it does                                                    reads
==================== =============================================================== ===========
``pixels``           nearest class mean of the raw pixels (squared Euclidean): the   images only
                     floor every learned method must clear on real images
``feature_centroid`` nearest class mean of the tower features (cosine), centred      h_I
                     and L2-normalised: SimpleShot's CL2N (Wang et al., 2019)
``feature_probe``    multinomial logistic regression on the same centred,            h_I
                     normalised tower features (C = ``feature_probe_c``)
``zero_shot``        nearest class prompt, no adaptation                             z_I, z_T
``prototype``        nearest class mean of the support embeddings (cosine)           z_I
``linear_probe``     multinomial logistic regression on the support embeddings,      z_I
                     L-BFGS from zero (scikit-learn's objective, C = ``probe_c``)
``tip_adapter``      training-free cache of the support embeddings mixed with the    z_I, z_T
                     zero-shot logits (Zhang et al., 2022)
``projection``       the second seed paper: fresh Linear-GELU-Linear heads on the    h_I, h_T
                     frozen tower features, trained contrastively on the support set
``finetune``         FiLM + heads fine-tuned on the support set with Adam (the       the model
                     BSCD-FSL baseline, after the pooled features)
``tail_finetune``    the image tail's weights, from the pretrained ones, and a       the trunk
                     cosine classifier from the support means, fine-tuned on the
                     support set (BSCD-FSL inside the tower; ``intower``)
``tail_film``        FiLM of the tail's BatchNorms from the identity and the same    the trunk
                     classifier, trained on the support set (``intower``)
``dcmcl``            k inner steps from the meta-learned initialisation              the model
==================== =============================================================== ===========

h_I, h_T are the tower features, z_I, z_T the model's domain-conditioned, projected and normalised
embeddings before any adaptation. The two ``tail_*`` methods need a model whose image tower is cut into trunk and
tail (``model.encoder.tail``, ``models.tail``); they read the trunk's activations and the pretrained tail, nothing
the model trained. A domain the model was not trained on (or one named in ``holdout``)
is conditioned on the ``unknown`` row of the domain table.

``feature_centroid`` and ``feature_probe`` are the training-free bar of a pretrained tower alone. SimpleShot
centres with the mean feature of the base (training) classes; an evaluation domain may have no base data (a
held-out domain), so here each episode is centred with the mean of its own support features: inductive, the
queries are never used. Queries go to the class mean by cosine (SimpleShot measures the Euclidean distance to the
unnormalised means).

Evaluation never trains the model and never keeps a second-order graph: ``dcmcl`` adapts first order
(the adapted weights are the same), the other trained methods work on copies.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from metacontrastive import intower
from metacontrastive.data.episodes import Task
from metacontrastive.data.tasks import FixedEpisodes
from metacontrastive.meta import TaskView, adapt_and_score, class_means, func_batchable, func_predictions
from metacontrastive.metrics import COLLAPSE, EpisodeMean, episode_scores, mean_cosine
from metacontrastive.models.clip import ProjectionHead
from metacontrastive.stacked import LayerPath, model_path, stacked_copies, train_copies

log = logging.getLogger(__name__)

__all__ = ["METHODS", "Episode", "EvalOptions", "Result", "evaluate", "methods_for", "predict"]


@dataclass(frozen=True)
class EvalOptions:
    """Settings of the methods that train or mix (fixed in advance, never searched on test episodes).

    Attributes:
        inner_steps: ``dcmcl`` inner steps (None: the model's ``eval_inner_steps``).
        finetune_steps: Adam steps of ``finetune`` on the support set.
        finetune_lr: its learning rate.
        projection_steps: Adam steps of ``projection``'s fresh heads.
        projection_lr: their learning rate.
        projection_temperature: the fixed temperature of ``projection``'s contrastive loss (CLIP's 0.07).
        projection_hidden: hidden width of ``projection``'s heads.
        projection_dim: the size of their shared space: ``EncoderConfig``'s default ``embed_dim`` (128), whatever
            the evaluated model's own, so that ``projection`` is the same baseline on every checkpoint and equals the
            study's row (scored on the untrained model of ``conf/pretrained.yaml``, whose space is 128-d). It was
            the evaluated model's size before: 1280 on the residual presets, at 2.4 to 2.6 times the cost per episode.
        probe_c: inverse L2 strength of ``linear_probe`` (scikit-learn's ``C``).
        feature_probe_c: the same for ``feature_probe``, on centred, unit-norm tower features: 1, scikit-learn's
            default, which Tian et al. (2020, "Rethinking few-shot image classification") use on normalised
            features; not tuned yet (to be chosen on validation classes, never on test episodes).
        probe_iters: L-BFGS iterations of ``linear_probe`` and ``feature_probe``.
        tip_alpha: Tip-Adapter's residual ratio alpha (the paper's default, 1).
        tip_beta: Tip-Adapter's sharpness beta (the paper's default, 5.5).
        tail_finetune_steps: Adam steps of ``tail_finetune`` on the support set: 5 at ``tail_finetune_lr`` 4e-4 scored
            as 20 at 1e-4 did, to 0.2 points on every validation cell (natural, aerial, textures at 5 and 20 shots,
            100 episodes each; ``bench/baseline_sweep.py``, README Speed), in a quarter of the time.
        tail_finetune_lr: the learning rate of ``tail_finetune`` (the tail's weights and the classifier).
        tail_film_steps: Adam steps of ``tail_film``: 20 (10 or 5 at a proportionally larger rate lost 0.5 to 0.8
            points on natural's validation classes).
        tail_film_lr: the learning rate of ``tail_film`` (FiLM coefficients and the classifier).
        tail_scale: the inverse temperature of their cosine classifier.
        tail_values: at most this many values of the tail's widest activation over the copies trained at once
            (memory only: the copies are independent, so the predictions do not depend on it).
        seed: seeds the fresh heads of ``projection`` (per episode, so results do not depend on order).
    """

    inner_steps: int | None = None
    finetune_steps: int = 50
    finetune_lr: float = 1e-3
    projection_steps: int = 100
    projection_lr: float = 1e-3
    projection_temperature: float = 0.07
    projection_hidden: int = 256
    projection_dim: int = 128
    probe_c: float = 1.0
    feature_probe_c: float = 1.0
    probe_iters: int = 100
    tip_alpha: float = 1.0
    tip_beta: float = 5.5
    tail_finetune_steps: int = 5
    tail_finetune_lr: float = 4e-4
    tail_film_steps: int = 20
    tail_film_lr: float = 1e-3
    tail_scale: float = 10.0
    tail_values: int = 10_000_000
    seed: int = 0


@dataclass
class Episode:
    """One labelled task as every method reads it, computed once and shared by all methods.

    Build it from a model with ``Episode.of``; tests build one by hand from the tensors alone.

    Attributes:
        task: the task (images, labels, class prompts).
        h_image: (S + Q, F_I) frozen tower features of support then query images.
        h_text: (N, F_T) tower features of the class prompts (averaged over a class's prompts).
        z_image: (S + Q, D) the model's un-adapted, domain-conditioned, normalised image embeddings.
        z_text: (N, D) the same for the class prompts.
        scale: the model's inverse temperature.
        row: the domain-table row conditioning the task.
        module: the ``MetaContrastiveModule`` (for the methods that adapt the model).
        view: the model's ``TaskView`` of the task.
        h_model: (S + Q, F_I) the image features the model's FiLM and heads read (``h_image`` centred on the
            support set when the model has ``center_support``; None: ``h_image``).
        h_trunk: (S + Q, C, h, w) the trunk activations of a model whose image tower is cut (None: not cut).
    """

    task: Task
    h_image: torch.Tensor
    h_text: torch.Tensor
    z_image: torch.Tensor
    z_text: torch.Tensor
    scale: torch.Tensor | float
    row: int = 0
    module: nn.Module | None = None
    view: TaskView | None = None
    h_model: torch.Tensor | None = None
    h_trunk: torch.Tensor | None = None

    @classmethod
    def of(cls, module: nn.Module, task: Task, row: int, unseen: str | None = None) -> Episode:
        """The episode of ``task`` under ``module`` (a ``MetaContrastiveModule``), conditioned on ``row`` (``unseen``:
        how an ``unknown`` row starts, overriding the model's ``unseen``)."""
        if not task.labelled:
            raise ValueError(f"domain {task.domain!r}: few-shot evaluation needs labelled episodes, not caption tasks")
        with torch.no_grad():  # frozen features: no method differentiates into the towers (unless they adapt)
            view = module.view_of(task, row, unseen=unseen)  # an unseen domain's row may become a blend of the known ones
            h_model, h_text = view.features()  # (S + Q, F_I), (N * P, F_T): P prompts per class
            towers = hasattr(view, "tower_features")  # the towers ran once (they do not adapt)
            h_image = view.tower_pooled() if towers else h_model  # the tower's own
            h_trunk = view.tower_features[0] if towers and module.model.image_tail is not None else None
            h_text = h_text.view(len(task.classes), task.prompts, -1).mean(dim=1)  # (N, F_T)
            z_image = module.model.embed_image(h_model, view.domain_row)  # (S + Q, D)
            z_text = view.texts()  # (N, D), prompt ensembling when P > 1; no support prototypes: zero-shot
            scale = module.model.scale()
        return cls(task, h_image, h_text, z_image, z_text, scale, row, module, view, h_model, h_trunk)

    @property
    def ways(self) -> int:
        return len(self.task.classes)

    @property
    def support_labels(self) -> torch.Tensor:
        return self.task.support_labels

    def split(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(support rows, query rows) of a per-image tensor."""
        n = len(self.task.support_labels)
        return rows[:n], rows[n:]


def _pixels(ep: Episode, opts: EvalOptions) -> torch.Tensor:
    support, query = ep.task.support_images.flatten(1), ep.task.query_images.flatten(1)  # (S, 3HW), (Q, 3HW)
    prototypes = class_means(support, ep.support_labels, ep.ways)  # (N, 3HW)
    # argmin ||q - p||^2 = argmin ||p||^2 - 2 q.p: one matmul, no copy of the images (what cdist computes for Q > 25)
    return (prototypes.pow(2).sum(dim=1) - 2.0 * query @ prototypes.t()).argmin(dim=1)


def _centred(ep: Episode) -> tuple[torch.Tensor, torch.Tensor]:
    """Support (S, F_I) and query (Q, F_I) tower features centred on the support mean and L2-normalised (CL2N)."""
    support, query = ep.split(ep.h_image)
    mean = support.mean(dim=0)  # (F_I,) the support set's own mean (no base classes here); the queries are unused
    return F.normalize(support - mean, dim=-1), F.normalize(query - mean, dim=-1)


def _feature_centroid(ep: Episode, opts: EvalOptions) -> torch.Tensor:
    support, query = _centred(ep)
    prototypes = F.normalize(class_means(support, ep.support_labels, ep.ways), dim=-1)  # (N, F_I)
    return (query @ prototypes.t()).argmax(dim=1)


def _feature_probe(episodes: list[Episode], opts: EvalOptions) -> torch.Tensor:
    # the centroid's features: unit norm, so that one C is the same regularisation whatever the scale of the tower's
    # or the domain's features; centred first, so that the directions normalised are those that separate the
    # episode's classes, not the one that all non-negative pooled features share (centring alone would only move
    # the unpenalised bias)
    support, query = map(torch.stack, zip(*(_centred(ep) for ep in episodes)))  # (B, S, F_I), (B, Q, F_I)
    first = episodes[0]
    return logistic_regression(support, first.support_labels, first.ways, opts.feature_probe_c, opts.probe_iters)(query).argmax(dim=-1)


def _zero_shot(ep: Episode, opts: EvalOptions) -> torch.Tensor:
    return (ep.split(ep.z_image)[1] @ ep.z_text.t()).argmax(dim=1)


def _prototype(ep: Episode, opts: EvalOptions) -> torch.Tensor:
    support, query = ep.split(ep.z_image)
    prototypes = F.normalize(class_means(support, ep.support_labels, ep.ways), dim=-1)  # (N, D)
    return (query @ prototypes.t()).argmax(dim=1)


def _linear_probe(episodes: list[Episode], opts: EvalOptions) -> torch.Tensor:
    support, query = map(torch.stack, zip(*(ep.split(ep.z_image) for ep in episodes)))  # (B, S, D), (B, Q, D)
    first = episodes[0]
    return logistic_regression(support, first.support_labels, first.ways, opts.probe_c, opts.probe_iters)(query).argmax(dim=-1)


def logistic_regression(x: torch.Tensor, y: torch.Tensor, classes: int, c: float, iters: int) -> Callable:
    """Fit multinomial logistic regression with scikit-learn's objective, sum CE + ||W||^2 / (2C) (the
    bias unpenalised), by full-batch L-BFGS from zero: deterministic. Returns the logit function.

    ``x`` (n, F) is one problem; (B, n, F) is B problems with the same labels ``y`` (n,), solved together as their
    sum: the problems share no parameter, so the sum's minimiser is each one's own (the objective is strictly
    convex), and one L-BFGS over the chunk costs about what one episode's did (logits agree with solving each
    alone to L-BFGS's tolerances, about 1e-4; tests/test_evaluation.py).
    """
    n = x.shape[-2]
    batch = x.shape[:-2]
    weight = torch.zeros(*batch, x.shape[-1], classes, dtype=x.dtype, device=x.device)  # ([B,] F, classes)
    bias = torch.zeros(*batch, 1, classes, dtype=x.dtype, device=x.device)  # ([B,] 1, classes)
    targets = F.one_hot(y, classes).to(x.dtype)  # (n, classes)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=iters * 2 if batch else iters, tolerance_grad=1e-6,
                                  tolerance_change=1e-9, history_size=20, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:  # scaled by 1 / n: the same minimiser, better conditioned steps
        log_p = (x @ weight + bias).log_softmax(dim=-1)  # ([B,] n, classes)
        # the gradient in closed form: an episode is a few dozen small evaluations, where autograd's overhead dominates
        residual = (log_p.exp() - targets) / n  # ([B,] n, classes) d mean CE / d logits
        weight.grad = x.transpose(-1, -2) @ residual + weight / (c * n)
        bias.grad = residual.sum(dim=-2, keepdim=True)
        return -(targets * log_p).sum() / n + weight.pow(2).sum() / (2.0 * c * n)

    optimizer.step(objective)
    return lambda q: q @ weight + bias


def _tip_adapter(ep: Episode, opts: EvalOptions) -> torch.Tensor:
    support, query = ep.split(ep.z_image)
    affinity = query @ support.t()  # (Q, S) cosine similarities
    values = F.one_hot(ep.support_labels, ep.ways).to(affinity.dtype)  # (S, N) the cache's labels
    cache_logits = torch.exp(-opts.tip_beta * (1.0 - affinity)) @ values  # (Q, N)
    # the paper mixes with CLIP's logits at its scale (100); here the model's own learned scale
    zero_shot_logits = ep.scale * query @ ep.z_text.t()  # (Q, N)
    return (zero_shot_logits + opts.tip_alpha * cache_logits).argmax(dim=1)


class _FreshHeads(nn.Module):
    """The projection baseline's heads: a Linear-GELU-Linear head per modality."""

    def __init__(self, image_dim: int, text_dim: int, hidden: int, dim: int) -> None:
        super().__init__()
        self.image, self.text = ProjectionHead(image_dim, hidden, dim), ProjectionHead(text_dim, hidden, dim)


Method = Callable[[list[Episode], EvalOptions], torch.Tensor]  # episodes of one set -> (B, Q) predictions


def _stacked_features(episodes: list[Episode], model: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, S, F_I) support and (B, Q, F_I) query image features (the tower's, or with ``model`` what the model's
    FiLM reads: ``Episode.h_model``), (B, N, F_T) class prompt features."""
    support, query = map(torch.stack, zip(*(ep.split(ep.h_model if model and ep.h_model is not None else ep.h_image)
                                            for ep in episodes)))
    return support, query, torch.stack([ep.h_text for ep in episodes])


def _nearest_text(z_query: torch.Tensor, z_text: torch.Tensor) -> torch.Tensor:
    """(B, Q) the nearest class prompt (B, N, D) of each query (B, Q, D)."""
    return (z_query @ z_text.transpose(1, 2)).argmax(dim=2)


def _projection(episodes: list[Episode], opts: EvalOptions) -> torch.Tensor:
    first = episodes[0]
    hidden, dim = opts.projection_hidden, opts.projection_dim
    with torch.random.fork_rng(devices=[]):  # one seeded initialisation for every episode, without touching the global stream
        torch.manual_seed(opts.seed)
        heads = _FreshHeads(first.h_image.shape[1], first.h_text.shape[1], hidden, dim).to(first.h_image.device)
    support, query, texts = _stacked_features(episodes)
    p = stacked_copies(heads, len(episodes))
    image, text = LayerPath.of(heads.image, p, "image."), LayerPath.of(heads.text, p, "text.")
    train_copies(p, image, support, text, texts, 1.0 / opts.projection_temperature, first.support_labels,
                  opts.projection_steps, opts.projection_lr)
    with torch.no_grad():
        return _nearest_text(image.forward(query), text.forward(texts))


def _finetune(episodes: list[Episode], opts: EvalOptions) -> torch.Tensor:
    first = episodes[0]
    model = first.module.model
    support, query, texts = _stacked_features(episodes, model=True)
    conds = torch.stack([_conditioning(model, ep.view.domain_row) for ep in episodes]).to(support.device)  # (B, C)
    p = stacked_copies(_finetuned(model), len(episodes))
    image, text = model_path(model, p, "image", conds), model_path(model, p, "text", conds)
    train_copies(p, image, support, text, texts, model.scale().detach(), first.support_labels,
                  opts.finetune_steps, opts.finetune_lr)
    with torch.no_grad():
        return _nearest_text(image.forward(query), text.forward(texts))


def _conditioning(model: nn.Module, row: int | torch.Tensor) -> torch.Tensor:
    """The (C,) conditioning vector of a domain-table row (or the vector itself; a dummy without conditioning)."""
    if torch.is_tensor(row) and row.is_floating_point():
        return row.detach()
    if model.domain is None:
        return torch.zeros(1)  # no FiLM reads it
    return model.domain.table.weight[row].detach()


_FINETUNED = ("film_image", "film_text", "head_image", "head_text")  # what ``finetune`` trains, whatever the adapt scope


def _finetuned(model: nn.Module) -> nn.ModuleDict:
    """The parts of ``model`` that ``finetune`` trains (those it has: FiLM may be off)."""
    return nn.ModuleDict({name: getattr(model, name) for name in _FINETUNED if getattr(model, name) is not None})


def _in_tower(method: Callable, steps: Callable[[EvalOptions], int], lr: Callable[[EvalOptions], float]) -> Method:
    """An ``intower`` method on a chunk of episodes of a model with an image tail."""
    def run(episodes: list[Episode], opts: EvalOptions) -> torch.Tensor:
        first = episodes[0]
        if first.h_trunk is None:
            raise ValueError(f"{method.__name__} adapts inside the image tower: it needs a model whose tower is cut "
                             "(model.encoder.tail=head or last_stage) and whose towers do not adapt")
        trunk = torch.stack([ep.h_trunk for ep in episodes]).float()  # (B, S + Q, C, h, w)
        tail = first.module.model.image_tail
        return torch.cat([method(tail, part, first.support_labels, first.ways, steps(opts), lr(opts), opts.tail_scale)
                          for part in trunk.split(_tail_piece(first, opts))])
    return run


def _tail_piece(first: Episode, opts: EvalOptions) -> int:
    """How many episodes adapt at once inside a cut tower. Their copies are independent, so a chunk is split to bound
    memory: the gradient holds the tail's widest activation of every image of every copy several times over
    (20-shot chunks of 50 ran out of 24 GiB)."""
    tail = first.module.model.image_tail
    widest = max(tail.film_channels) * first.h_trunk[0, 0].numel() * len(first.h_trunk)  # values per copy
    return max(1, opts.tail_values // widest)


def _dcmcl(episodes: list[Episode], opts: EvalOptions) -> torch.Tensor:
    module = episodes[0].module
    steps = module.eval_steps if opts.inner_steps is None else opts.inner_steps
    views = [ep.view for ep in episodes]
    if steps > 0 and func_batchable(views):  # the chunk's inner loops at once (torch.func; the same adapted weights)
        # inside a cut tower, in memory-bounded pieces as the tail baselines
        piece = _tail_piece(episodes[0], opts) if episodes[0].h_trunk is not None else len(views)
        return torch.cat([func_predictions(module.learner, views[i:i + piece], steps) for i in range(0, len(views), piece)])
    return torch.stack([adapt_and_score(module.learner, view, steps, first_order=True).predictions() for view in views])


def _each(method: Callable[[Episode, EvalOptions], torch.Tensor]) -> Method:
    """A method written for one episode, applied to each."""
    return lambda episodes, opts: torch.stack([method(ep, opts) for ep in episodes])


METHODS: dict[str, Method] = {
    "pixels": _each(_pixels),
    "feature_centroid": _each(_feature_centroid),
    "feature_probe": _feature_probe,
    "zero_shot": _each(_zero_shot),
    "prototype": _each(_prototype),
    "linear_probe": _linear_probe,
    "tip_adapter": _each(_tip_adapter),
    "projection": _projection,
    "finetune": _finetune,
    "tail_finetune": _in_tower(intower.tail_finetune, lambda opts: opts.tail_finetune_steps, lambda opts: opts.tail_finetune_lr),
    "tail_film": _in_tower(intower.tail_film, lambda opts: opts.tail_film_steps, lambda opts: opts.tail_film_lr),
    "dcmcl": _dcmcl,
}


def methods_for(module: nn.Module) -> list[str]:
    """The methods of ``METHODS`` that ``module`` can be scored with: the ``tail_*`` ones need a cut image tower."""
    return [m for m in METHODS if m not in intower.TAIL_METHODS or module.model.image_tail is not None]


def predict(method: str, episodes: list[Episode], opts: EvalOptions = EvalOptions()) -> torch.Tensor:
    """(B, Q) the class ``method`` predicts for each query of each episode (all of one shape)."""
    if method not in METHODS:
        raise ValueError(f"unknown evaluation method {method!r}; choose from {list(METHODS)} or 'all'")
    return METHODS[method](episodes, opts).detach()


@dataclass
class Result:
    """One row of the results table: a method on one domain's episodes of one shape."""

    domain: str
    conditioning: str  # the domain-table row used: the domain's own, "unknown", or "blend" (of the known rows)
    method: str
    ways: int
    shots: int
    queries: int
    episodes: int
    images: int  # distinct images the episodes used
    acc: float
    acc_ci95: float
    f1: float
    f1_ci95: float
    ms_per_episode: float

    def as_dict(self) -> dict:
        return asdict(self)


def evaluate(
    module: nn.Module,
    episode_sets: Iterable[FixedEpisodes],
    methods: Iterable[str],
    opts: EvalOptions = EvalOptions(),
    holdout: Iterable[str] = (),
    chunk: int = 50,
    progress: bool = True,
    unseen: str | None = None,
    chunk_images: int = 4000,
) -> list[Result]:
    """Score ``methods`` on every episode of every set: the same episodes, in the same order, for each.

    Args:
        module: a ``MetaContrastiveModule``; put in eval mode for the call and restored after.
        episode_sets: fixed episodes, one set per (domain, shape).
        methods: names from ``METHODS``.
        opts: the methods' settings.
        holdout: domains conditioned on the ``unknown`` embedding even if the model knows them.
        chunk: episodes scored together (the trained methods train one copy per episode at once).
        chunk_images: at most this many images in a chunk (fewer episodes for large ones): a 20-shot chunk of 50
            held about 8 GB on a 4-way domain and ran out of 24 GB on a 5-way one.
        progress: show a progress bar.
        unseen: how a domain conditioned on ``unknown`` starts: ``unknown`` or ``blend`` (default: the model's
            ``unseen``); its rows say which (``conditioning``).

    Returns:
        One ``Result`` per (set, method), in that order.
    """
    methods, sets, holdout = list(methods), list(episode_sets), set(holdout)
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"unknown evaluation method {method!r}; choose from {list(METHODS)} or 'all'")
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    results = []
    bar = tqdm(total=sum(len(s) for s in sets), desc="evaluate", unit="episode", disable=not progress, mininterval=2.0)
    try:
        for episodes in sets:
            domain = episodes.split.name
            row = module.model.unknown_domain if domain in holdout else module.domain_row(domain)
            # local metrics: under DDP only rank 0 may be evaluating (the callbacks), so no collective on compute
            scores = {m: {"acc": EpisodeMean(sync_on_compute=False), "f1": EpisodeMean(sync_on_compute=False)}
                      for m in methods}
            seconds = dict.fromkeys(methods, 0.0)
            prompt_cos = []  # per episode: mean cosine between its un-adapted class prompts
            size = min(chunk, max(1, chunk_images // _images_per_episode(episodes)))
            for indices in _chunks(episodes, size):
                batch = [Episode.of(module, _to(episodes[i], device), row, unseen) for i in indices]
                for ep in batch:
                    prompt_cos.append(mean_cosine(ep.z_text))
                targets = torch.stack([ep.task.query_labels for ep in batch])  # (B, Q)
                for method in methods:
                    start = time.perf_counter()
                    predictions = predict(method, batch, opts)  # (B, Q)
                    seconds[method] += time.perf_counter() - start
                    for prediction, target in zip(predictions, targets):
                        accuracy, f1 = episode_scores(prediction, target, batch[0].ways)
                        scores[method]["acc"].update(accuracy.cpu())
                        scores[method]["f1"].update(f1.cpu())
                bar.update(len(batch))
            known = row != module.model.unknown_domain
            blended = "blend" if (unseen or module.hparams.unseen) == "blend" and module.model.domain is not None else "unknown"
            _warn_collapsed_prompts(domain, float(torch.stack(prompt_cos).mean()), methods)
            for method in methods:
                acc, f1 = scores[method]["acc"].compute(), scores[method]["f1"].compute()
                results.append(Result(
                    domain=domain, conditioning=domain if known else blended, method=method,
                    ways=episodes.shape.ways, shots=0 if episodes.variable else episodes.shape.shots,
                    queries=max(len(ix) - k for (_, ix), k in zip(episodes.draws[0], episodes.shots[0])) if episodes.variable
                    else episodes.shape.queries,
                    episodes=len(episodes), images=episodes.distinct_images(),
                    acc=float(acc["mean"]), acc_ci95=float(acc["ci95"]), f1=float(f1["mean"]), f1_ci95=float(f1["ci95"]),
                    ms_per_episode=1000.0 * seconds[method] / max(len(episodes), 1),
                ))
    finally:
        bar.close()
        module.train(was_training)
    return results


def _warn_collapsed_prompts(domain: str, cosine: float, methods: list[str]) -> None:
    """Warn when the model's un-adapted class prompts of a domain point the same way: the methods that read
    them before any adaptation (``zero_shot``, ``tip_adapter``) then answer alike for every query."""
    readers = [m for m in methods if m in ("zero_shot", "tip_adapter")]
    if cosine > COLLAPSE["label_cos"] and readers:
        log.warning("domain %r: the un-adapted class prompts have collapsed (mean cosine %.3f between classes), so "
                    "%s give every query about the same answer. A meta-learned initialisation (MAML) need not separate "
                    "classes before its inner loop; if the model should classify zero-shot, train with "
                    "model.prototype_prompts or method=contrastive.", domain, cosine, " and ".join(readers))


def _images_per_episode(episodes: FixedEpisodes) -> int:
    """The most images (support and queries) an episode of the set holds."""
    if episodes.variable:
        return max(sum(len(ix) for _, ix in draw) for draw in episodes.draws)
    return episodes.shape.ways * (episodes.shape.shots + episodes.shape.queries)


def _chunks(episodes: FixedEpisodes, chunk: int) -> Iterable[list[int]]:
    """The episode indices scored together: consecutive runs of ``chunk``; for variable-way variable-shot episodes,
    episodes of one layout (the same shots and queries per class) at a time, since the trained methods train
    their copies together."""
    if not episodes.variable:
        for first in range(0, len(episodes), chunk):
            yield list(range(first, min(first + chunk, len(episodes))))
        return
    layouts: dict[tuple, list[int]] = {}
    for i, (draw, shots) in enumerate(zip(episodes.draws, episodes.shots)):
        layouts.setdefault((tuple(shots), tuple(len(ix) for _, ix in draw)), []).append(i)
    for group in layouts.values():
        for first in range(0, len(group), chunk):
            yield group[first:first + chunk]


def _to(task: Task, device: torch.device) -> Task:
    if task.support_labels.device == device:
        return task
    return task.map_tensors(lambda t: t.to(device))  # every field kept (prompts per class included)
