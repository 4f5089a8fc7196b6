"""Broker adapters: the ports (base.py) and their implementations, registered by name."""

from .base import (
    AccountSpec,
    Broker,
    BrokerAnswer,
    CopierPort,
    OrderReport,
    adapter_names,
    create_adapter,
)

__all__ = ["AccountSpec", "Broker", "BrokerAnswer", "CopierPort", "OrderReport",
           "adapter_names", "create_adapter"]
