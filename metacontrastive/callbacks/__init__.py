"""Callbacks for TensorBoard: few-shot evaluation, alignment diagnostics, throughput and scaling, the run report.

Each is configured from the CLI or a YAML preset (``trainer.callbacks``); ``conf/default.yaml`` turns on
the cheap ones.
"""
from metacontrastive.callbacks.alignment import AlignmentCallback
from metacontrastive.callbacks.fewshot import FewShotEvalCallback
from metacontrastive.callbacks.report import RunReport
from metacontrastive.callbacks.scaling import ScalingCallback

__all__ = ["AlignmentCallback", "FewShotEvalCallback", "RunReport", "ScalingCallback"]
