"""Runtimes carry out the reconciler's actions: worker processes (``local``) or pods
(``kubernetes``), both on ``base.WorkerRuntime``."""

from .base import Runtime, Target, WorkerRuntime

__all__ = ["Runtime", "Target", "WorkerRuntime"]
