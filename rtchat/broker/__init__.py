"""Message buses behind one protocol: ``base.Broker``; ``memory`` and ``redis`` implement it."""

from __future__ import annotations

from rtchat.broker.base import Broker
from rtchat.config import Config


def make_broker(cfg: Config, node_id: str) -> Broker:
    """The broker the config asks for. The Redis one is imported only when used."""
    if cfg.broker.backend == "redis":
        if cfg.broker.redis.cluster is not None:
            from rtchat.broker.redis import ClusterBroker

            return ClusterBroker(cfg, node_id)
        from rtchat.broker.redis import RedisBroker

        return RedisBroker(cfg, node_id)
    from rtchat.broker.memory import MemoryBroker

    return MemoryBroker(cfg, node_id)
