"""Redis bus: routes frames between nodes over Redis Pub/Sub, on one server or a Redis Cluster.

On one server it uses PUBLISH / SUBSCRIBE. On a Redis Cluster it uses sharded Pub/Sub
(SPUBLISH / SSUBSCRIBE): a channel lives on the master that owns its key slot, so a frame
crosses exactly one shard instead of being broadcast to every node of the cluster.

Why not redis-py's own pub/sub: its asyncio `ClusterPubSub` (8.1) reads sharded messages by
polling one node at a time (`get_sharded_message(timeout)`), sends one SSUBSCRIBE write per
channel, and reconnects silently inside `get_message` with no hook to learn that frames may have
been lost. So this adapter keeps, per shard (the server, or each cluster master), one dedicated
subscriber connection read by one task, and one publishing connection, on top of redis-py's
low-level `Connection` (RESP2: parsing, AUTH, TLS):

- Subscribing only marks the channel; one writer task sends every pending change in one write
  (one SSUBSCRIBE per slot, or SUBSCRIBE with up to 1000 channels), then a `PING <token>` whose
  answer proves that everything before it was applied. `subscribe` waits for that answer, so a
  thousand concurrent subscribes cost one round trip.
- Publishes queued while a round trip is in flight go out together in the next one (in queue
  order, on one connection: per-channel order is kept, also for concurrent publishers).
- The subscriber connection doubles as the shard's health probe (periodic PING). While a shard
  is down, publishes to it fail at once with `Unavailable`; every network wait is bounded.
- A lost connection is re-established with exponential backoff, every live channel is
  subscribed again, and then the `on_recovered` callbacks run with that shard's channels (a
  slot that moved: with its channels). On a cluster, the slot map is
  re-read (CLUSTER SLOTS) on MOVED, on slot-migration notices and on every reconnect; channels
  whose slot changed owner move to the new master.

Invariant for the node: when `subscribe` returns, the channel is live, or `on_recovered` runs
once it is (the subscription was made during an outage or its confirmation was lost).

Layout: `bus.py` (`RedisBus`: routing, publish/subscribe, slot map upkeep, recovery), `shard.py`
(one master's two connections), `listener.py` (subscriber connection), `publisher.py`
(publishing connection), `slots.py` (cluster key slots, CLUSTER SLOTS), `wire.py` (connection
helpers over redis-py's `Connection`).
"""

from __future__ import annotations

from pigeon.adapters.bus.redis.bus import RedisBus

__all__ = ["RedisBus"]
