"""MetaContrastiveModule: the DCMCL meta step, written once for train, val and test.

Per task: the towers run once (``features``); a learn2learn clone of the fast weights adapts to the
support set for k steps and the adapted model scores the query set (``metacontrastive.meta.adapt_and_score``).
The outer loss is the mean query loss plus ``align_weight`` times the alignment regulariser across
the domains of the meta-batch. ``method`` switches the ablations:

- ``dcmcl``: the inner loop above (the full method when conditioning and alignment are on);
- ``contrastive``: plain CLIP training on support and query together, no inner loop;
- ``projection``: the second seed paper, frozen towers and heads trained contrastively.

Every method is evaluated the same way: k inner steps on the support set from the learned
initialisation, then nearest class prompt for each query.
"""
from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from metacontrastive.checks import check_options, score_warnings, structure
from metacontrastive.data.episodes import Task
from metacontrastive.losses import Alignment, alignment_loss
from metacontrastive.meta import (
    ADAPT_SCOPES, AdaptScope, Algorithm, Engine, TaskView, adapt_and_score, batch_features, blend_domains,
    build_learner, func_adapt_and_score, func_batchable, towers_batch,
)
from metacontrastive.metrics import COLLAPSE, EpisodeMean, collapse_signs, episode_scores
from metacontrastive.models.clip import DomainConditionedCLIP, EncoderConfig

__all__ = ["MetaContrastiveModule", "TaskResult"]

# as in open_clip: no weight decay on gains, biases, embeddings or the temperature
_NO_DECAY = ("bias", "norm", "logit_scale", "embed", "domain", "position", "token")


@dataclass
class TaskResult:
    """One task's part of the outer objective.

    Attributes:
        loss: the query loss (plain training: the loss on support and query together).
        z_align: (Q, D) the query image embeddings the alignment term compares across domains.
        support_loss: the detached loss on the support set, before any inner step.
        predictions: (Q,) the nearest adapted class prompt of each query (labelled evaluation tasks only).
        scores: per-episode accuracy, macro-F1 and signs of collapse (labelled evaluation tasks only).
    """

    loss: torch.Tensor
    z_align: torch.Tensor
    support_loss: torch.Tensor
    predictions: torch.Tensor | None = None
    scores: dict[str, torch.Tensor] = field(default_factory=dict)


class MetaContrastiveModule(L.LightningModule):
    """Domain-Conditioned Meta-Contrastive Learning around a ``DomainConditionedCLIP``.

    Args:
        domains: the training domains in id order (linked from the data module by the CLI); any other
            domain is conditioned on the ``unknown`` row.
        encoder: towers, domain conditioning, heads and temperature (``--model.encoder.<field>``).
        method: ``dcmcl``, ``contrastive`` or ``projection`` (see the module docstring); ``projection``
            freezes both towers.
        algorithm: ``maml`` or ``metasgd``.
        adapt_scope: parts adapted in the inner loop, a key of ``ADAPT_SCOPES``.
        inner_steps: inner-loop steps k in training.
        eval_inner_steps: inner-loop steps at validation and test (default: ``inner_steps``).
        inner_lr: inner-loop learning rate alpha.
        first_order: first-order MAML.
        meta_engine: how training adapts a meta-batch: ``l2l`` (learn2learn clones, one task after another) or
            ``func`` (torch.func: ``grad`` inner steps, ``vmap`` over the meta-batch's tasks; same gradients).
            ``func`` needs tasks of one shape and towers outside the scope; other meta-batches use ``l2l``.
        backward_per_task: in training, differentiate each task's graph as soon as its part of the objective is
            known and free it, so that memory holds one task's inner-loop graph plus the tower activations instead
            of every task's graph (``backward_each_task``; the same gradients). Takes the ``l2l`` path. With the
            alignment term on, every task's inner loop runs twice (once without a graph). With ``16-mixed``
            precision the per-task gradients are not loss-scaled: use ``bf16-mixed``.
        align: alignment regulariser, a key of ``metacontrastive.losses.ALIGNMENTS``.
        align_weight: lambda; 0 turns alignment off.
        align_on: align ``adapted`` or ``base`` (un-adapted) query image embeddings.
        align_warmup_steps: steps over which lambda ramps linearly from 0 to ``align_weight`` (0: none), so
            that the regulariser acts on embeddings that already separate classes.
        gather_align: under DDP, compute the alignment term over every rank's query embeddings (all-gathered
            with gradients) instead of this rank's meta-batch alone: more samples per domain for MMD / CORAL.
        domain_dropout: probability of replacing a training task's domain by ``unknown``.
        unseen: how a domain the model was not trained on starts its inner loop at evaluation: the
            ``unknown`` embedding (trained by domain dropout), or a ``blend`` of the known domains' embeddings
            weighted by how well each explains the support set (``meta.blend_domains``).
        prototype_prompts: beta's starting value: each label's embedding is its prompts' moved toward the
            mean of its support images, normalise(t + beta * p), with beta learned in the outer loop (see
            ``meta.TaskView``); None: prompts alone.
        inner_label_lr: the inner loop also adapts each task's label embeddings, at this rate, as fast weights
            started where ``prototype_prompts`` puts them (Proto-MAML, Triantafillou et al. 2020: the classifier
            initialised at the prototypes, then fine-tuned with the rest); None: they follow the fast weights.
        lr: AdamW learning rate of the FiLM generators, heads and temperature (and of any group below
            left at None).
        tower_lr: learning rate of the towers.
        domain_lr: learning rate of the domain embeddings.
        metasgd_lr: learning rate of MetaSGD's per-parameter inner learning rates.
        weight_decay: AdamW weight decay (not on biases, norms, embeddings or the temperature).
        warmup_steps: linear warmup steps before the cosine decay.
        nonfinite: what a non-finite training loss does: ``stop`` the run with the step and the loss terms,
            or ``skip`` the step (no update; counted in ``train/nonfinite_skipped``; one device only).
    """

    def __init__(
        self,
        domains: list[str] = ["natural", "medical"],  # noqa: B006 - read-only default, shown by the CLI
        encoder: EncoderConfig = EncoderConfig(),  # noqa: B008 - frozen dataclass, shown by the CLI
        method: Literal["dcmcl", "contrastive", "projection"] = "dcmcl",
        algorithm: Algorithm = "maml",
        adapt_scope: AdaptScope = "film+heads",
        inner_steps: int = 1,
        eval_inner_steps: int | None = None,
        inner_lr: float = 0.1,
        first_order: bool = False,
        meta_engine: Engine = "l2l",
        backward_per_task: bool = False,
        align: Alignment = "mmd",
        align_weight: float = 0.1,
        align_on: Literal["adapted", "base"] = "adapted",
        align_warmup_steps: int = 0,
        gather_align: bool = False,
        domain_dropout: float = 0.1,
        unseen: Literal["unknown", "blend"] = "unknown",
        prototype_prompts: float | None = None,
        inner_label_lr: float | None = None,
        lr: float = 2e-3,
        tower_lr: float | None = None,
        domain_lr: float | None = None,
        metasgd_lr: float | None = None,
        weight_decay: float = 0.01,
        warmup_steps: int = 20,
        nonfinite: Literal["stop", "skip"] = "stop",
    ) -> None:
        super().__init__()
        check_options(locals())
        if isinstance(encoder, dict):  # as stored in a checkpoint's hyperparameters
            encoder = EncoderConfig(**encoder)
        self.save_hyperparameters(ignore=["encoder"])
        self.hparams["encoder"] = dataclasses.asdict(encoder)  # plain values: YAML and safe checkpoint loading
        self.domains = list(domains)
        if method == "projection":  # the second seed paper: frozen towers, trained heads
            encoder = dataclasses.replace(encoder, freeze_image=True, freeze_text=True)
        self.model = DomainConditionedCLIP(len(domains), encoder)
        learner = build_learner(self.model, adapt_scope, algorithm, inner_lr, first_order)
        # The learner wraps the model's own FiLM and heads: kept off the module tree (nn.Module would register
        # it) so that every tensor is stored once. MetaSGD's per-parameter rates are its only own weights.
        self.__dict__["learner"] = learner
        self.inner_lrs = learner.lrs if algorithm == "metasgd" else None
        if method != "dcmcl" and algorithm == "metasgd":  # no inner loop in training: the rates cannot learn
            self.inner_lrs.requires_grad_(False)
        self.adapted = ADAPT_SCOPES[adapt_scope]  # the parts the inner loop adapts
        self.towers_adapt = "image_tower" in self.adapted
        if prototype_prompts is not None and prototype_prompts <= 0:
            raise ValueError(f"model.prototype_prompts={prototype_prompts}: give beta's starting value, > 0, or null for none")
        self.log_prototype_weight = (nn.Parameter(torch.tensor(math.log(prototype_prompts)))
                                     if prototype_prompts is not None else None)
        self._rows = {name: i for i, name in enumerate(self.domains)}
        self.episode_scores = self._score_metrics({"val": self.domains, "test": self.domains})
        self.nonfinite_skipped = 0

    def setup(self, stage: str) -> None:
        # validation and test may hold domains besides the training ones (evaluation-only domains); every
        # rank builds the same metrics from the data module, so that DDP reductions line up
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "stage_domains"):
            self.episode_scores = self._score_metrics({s: datamodule.stage_domains[s] for s in ("val", "test")})
        if datamodule is not None and hasattr(datamodule, "attach"):  # image size, and the feature cache of a frozen tower
            datamodule.attach(self.model.frozen_image_tower(self.towers_adapt), self.trainer.strategy.root_device,
                              progress=self.trainer.is_global_zero)

    @property
    def prototype_weight(self) -> torch.Tensor | None:
        """beta of ``prototype_prompts``, or None."""
        return None if self.log_prototype_weight is None else self.log_prototype_weight.exp()

    @property
    def eval_steps(self) -> int:
        """Inner-loop steps at validation, test and in ``metacontrastive.evaluation``."""
        hp = self.hparams
        return hp.eval_inner_steps if hp.eval_inner_steps is not None else hp.inner_steps

    def domain_row(self, domain: str) -> int:
        """The row of the model's domain table for a domain: its own, or ``unknown`` for one it was not trained on."""
        return self._rows.get(domain, self.model.unknown_domain)

    def view_of(self, task: Task, row: int, train: bool = False,
                features: tuple[torch.Tensor, torch.Tensor] | None = None, unseen: str | None = None) -> TaskView:
        """The model's view of ``task`` conditioned on ``row`` (with its tower features, if computed already);
        outside training, an ``unknown`` row starts from a blend of the known domains when ``unseen`` (default: the
        model's ``unseen``) is ``blend``."""
        view = TaskView(self.model, task, row, self.adapted, self.prototype_weight, features, self.hparams.inner_label_lr)
        unseen = unseen or self.hparams.unseen
        if not train and row == self.model.unknown_domain and unseen == "blend" and self.model.domain is not None:
            blend_domains(view, list(range(len(self.domains))))
        return view

    def task_view(self, task: Task, train: bool, features: tuple[torch.Tensor, torch.Tensor] | None = None) -> TaskView:
        """``view_of`` the task's own domain row, or of ``unknown`` under domain dropout (training)."""
        row = self.domain_row(task.domain)
        if train and self.hparams.domain_dropout > 0 and random.random() < self.hparams.domain_dropout:
            row = self.model.unknown_domain
        return self.view_of(task, row, train, features)

    # ------------------------------------------------------------------ the algorithm
    def func_task_steps(self, views: list[TaskView]) -> list[TaskResult]:
        """Training tasks adapted together by the torch.func engine (``meta_engine=func``; ``func_batchable``)."""
        losses, z_query, support_losses = func_adapt_and_score(self.learner, views, self.hparams.inner_steps)
        base = self.hparams.align_on == "base" and self.hparams.align_weight > 0
        return [TaskResult(losses[i], view.embed(view.query)[0] if base else z_query[i], support_losses[i])
                for i, view in enumerate(views)]

    def task_step(self, view: TaskView, train: bool, first_order: bool | None = None) -> TaskResult:
        """Adapt to one task's support set (unless plain training) and score its query set; ``first_order``
        overrides the training order (evaluation always adapts first order: it needs no outer gradient)."""
        hp, task = self.hparams, view.task
        if train and hp.method != "dcmcl":  # plain contrastive training on all pairs of the task
            loss, z_both, _ = view.loss(view.both)
            with torch.no_grad():
                support_loss = view.loss(view.support)[0]
            return TaskResult(loss, z_both[view.query.index], support_loss)
        adapted = adapt_and_score(self.learner, view, hp.inner_steps if train else self.eval_steps,
                                  first_order=first_order if train else True, final_support_loss=not train)
        z_align = view.embed(view.query)[0] if hp.align_on == "base" and hp.align_weight > 0 else adapted.z_query
        support_loss = adapted.support_losses[0] if adapted.support_losses else adapted.loss.detach()
        if train or not task.labelled:
            return TaskResult(adapted.loss, z_align, support_loss)
        predictions = adapted.predictions()
        accuracy, f1 = episode_scores(predictions, task.query_labels, len(task.classes))
        losses = adapted.support_losses
        scores = {"acc": accuracy, "f1": f1, "chance": torch.tensor(1.0 / len(task.classes)),
                  "support_gain": losses[0] - losses[-1], **collapse_signs(adapted.z_text, adapted.z_query, predictions)}
        return TaskResult(adapted.loss, z_align, support_loss, predictions, scores)

    def meta_step(self, batch: list[Task], stage: str) -> torch.Tensor | None:
        """The outer objective on a meta-batch: mean query loss + align_weight * R_align; logs per domain.
        None when a non-finite training loss is skipped (``nonfinite=skip``): Lightning then takes no step."""
        hp, train = self.hparams, stage == "train"
        # the towers run once per meta-batch when they can (see meta.towers_batch), else once per task
        features = batch_features(self.model, batch) if towers_batch(self.model, self.towers_adapt) else [None] * len(batch)
        views = [self.task_view(task, train, f) for task, f in zip(batch, features)]
        weight = self.align_weight_now(train)
        if train and hp.backward_per_task:
            results, align, surrogate = self.backward_each_task(views, weight)
            query_loss = torch.stack([r.loss for r in results]).mean()
            loss = surrogate - surrogate.detach() + (query_loss + weight * align)  # the objective's value and gradient
        else:
            if train and hp.meta_engine == "func" and hp.method == "dcmcl" and func_batchable(views):
                results = self.func_task_steps(views)
            else:  # learn2learn, one task after another (also the func engine's fallback for mixed shapes)
                results = [self.task_step(view, train) for view in views]
            query_loss = torch.stack([r.loss for r in results]).mean()
            align = self.alignment([r.z_align for r in results], batch)
            loss = query_loss + weight * align
        if train and not torch.isfinite(loss):
            message = (f"outer loss is {loss.item()} at step {self.global_step} (query {query_loss.item()}, "
                       f"align {align.item()})")
            if hp.nonfinite == "stop":
                raise FloatingPointError(f"{message}; lower model.lr or model.inner_lr, check the shards for broken "
                                         "images, or set model.nonfinite=skip to skip such steps")
            self.nonfinite_skipped += 1
            rank_zero_warn(f"{message}: step skipped, no update ({self.nonfinite_skipped} skipped so far)")
            self.log("train/nonfinite_skipped", float(self.nonfinite_skipped), batch_size=len(batch))
            return None
        n = len(batch)
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=n)
        self.log(f"{stage}/align", align, batch_size=n)
        for name in dict.fromkeys(t.domain for t in batch):
            mine = [r for r, t in zip(results, batch) if t.domain == name]
            self.log(f"{stage}/query_loss/{name}", torch.stack([r.loss for r in mine]).mean(), batch_size=len(mine))
            self.log(f"{stage}/support_loss/{name}", torch.stack([r.support_loss for r in mine]).mean(), batch_size=len(mine))
        for r, t in zip(results, batch):
            for key, value in r.scores.items():
                self.episode_scores[stage][t.domain][key].update(value)
        if train:
            self.log("train/logit_scale", self.model.scale(), batch_size=n)
            if self.prototype_weight is not None:
                self.log("train/prototype_weight", self.prototype_weight, batch_size=n)
        return loss

    def align_weight_now(self, train: bool) -> float:
        """lambda at this step: ``align_weight``, ramped up over ``align_warmup_steps`` in training."""
        hp = self.hparams
        ramp = min(1.0, (self.global_step + 1) / hp.align_warmup_steps) if train and hp.align_warmup_steps > 0 else 1.0
        return ramp * hp.align_weight

    def alignment(self, z_align: list[torch.Tensor], batch: list[Task]) -> torch.Tensor:
        """R_align over the tasks' query embeddings (each (Q_i, D)), grouped by domain; over every rank's
        with ``gather_align``; 0 when ``align_weight`` is 0."""
        hp = self.hparams
        z = torch.cat(z_align)  # (sum Q, D)
        if hp.align_weight == 0:
            return z.new_zeros(())
        ids = torch.cat([torch.full((len(zi),), t.domain_id, device=z.device) for zi, t in zip(z_align, batch)])
        if hp.gather_align and self._trainer is not None and self.trainer.world_size > 1:
            z, ids = self.gather_rows(z, ids)
        return alignment_loss(z, ids, hp.align)

    def backward_each_task(self, views: list[TaskView], weight: float) -> tuple[list[TaskResult], torch.Tensor, torch.Tensor]:
        """A training meta-batch differentiated one task at a time (``backward_per_task``).

        Tower features that carry a graph are replaced by leaf copies, so that each task's graph ends at them:
        it is differentiated (``torch.autograd.grad``) and freed as soon as its part of the objective is known,
        and the gradients are summed. The towers are differentiated once, at the end, through the features'
        summed gradients. The alignment term couples the tasks through their query embeddings z_i: a first pass
        computes them (no graph kept), dR/dz_i is taken once, and each task's objective adds <z_i, dR/dz_i>
        (the chain rule, term by term). The sum is the gradient of the whole objective (tests/test_meta.py).

        Returns:
            The detached results, the detached alignment term, and the surrogate: a scalar whose gradient is
            the objective's (every parameter's summed gradient, and the features' through the towers).
        """
        batch = [view.task for view in views]
        features, leaves = [], []  # tower outputs that carry a graph, and the leaves standing in for them
        for i, view in enumerate(views):
            inputs = view.inputs()
            if inputs is not None:
                pair = tuple(f.detach().requires_grad_(f.requires_grad) for f in inputs)
                features += [f for f in inputs if f.requires_grad]
                leaves += [f for f in pair if f.requires_grad]
                views[i] = view.with_inputs(*pair, view.domain_row)
        align, dz = self.model.logit_scale.new_zeros(()), [None] * len(views)
        if weight > 0:
            # the embeddings' values only: base ones need no inner loop; for adapted ones, first order gives the
            # same weights without the second-order graph
            base = self.hparams.align_on == "base" and self.hparams.method == "dcmcl"
            z = [(view.embed(view.query)[0] if base else self.task_step(view, train=True, first_order=True).z_align)
                 .detach().requires_grad_() for view in views]
            align = self.alignment(z, batch)
            dz = torch.autograd.grad(weight * align, z)
            align = align.detach()
        params = [p for p in self.parameters() if p.requires_grad]
        grads: list[torch.Tensor | None] = [None] * (len(params) + len(leaves))
        results = []
        for view, dz_i in zip(views, dz):
            r = self.task_step(view, train=True)
            objective = r.loss / len(views) + ((r.z_align * dz_i).sum() if dz_i is not None else 0.0)
            new = torch.autograd.grad(objective, params + leaves, allow_unused=True)
            grads = [b if a is None else a if b is None else a + b for a, b in zip(grads, new)]
            results.append(TaskResult(r.loss.detach(), r.z_align.detach(), r.support_loss))
        surrogate = sum(((x * g).sum() for x, g in zip(params + features, grads) if g is not None), align.new_zeros(()))
        return results, align, surrogate

    def gather_rows(self, z: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's query embeddings (with gradients to each rank's own) and domain ids, for an alignment
        term over the global meta-batch (as open_clip's ``gather_features``). Ranks may hold different numbers
        of rows (caption tasks, domain schedules): rows are padded to the largest count, then the padding dropped."""
        sizes = self.all_gather(torch.tensor(len(z), device=z.device)).flatten()
        pad = int(sizes.max()) - len(z)
        z_all = self.all_gather(torch.nn.functional.pad(z, (0, 0, 0, pad)), sync_grads=True).flatten(0, 1)
        ids_all = self.all_gather(torch.nn.functional.pad(ids, (0, pad), value=-1)).flatten(0, 1)
        keep = ids_all >= 0
        return z_all[keep], ids_all[keep]

    # ------------------------------------------------------------------ Lightning hooks
    def training_step(self, batch: list[Task], batch_idx: int) -> torch.Tensor | None:
        return self.meta_step(batch, "train")

    def on_fit_start(self) -> None:
        if self.hparams.nonfinite == "skip" and self.trainer.world_size > 1:
            raise ValueError("model.nonfinite=skip skips a step on one rank only, which stalls the others under DDP; "
                             "use model.nonfinite=stop with several devices")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["nonfinite_skipped"] = self.nonfinite_skipped
        # a frozen pretrained tower is rebuilt from its name when the checkpoint loads: store its digest, not its weights
        checkpoint["frozen_towers"] = self.model.frozen_tower_digests()
        for name in checkpoint["frozen_towers"]:
            for key in [k for k in checkpoint["state_dict"] if k.startswith(f"model.{name}.")]:
                del checkpoint["state_dict"][key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        theirs, ours = structure(checkpoint.get("hyper_parameters", {})), structure(dict(self.hparams))
        differ = [f"{key}: {theirs[key]!r} in the checkpoint, {ours[key]!r} here" for key in ours if theirs[key] != ours[key]]
        if differ:
            raise ValueError("the checkpoint was trained with another model configuration (" + "; ".join(differ) +
                             "): run with that run's config.yaml (-c <run>/config.yaml), or start a new run")
        self.nonfinite_skipped = checkpoint.get("nonfinite_skipped", 0)
        towers = checkpoint.get("frozen_towers", {})
        self.model.check_frozen_towers(towers)  # rebuilt from their names: the same weights?
        for name in towers:
            checkpoint["state_dict"].update({f"model.{name}.{k}": v for k, v in getattr(self.model, name).state_dict().items()})

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # A run whose max_steps ends mid-epoch would stop without validating; asking to stop at the
        # last step takes Lightning's early-stopping path, which validates (and checkpoints) first.
        if 0 < self.trainer.max_steps <= self.global_step:
            self.trainer.should_stop = True

    def validation_step(self, batch: list[Task], batch_idx: int) -> None:
        self._check_grad_mode()
        self.meta_step(batch, "val")

    def test_step(self, batch: list[Task], batch_idx: int) -> None:
        self._check_grad_mode()
        self.meta_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_accuracy("val")

    def on_test_epoch_end(self) -> None:
        self._log_accuracy("test")

    def _log_accuracy(self, stage: str) -> None:
        """Per domain: mean episode accuracy and macro-F1 with their 95% CIs and the episode count, the signs
        of collapse (``{stage}/collapse/*``) and what the inner loop does to the support loss
        (``{stage}/inner/support_gain``); the mean accuracy over domains. Warns when a domain collapses, when
        the inner loop raises the support loss, or when accuracy after adaptation is at chance.

        Every rank computes every domain's metric (a collective under DDP), so the ranks stay in step
        even when one of them saw no episode of a domain."""
        means = []
        for name, metrics in self.episode_scores[stage].items():
            results = {key: metric.compute() for key, metric in metrics.items()}
            for metric in metrics.values():
                metric.reset()
            if results["acc"]["episodes"] == 0:
                continue
            # already reduced over ranks by the metrics: identical everywhere, no sync_dist
            for key in ("acc", "f1"):
                self.log(f"{stage}/{key}/{name}", results[key]["mean"])
                self.log(f"{stage}/{key}_ci95/{name}", results[key]["ci95"])
            self.log(f"{stage}/episodes/{name}", results["acc"]["episodes"].float())
            for key in COLLAPSE:
                self.log(f"{stage}/collapse/{key}/{name}", results[key]["mean"])
            self.log(f"{stage}/inner/support_gain/{name}", results["support_gain"]["mean"])
            means.append(results["acc"]["mean"])
            if not self.trainer.sanity_checking:
                for message in score_warnings({k: float(v["mean"]) for k, v in results.items()}, float(results["acc"]["ci95"])):
                    rank_zero_warn(f"{stage} domain {name!r}: {message}")
        if means:
            self.log(f"{stage}/acc", torch.stack(means).mean(), prog_bar=True)

    def _score_metrics(self, stage_domains: dict[str, list[str]]) -> nn.ModuleDict:
        keys = ("acc", "f1", "chance", "support_gain", *COLLAPSE)
        return nn.ModuleDict({stage: nn.ModuleDict({name: nn.ModuleDict({k: EpisodeMean() for k in keys}) for name in names})
                              for stage, names in stage_domains.items()})

    def _check_grad_mode(self) -> None:
        if torch.is_inference_mode_enabled():
            raise RuntimeError("evaluation adapts on the support set and needs gradients: run with trainer.inference_mode=false")

    def param_groups(self) -> list[dict]:
        """AdamW groups: towers, fast weights (FiLM, heads, temperature), domain embeddings and MetaSGD
        rates, each with its own learning rate, split by whether weight decay applies."""
        hp = self.hparams
        lrs = {"towers": hp.tower_lr, "fast": hp.lr, "domain": hp.domain_lr, "metasgd": hp.metasgd_lr}
        buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if name.startswith("inner_lrs"):
                group = "metasgd"
            elif name.startswith(("model.image_tower", "model.text_tower")):
                group = "towers"
            elif name.startswith("model.domain"):
                group = "domain"
            else:
                group = "fast"
            decay = group in ("towers", "fast") and p.ndim >= 2 and not any(k in name for k in _NO_DECAY)
            buckets.setdefault((group, decay), []).append(p)
        return [
            {"name": group + ("" if decay else "_no_decay"), "params": params,
             "lr": lrs[group] if lrs[group] is not None else hp.lr, "weight_decay": hp.weight_decay if decay else 0.0}
            for (group, decay), params in sorted(buckets.items())
        ]

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.param_groups(), lr=self.hparams.lr)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = min(self.hparams.warmup_steps, total // 2)

        def schedule(step: int) -> float:  # linear warmup, then cosine to zero
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
