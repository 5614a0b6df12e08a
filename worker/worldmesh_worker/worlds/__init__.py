"""Per-pair worlds: 2-rank process groups built on stock PyTorch, one per communicating pair."""

from .manager import WorldManager, choose_backend, world_name
from .wire import MalformedMessage, Message, MessageKind
from .world import World, WorldBroken, WorldOptions, WorldState

__all__ = [
    "MalformedMessage",
    "Message",
    "MessageKind",
    "World",
    "WorldBroken",
    "WorldManager",
    "WorldOptions",
    "WorldState",
    "choose_backend",
    "world_name",
]
