"""Callbacks: few-shot evaluation, alignment diagnostics, throughput and scaling, the run report, the
checkpoints a run resumes from, and a progress bar that counts a ``max_steps`` run's epochs.

Each is configured from the CLI or a YAML preset (``trainer.callbacks``); ``conf/default.yaml`` turns on
the cheap ones, and the CLI (``metacontrastive.cli``) puts in the progress bar.
"""
from metacontrastive.callbacks.alignment import AlignmentCallback
from metacontrastive.callbacks.checkpoints import FiniteModelCheckpoint, ResumeCheckpoint
from metacontrastive.callbacks.fewshot import FewShotEvalCallback
from metacontrastive.callbacks.progress import StepProgressBar
from metacontrastive.callbacks.report import RunReport
from metacontrastive.callbacks.scaling import ScalingCallback

__all__ = ["AlignmentCallback", "FewShotEvalCallback", "FiniteModelCheckpoint", "ResumeCheckpoint", "RunReport",
           "ScalingCallback", "StepProgressBar"]
