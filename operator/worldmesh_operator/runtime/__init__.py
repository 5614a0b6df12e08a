"""Runtimes carry out the reconciler's actions: local processes here, Kubernetes pods later."""

from .base import Runtime
from .local import LocalRuntime

__all__ = ["LocalRuntime", "Runtime"]
