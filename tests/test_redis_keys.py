"""rtchat/broker/redis/keys.py: every name under one prefix, each spelled once."""

from rtchat.broker.redis.keys import Keys
from rtchat.broker.redis.publish import publish_script


def test_names_under_the_prefix() -> None:
    k = Keys("p:", "node-a")
    assert k.stream("lobby") == "p:room:lobby"
    assert k.channel("lobby") == "p:ch:lobby" and k.room_of(k.channel("lobby")) == "lobby"
    assert k.probe_channel == "p:probe:node-a"
    assert k.presence("lobby") == "p:presence:lobby"
    # The heartbeat key, its pattern and another node's key come from one spelling.
    assert k.own_node == k.node("node-a") == "p:node:node-a"
    assert k.node_pattern == "p:node:*" and k.node("node-b") == "p:node:node-b"
    # Cluster-wide records; neither matches the heartbeat pattern.
    assert k.members == "p:members" and k.failovers == "p:failovers"


def test_the_publish_script_ships_next_to_its_module() -> None:
    script = publish_script()
    assert "XADD" in script and "PUBLISH" in script and "'\\n'" in script
