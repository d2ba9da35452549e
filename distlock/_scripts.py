"""The lock's Lua scripts. Every key of one lock name carries the same hash tag ``{name}``.

Keys of lock ``N`` under prefix ``P``::

    P:lock:{N}             lease: STRING owner-id, PX ttl           (who holds it, until when)
    P:lock:{N}:fence       HASH last=<token>, rel=<owner-id>        (fencing state, PX retention)
    P:lock:{N}:queue       ZSET "<ttl_ms>:<owner>" -> arrival ms    (FIFO of blocked waiters)
    P:lock:{N}:qexp        HASH "<ttl_ms>:<owner>" -> expiry ms     (waiters' keep-alive)
    P:lock:{N}:wake:<own>  LIST [token]                             (handoff to one waiter)

Fencing token = max(server TIME in microseconds, last + 1): a hybrid logical clock, so tokens
keep increasing after the fence hash expires or the server restarts empty (docs/fencing.md).
Release hands the lease straight to the oldest live waiter and pushes the token onto that waiter's
own wake list: one waiter wakes per release, in FIFO order, in about one round trip.
All scripts are idempotent for a given owner id, so a retry after a lost reply is harmless.
"""

from __future__ import annotations

from distkit import Script

# Shared Lua helpers (prepended to the scripts that need them).
_NOW_MS = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

_GRANT = """
local function grant(lease, fence, owner, ttl_ms, retention_ms)
  local t = redis.call('TIME')
  local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local last = tonumber(redis.call('HGET', fence, 'last')) or 0
  local token = math.max(now_us, last + 1)
  if token >= 9007199254740992 then  -- 2^53: Lua's doubles would stop counting exactly
    error('DISTLOCK fencing token space exhausted at ' .. fence)  -- before any write
  end
  redis.call('SET', lease, owner, 'PX', ttl_ms)
  redis.call('HSET', fence, 'last', string.format('%.0f', token))
  redis.call('PEXPIRE', fence, math.max(retention_ms, ttl_ms))
  return token
end
"""

# Drop dead waiters from the head of the queue; return the first live member (or nil).
_FIRST_LIVE = """
local function first_live(queue, qexp, now)
  for _ = 1, 64 do
    local first = redis.call('ZRANGE', queue, 0, 0)[1]
    if not first then return nil end
    local exp = tonumber(redis.call('HGET', qexp, first))
    if exp and exp > now then return first end
    redis.call('ZREM', queue, first)
    redis.call('HDEL', qexp, first)
  end
  return nil
end
"""

# KEYS: lease, fence, queue, qexp, my wake list
# ARGV: owner, ttl_ms, retention_ms, wait_ms (0: try only; > 0: join/refresh the queue for wait_ms)
# Returns {1, token} when held by owner (granted now, or earlier: a retried call or a handoff);
#         {0, pttl} otherwise (pttl -2: free but older waiters are queued; -1: key has no expiry).
ACQUIRE = Script(
    "distlock.acquire",
    _NOW_MS
    + _GRANT
    + _FIRST_LIVE
    + """
local lease, fence, queue, qexp, wake = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local owner, ttl_ms = ARGV[1], tonumber(ARGV[2])
local retention_ms, wait_ms = tonumber(ARGV[3]), tonumber(ARGV[4])
local member = ARGV[2] .. ':' .. owner
local holder = redis.call('GET', lease)
if holder == owner then
  redis.call('DEL', wake)
  return {1, redis.call('HGET', fence, 'last')}
end
local now = now_ms()
if not holder then
  local first = nil
  if redis.call('EXISTS', queue) == 1 then first = first_live(queue, qexp, now) end
  if first == nil or first == member then
    if first then
      redis.call('ZREM', queue, member)
      redis.call('HDEL', qexp, member)
    end
    return {1, grant(lease, fence, owner, ttl_ms, retention_ms)}
  end
end
if wait_ms > 0 then
  redis.call('ZADD', queue, 'NX', now, member)
  redis.call('HSET', qexp, member, now + wait_ms)
  redis.call('PEXPIRE', queue, wait_ms + 60000)
  redis.call('PEXPIRE', qexp, wait_ms + 60000)
end
return {0, redis.call('PTTL', lease)}
""",
)

# KEYS: lease, fence, queue, qexp, wake-list prefix ("P:lock:{N}:wake:"), my wake list
# ARGV: owner, retention_ms, abandon (1: also leave the queue when not the holder)
# Returns 1 released (handed to the next live waiter if any); 2 already released by this owner
#         (a retry after a lost reply); 0 not the holder (expired or taken over).
RELEASE = Script(
    "distlock.release",
    _NOW_MS
    + _GRANT
    + _FIRST_LIVE
    + """
local lease, fence, queue, qexp = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local wake_prefix, wake = KEYS[5], KEYS[6]
local owner, retention_ms, abandon = ARGV[1], tonumber(ARGV[2]), ARGV[3] == '1'
if redis.call('GET', lease) ~= owner then
  if abandon then
    local tail = redis.call('ZRANGE', queue, 0, -1)
    for _, m in ipairs(tail) do
      if string.sub(m, -string.len(owner) - 1) == ':' .. owner then
        redis.call('ZREM', queue, m)
        redis.call('HDEL', qexp, m)
      end
    end
    redis.call('DEL', wake)
  end
  if redis.call('HGET', fence, 'rel') == owner then return 2 end
  return 0
end
redis.call('HSET', fence, 'rel', owner)
redis.call('DEL', wake)
if redis.call('EXISTS', queue) == 1 then
  local first = first_live(queue, qexp, now_ms())
  if first then
    local sep = string.find(first, ':', 1, true)
    local next_ttl = tonumber(string.sub(first, 1, sep - 1))
    local next_owner = string.sub(first, sep + 1)
    redis.call('ZREM', queue, first)
    redis.call('HDEL', qexp, first)
    local token = grant(lease, fence, next_owner, next_ttl, retention_ms)
    local next_wake = wake_prefix .. next_owner
    redis.call('RPUSH', next_wake, string.format('%.0f', token))
    redis.call('PEXPIRE', next_wake, next_ttl)
    return 1
  end
end
redis.call('DEL', lease)
return 1
""",
)

# KEYS: lease;  ARGV: owner, ttl_ms
# Returns 1 when the lease was reset to ttl_ms from now, 0 when owner does not hold it.
EXTEND = Script(
    "distlock.extend",
    """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
""",
)

# KEYS: the guarded resource's hash;  ARGV: token, value
# Returns {1, token} when the write was applied (token >= highest seen; both stored atomically),
#         {0, highest} when the token is stale and nothing was written.
FENCED_WRITE = Script(
    "distlock.fenced_write",
    """
local highest = tonumber(redis.call('HGET', KEYS[1], 'token'))
local token = tonumber(ARGV[1])
if highest and token < highest then
  return {0, string.format('%.0f', highest)}
end
redis.call('HSET', KEYS[1], 'token', ARGV[1], 'value', ARGV[2])
return {1, ARGV[1]}
""",
)
