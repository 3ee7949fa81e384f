"""Per-user event streams in Redis: numbering, retention, replay (docs/websocket.md).

Keys of user 42 (the `{42}` hash tag keeps them on one Redis Cluster slot):

- `ev:{42}:seq`    the last seq given out (INCR). Never expires: seqs never restart.
- `ev:{42}:stream` a Stream whose entry ids ARE the seqs (`<seq>-0`), one field
                   `f` = the finished frame `{"type":"event","seq":N,"event":…,"data":…}`,
                   so replay is `XRANGE (<after>-0 +` and sends the bytes as stored.
- `ev:{42}:marks`  hash: time bucket → the first seq published in it (time-based trim).

One Lua script numbers, stores and announces an event: INCR, XADD, trim, PUBLISH run
atomically, so seqs have no gaps across every instance, and an event is in the stream
before any subscriber can see it live (whoever sees N+1 live can read N from the stream).

Several events of one user known at once (a paid order's `quota.changed` and
`order.paid`) go in one script run: consecutive seqs, one EVALSHA.

Group commit: publishes made while a round trip is in flight wait for it and then go
together, one EVALSHA each in one redis-py pipeline (no MULTI: each is its own atomic
script run). A lone publish costs one call; under load (many tasks announcing at once)
a round trip carries many. Callers keep their order: the batch is sent in the order
`publish` was called.

Retention: an event is kept while it is younger than EVENTS_RETENTION_HOURS *or* among
the user's last EVENTS_KEEP_MIN. Time is tracked in buckets of 1/24 of the retention
(an hour for 24 h); at the first publish of a user in a new bucket, the script drops
the marks of buckets that left the window and trims the stream exactly (`XTRIM MINID`)
to the older of "first seq still in the window" and "last KEEP_MIN". So an event lives
between the retention and one bucket more. EVENTS_MAX_PER_USER caps a stream whatever
its age (`XADD MAXLEN ~`): the safety valve against a runaway publisher; past it the
24 h promise yields and a late resume gets a `reset`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

from redis.asyncio import Redis

from server.hub.events import Event
from server.redis import ScriptBatch

# KEYS: the user's seq, stream and marks (EventStreams.keys). ARGV: now_ms, user id, then
# (event, data) pairs, both JSON strings: one or more events of that user, numbered in
# order. Returns the last seq. The hub's settings are written into the source
# (EventStreams.__init__), so a call packs two arguments and two per event, not nine.
_PUBLISH = """
local call = redis.call
local width, retention, prefix = {bucket_ms}, {retention_ms}, '{prefix}'
local keep_min, max_len = {keep_min}, {max_len}
local seq_key, stream, marks = KEYS[1], KEYS[2], KEYS[3]
local now = tonumber(ARGV[1])
local channel = prefix .. ARGV[2]
local bucket = math.floor(now / width)
local oldest = math.floor((now - retention) / width)
local seq
for i = 3, #ARGV, 2 do
  seq = call('INCR', seq_key)
  local frame = '{{"type":"event","seq":' .. seq .. ',"event":' .. ARGV[i]
    .. ',"data":' .. ARGV[i + 1] .. '}}'
  call('XADD', stream, 'MAXLEN', '~', max_len, seq .. '-0', 'f', frame)
  if call('HSETNX', marks, bucket, seq) == 1 then
    -- the user's first event in this time bucket: drop what left the window
    local keep_from = seq - keep_min + 1
    local kept = call('HGETALL', marks)
    for k = 1, #kept, 2 do
      local first = tonumber(kept[k + 1])
      if tonumber(kept[k]) < oldest then
        call('HDEL', marks, kept[k])
      elseif first < keep_from then
        keep_from = first
      end
    end
    if keep_from > 1 then
      call('XTRIM', stream, 'MINID', keep_from .. '-0')
    end
  end
  call('PUBLISH', channel, frame)
end
return seq
"""
# Every frame starts so: the dispatcher reads the seq right after it (no other parsing).
FRAME_PREFIX = b'{"type":"event","seq":'

_Entries = list[tuple[bytes, dict[bytes, bytes]]]  # XRANGE, decode_responses=False


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class EventStreams:
    """The Redis side of the hub: publish (number + keep + announce), read back, last seq."""

    def __init__(
        self,
        redis: Redis,
        *,
        retention_seconds: float,
        keep_min: int,
        max_per_user: int,
        clock: Callable[[], float] = time.time,
        readers: int = 25,
    ) -> None:
        self.redis = redis
        # Reads for sockets (attach, replay) share the Redis pool with everything else: a
        # thousand clients reconnecting at once must queue here, not exhaust the pool.
        self._readers = asyncio.Semaphore(readers)
        db = int(redis.connection_pool.connection_kwargs.get("db", 0) or 0)
        # Pub/sub ignores SELECT: the db number keeps apps on other dbs of one Redis apart.
        self.channel_prefix = f"ev:live:{db}:".encode()
        self.retention_ms = max(1, int(retention_seconds * 1000))
        self.bucket_ms = max(1, self.retention_ms // 24)
        self.keep_min = keep_min
        self.max_per_user = max_per_user
        self.clock = clock
        self.script = redis.register_script(
            _PUBLISH.format(
                bucket_ms=self.bucket_ms,
                retention_ms=self.retention_ms,
                keep_min=int(keep_min),
                max_len=int(max_per_user),
                prefix=self.channel_prefix.decode(),  # ev:live:<db>: (digits and colons)
            )
        )
        self._batch = ScriptBatch(redis, self.script, "events")

    def channel(self, user_id: int) -> bytes:
        return self.channel_prefix + str(user_id).encode()

    @staticmethod
    def keys(user_id: int) -> tuple[str, str, str]:
        return f"ev:{{{user_id}}}:seq", f"ev:{{{user_id}}}:stream", f"ev:{{{user_id}}}:marks"

    async def publish(self, user_id: int, events: Sequence[Event]) -> int:
        """Number, keep and announce one or more events of one user, in order, in one
        script run; returns the last seq. Raises on Redis errors. Concurrent calls share a
        round trip (the module doc); a caller that stops waiting (a timeout) does not
        stop its events from being sent."""
        return int(await self._batch.run(self.keys(user_id), self.args(user_id, events)))

    async def close(self) -> None:
        """Wait (briefly) for the events still being sent."""
        await self._batch.close()

    def args(self, user_id: int, events: Sequence[Event]) -> list[str | int]:
        """The script's ARGV for these events (`script` with `keys(user_id)` publishes them)."""
        args: list[str | int] = [int(self.clock() * 1000), user_id]
        for event, data in events:
            args += (_dumps(event), _dumps(data))
        return args

    async def last_seq(self, user_id: int) -> int:
        async with self._readers:
            raw = await self.redis.get(self.keys(user_id)[0])
        return int(raw) if raw is not None else 0

    async def read_after(self, user_id: int, after: int, count: int) -> list[tuple[int, bytes]]:
        """Up to `count` kept events with seq > after, in order, as (seq, frame)."""
        async with self._readers:
            raw = await self.redis.xrange(self.keys(user_id)[1], min=f"({after}-0", max="+", count=count)
        entries = cast(_Entries, raw)
        out: list[tuple[int, bytes]] = []
        for entry_id, fields in entries:
            out.append((int(entry_id.split(b"-", 1)[0]), fields[b"f"]))
        return out
