"""The Redis broker: publish on the master, subscribe on a replica, never lose the thread.

Split by the state each part owns; ``broker.RedisBroker`` ties them together:

* ``keys``          every key and channel name (pure)
* ``endpoint``      one server: its clients and its health record
* ``topology``      master, replicas, the verdict, the endpoint to subscribe on
* ``sentinel``      the master and replicas as Sentinel reports them
* ``subscription``  the pub/sub connection, its confirmations and the delivery probe
* ``delivery``      per room, the last delivered id: ``prev``-chain order and gap fill
* ``publish``       the Lua script (``publish.lua``) and ``WAIT``
* ``history``       the stream reads
* ``cluster``       heartbeats, members and presence
* ``failovers``     this node's switches, and every node's kept in Redis
* ``clusterview``   what the heartbeat carries, the cluster read back, the verdict
* ``broker``        lifecycle, health round, switches, readiness, status

Redis Cluster mode (``broker.redis.cluster``) reuses all of the above per shard:

* ``shard``          one shard: its topology, its sharded subscription and probe, switches
* ``shard_map``      the shards from ``CLUSTER SHARDS``; the ``RedisCluster`` client
* ``cluster_broker`` lifecycle, rooms to shards, publishing with MOVED/ASK, status

Imports run one way: ``keys`` and ``endpoint`` are leaves, ``sentinel``
stands on ``topology``, ``shard_map`` on ``shard``, and only the two brokers
import the rest. This
package is the only place rtchat imports ``redis``.
"""

from rtchat.broker.redis.broker import RedisBroker
from rtchat.broker.redis.cluster_broker import ClusterBroker

__all__ = ["ClusterBroker", "RedisBroker"]
