"""What ``MetaContrastiveModule`` refuses and warns about: impossible options (before any work starts), a
checkpoint of another structure, and what a domain's evaluation scores say is wrong."""
from __future__ import annotations

import math

from metacontrastive.metrics import COLLAPSE

__all__ = ["check_options", "score_warnings", "structure"]


def structure(hparams: dict) -> dict:
    """The options that decide which tensors a checkpoint holds, and their shapes."""
    encoder = hparams.get("encoder") or {}
    shapes = ("image_tower", "text_tower", "embed_dim", "hidden_dim", "domain_dim", "condition_image", "condition_text",
              "tail")
    return {"domains": hparams.get("domains"), "algorithm": hparams.get("algorithm"),
            "adapt_scope": hparams.get("adapt_scope"), "prototype_prompts": hparams.get("prototype_prompts") is not None,
            **{f"encoder.{key}": encoder.get(key) for key in shapes}}


def check_options(options: dict) -> None:
    """Refuse settings that cannot mean anything, before any work starts, naming the option and its range."""
    def refuse(name: str, why: str) -> None:
        raise ValueError(f"model.{name}={options[name]!r}: {why}")

    domains = options["domains"]
    if not domains or len(set(domains)) != len(domains):
        refuse("domains", "name at least one domain, each once")
    if options["inner_steps"] < (1 if options["method"] == "dcmcl" else 0):
        refuse("inner_steps", "the dcmcl method adapts on every support set: use 1 or more (method=contrastive "
                              "trains without an inner loop)" if options["method"] == "dcmcl" else "use 0 or more")
    if options["eval_inner_steps"] is not None and options["eval_inner_steps"] < 0:
        refuse("eval_inner_steps", "use 0 or more (0 scores the meta-learned initialisation), or null for inner_steps")
    for name in ("inner_lr", "lr"):
        if not math.isfinite(options[name]) or options[name] <= 0:
            refuse(name, "a learning rate must be a finite number above 0")
    for name in ("tower_lr", "domain_lr", "metasgd_lr"):
        if options[name] is not None and (not math.isfinite(options[name]) or options[name] <= 0):
            refuse(name, "a learning rate must be a finite number above 0, or null for model.lr")
    rate = options["inner_label_lr"]
    if rate is not None and (not math.isfinite(rate) or rate <= 0):
        refuse("inner_label_lr", "a learning rate must be a finite number above 0, or null to leave the labels to the "
                                 "fast weights")
    if not 0.0 <= options["domain_dropout"] <= 1.0:
        refuse("domain_dropout", "a probability: use a value in [0, 1]")
    for name in ("align_weight", "weight_decay", "warmup_steps", "align_warmup_steps"):
        if options[name] < 0:
            refuse(name, "use 0 or more")


def score_warnings(means: dict[str, float], acc_ci95: float) -> list[str]:
    """What a domain's mean evaluation scores say is wrong: collapse, an inner loop that raises the support
    loss, accuracy at chance after adaptation."""
    out = [f"collapsing: {key} = {means[key]:.3f} > {limit} (see {key} under */collapse/ in TensorBoard; try a lower "
           "model.inner_lr or model.lr)" for key, limit in COLLAPSE.items() if means[key] > limit]
    if means["support_gain"] < 0:
        out.append(f"the inner loop raises the support loss by {-means['support_gain']:.3f} on average: model.inner_lr "
                   "is too large for these fast weights")
    if means["acc"] - means["chance"] <= acc_ci95:
        out.append(f"accuracy after adaptation, {100 * means['acc']:.1f}% +- {100 * acc_ci95:.1f}, is at chance "
                   f"({100 * means['chance']:.1f}%): the inner loop cannot help yet")
    return out
