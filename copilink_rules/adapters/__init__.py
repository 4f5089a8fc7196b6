"""Broker adapters: the interface (base.py) and its implementations, registered by name."""

from . import sim as _sim  # registers "sim"
from .base import BrokerAdapter, BrokerAnswer, adapter_names, create_adapter

__all__ = ["BrokerAdapter", "BrokerAnswer", "adapter_names", "create_adapter"]
del _sim
