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
from collections.abc import Callable
from typing import Any, cast

from redis.asyncio import Redis

# ARGV: now_ms, bucket_ms, retention_ms, keep_min, max_len, channel prefix, then groups of
# events that share a payload: event (a JSON string), data (JSON), n, then n user ids.
# KEYS: seq, stream, marks of each event's user, three per event in order (`publish`:
# declared, as Redis Cluster needs); or none, and the script builds the same names from
# the user id (`publish_many`: one call carries many users anyway, and ~600 fewer
# arguments per 100 events halve the cost of a fan-out for the publisher and for Redis).
# Returns the seqs.
_PUBLISH = """
local call = redis.call
local now, width = tonumber(ARGV[1]), tonumber(ARGV[2])
local bucket = math.floor(now / width)
local oldest = math.floor((now - tonumber(ARGV[3])) / width)
local keep_min, max_len, prefix = tonumber(ARGV[4]), ARGV[5], ARGV[6]
local seqs, e, i, declared = {}, 0, 7, #KEYS > 0
while i <= #ARGV do
  local tail = ',"event":' .. ARGV[i] .. ',"data":' .. ARGV[i + 1] .. '}'
  local last = i + 2 + tonumber(ARGV[i + 2])
  for j = i + 3, last do
    local uid = ARGV[j]
    local seq_key, stream, marks
    if declared then
      seq_key, stream, marks = KEYS[e * 3 + 1], KEYS[e * 3 + 2], KEYS[e * 3 + 3]
    else  -- EventStreams.keys(), spelled in Lua
      local tag = 'ev:{' .. uid .. '}:'
      seq_key, stream, marks = tag .. 'seq', tag .. 'stream', tag .. 'marks'
    end
    local seq = call('INCR', seq_key)
    local frame = '{"type":"event","seq":' .. seq .. tail
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
    call('PUBLISH', prefix .. uid, frame)
    e = e + 1
    seqs[e] = seq
  end
  i = last + 1
end
return seqs
"""
# Every frame starts so: the dispatcher reads the seq right after it (no other parsing).
FRAME_PREFIX = b'{"type":"event","seq":'
BATCH = 100  # events per script call in publish_many: keeps each call well under a millisecond

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
        self._script = redis.register_script(_PUBLISH)
        # ARGV 2-6 of every call (ARGV 1 is the time).
        self._settings: list[bytes | str | int] = [
            self.bucket_ms,
            self.retention_ms,
            keep_min,
            max_per_user,
            self.channel_prefix,
        ]

    def channel(self, user_id: int) -> bytes:
        return self.channel_prefix + str(user_id).encode()

    @staticmethod
    def keys(user_id: int) -> tuple[str, str, str]:
        return f"ev:{{{user_id}}}:seq", f"ev:{{{user_id}}}:stream", f"ev:{{{user_id}}}:marks"

    async def publish(self, user_id: int, event: str, data: dict[str, Any]) -> int:
        """Number, keep and announce one event; returns its seq. Raises on Redis errors."""
        args = [*self._head(), _dumps(event), _dumps(data), 1, user_id]
        seqs = await self._script(keys=list(self.keys(user_id)), args=args)
        return int(seqs[0])

    async def publish_many(self, events: list[tuple[int, str, dict[str, Any]]]) -> list[int]:
        """`publish` for many events: BATCH per script call, several calls in one pipeline.

        The script builds the key names itself here (they are not declared), so this
        needs a standalone Redis; on a Redis Cluster, publish per user instead."""
        if len(events) <= BATCH:  # one call: no pipeline (its SCRIPT EXISTS costs a round trip)
            return [int(seq) for seq in await self._script(keys=[], args=self._args(events))]
        async with self.redis.pipeline(transaction=False) as pipe:
            for i in range(0, len(events), BATCH):
                await self._script(keys=[], args=self._args(events[i : i + BATCH]), client=pipe)
            return [int(seq) for seqs in await pipe.execute() for seq in seqs]

    def _head(self) -> list[bytes | str | int]:
        return [int(self.clock() * 1000), *self._settings]

    def _args(self, events: list[tuple[int, str, dict[str, Any]]]) -> list[bytes | str | int]:
        """The script's ARGV: consecutive events with the same event and data (the same
        objects: a fan-out) form one group, so their payload is encoded and sent once."""
        groups: list[tuple[str, dict[str, Any], list[int]]] = []
        for user_id, event, data in events:
            if not groups or groups[-1][0] is not event or groups[-1][1] is not data:
                groups.append((event, data, []))
            groups[-1][2].append(user_id)
        args = self._head()
        for event, data, users in groups:
            args += (_dumps(event), _dumps(data), len(users), *users)
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

    async def first_kept(self, user_id: int) -> int | None:
        """The oldest seq still kept (for the reset frame), or None for an empty stream."""
        async with self._readers:
            entries = cast(
                _Entries, await self.redis.xrange(self.keys(user_id)[1], min="-", max="+", count=1)
            )
        return int(entries[0][0].split(b"-", 1)[0]) if entries else None
