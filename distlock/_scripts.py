"""The lock's Lua scripts. Every key of one lock name carries the same hash tag ``{name}``.

Keys of lock ``N`` under prefix ``P``::

    P:lock:{N}             STRING owner-id ["*"], PX ttl             the lease ("*": waiters queued)
    P:lock:{N}:fence       STRING "<last token>[:<released-by>]"     fencing state, PX retention
    P:lock:{N}:queue       ZSET "<ttl_ms>:<owner>" -> arrival ms     FIFO of blocked waiters
    P:lock:{N}:qexp        HASH "<ttl_ms>:<owner>" -> expiry ms      waiters' keep-alive
    P:lock:{N}:wake:<own>  LIST [token]                              handoff to one waiter

Fencing token = max(server TIME in microseconds, last + 1): a hybrid logical clock, so tokens
keep increasing after the fence key expires or the server restarts empty (docs/fencing.md).
Release hands the lease straight to the oldest live waiter and pushes the token onto that waiter's
own wake list: one waiter wakes per release, in FIFO order, in about one round trip. A waiter that
queues marks the lease with a trailing "*", so a release without waiters never looks at the queue.
All scripts are idempotent for a given owner id, so a retry after a lost reply is harmless.
Uncontended cost: acquire = EXISTS, SET NX, TIME, GET, SET; release = GET, SET, DEL.
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

# The fence string: the last token issued, then ":" and the owner id of the last release.
_FENCE = """
local function read_fence(fence)
  local v = redis.call('GET', fence)
  if not v then return 0, nil end
  return tonumber(string.match(v, '^%d+')) or 0, string.match(v, '^%d+:(.+)$')
end

-- Issue the next token and record it (keeping the last releaser); `lease_set`: lease written.
local function grant(lease, fence, value, ttl_ms, retention_ms, lease_set, released_by)
  local t = redis.call('TIME')
  local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local last, prev_rel = read_fence(fence)
  local token = math.max(now_us, last + 1)
  if token >= 9007199254740992 then  -- 2^53: Lua's doubles would stop counting exactly
    if lease_set then redis.call('DEL', lease) end
    error('DISTLOCK fencing token space exhausted at ' .. fence)  -- nothing granted
  end
  if not lease_set then redis.call('SET', lease, value, 'PX', ttl_ms) end
  released_by = released_by or prev_rel
  if released_by then  -- (Lua's own number-to-string would print 1.79e+15: format it exactly)
    redis.call('SET', fence, string.format('%.0f', token) .. ':' .. released_by,
               'PX', math.max(retention_ms, ttl_ms))
  else
    redis.call('SET', fence, token, 'PX', math.max(retention_ms, ttl_ms))
  end
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
    + _FENCE
    + _FIRST_LIVE
    + """
local lease, fence, queue, qexp, wake = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local owner, ttl_ms = ARGV[1], tonumber(ARGV[2])
local retention_ms, wait_ms = tonumber(ARGV[3]), tonumber(ARGV[4])
local queued = redis.call('EXISTS', queue) == 1
if not queued and redis.call('SET', lease, owner, 'NX', 'PX', ttl_ms) then
  return {1, grant(lease, fence, owner, ttl_ms, retention_ms, true, nil)}
end
local holder = redis.call('GET', lease)
if holder == owner or holder == owner .. '*' then
  redis.call('DEL', wake)
  local token = read_fence(fence)
  return {1, token}
end
local member = ARGV[2] .. ':' .. owner
local now = nil
if not holder and queued then
  now = now_ms()
  local first = first_live(queue, qexp, now)
  if first == nil or first == member then
    local value = owner
    if first then
      redis.call('ZREM', queue, member)
      redis.call('HDEL', qexp, member)
      if redis.call('EXISTS', queue) == 1 then value = owner .. '*' end
    end
    return {1, grant(lease, fence, value, ttl_ms, retention_ms, false, nil)}
  end
end
if wait_ms > 0 then
  now = now or now_ms()
  redis.call('ZADD', queue, 'NX', now, member)
  redis.call('HSET', qexp, member, now + wait_ms)
  redis.call('PEXPIRE', queue, wait_ms + 60000)
  redis.call('PEXPIRE', qexp, wait_ms + 60000)
  if holder and string.sub(holder, -1) ~= '*' then
    redis.call('SET', lease, holder .. '*', 'KEEPTTL')
  end
end
return {0, redis.call('PTTL', lease)}
""",
)

# KEYS: lease, fence, queue, qexp, wake-list prefix ("P:lock:{N}:wake:"), my wake list
# ARGV: owner, retention_ms, abandon (1: also leave the queue when not the holder),
#       token (the holder's fencing token; 0 when unknown, e.g. a cancelled acquire)
# Returns 1 released (handed to the next live waiter if any); 2 already released by this owner
#         (a retry after a lost reply); 0 not the holder (expired or taken over).
RELEASE = Script(
    "distlock.release",
    _NOW_MS
    + _FENCE
    + _FIRST_LIVE
    + """
local lease, fence, queue, qexp = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local wake_prefix, wake = KEYS[5], KEYS[6]
local owner, retention_ms, abandon = ARGV[1], tonumber(ARGV[2]), ARGV[3] == '1'
local holder = redis.call('GET', lease)
if holder == owner then  -- the common case: nobody waits
  local token = ARGV[4]
  if token == '0' then token = string.format('%.0f', read_fence(fence)) end
  redis.call('SET', fence, token .. ':' .. owner, 'PX', retention_ms)
  redis.call('DEL', lease)
  if abandon then redis.call('DEL', wake) end
  return 1
end
if holder ~= owner .. '*' then
  if abandon then
    local members = redis.call('ZRANGE', queue, 0, -1)
    for _, m in ipairs(members) do
      if string.sub(m, -string.len(owner) - 1) == ':' .. owner then
        redis.call('ZREM', queue, m)
        redis.call('HDEL', qexp, m)
      end
    end
    redis.call('DEL', wake)
  end
  local _, released_by = read_fence(fence)
  if released_by == owner then return 2 end
  return 0
end
if abandon then redis.call('DEL', wake) end
local first = first_live(queue, qexp, now_ms())
if first then
  local sep = string.find(first, ':', 1, true)
  local next_ttl = tonumber(string.sub(first, 1, sep - 1))
  local next_owner = string.sub(first, sep + 1)
  redis.call('ZREM', queue, first)
  redis.call('HDEL', qexp, first)
  local value = next_owner
  if redis.call('EXISTS', queue) == 1 then value = next_owner .. '*' end
  local next_token = grant(lease, fence, value, next_ttl, retention_ms, false, owner)
  local next_wake = wake_prefix .. next_owner
  redis.call('RPUSH', next_wake, next_token)
  redis.call('PEXPIRE', next_wake, next_ttl)
  return 1
end
local token = ARGV[4]
if token == '0' then token = string.format('%.0f', read_fence(fence)) end
redis.call('SET', fence, token .. ':' .. owner, 'PX', retention_ms)
redis.call('DEL', lease)
return 1
""",
)

# KEYS: lease;  ARGV: owner, ttl_ms
# Returns 1 when the lease was reset to ttl_ms from now, 0 when owner does not hold it.
EXTEND = Script(
    "distlock.extend",
    """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] or holder == ARGV[1] .. '*' then
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

# KEYS: lease;  ARGV: owner
# Returns {exists (0/1), held_by_owner (0/1)}.
PEEK = Script(
    "distlock.peek",
    """
local holder = redis.call('GET', KEYS[1])
if not holder then return {0, 0} end
if holder == ARGV[1] or holder == ARGV[1] .. '*' then return {1, 1} end
return {1, 0}
""",
)

# KEYS: fence;  ARGV: token, retention_ms
# Raises the fence's last token to at least `token` (a max-register; keeps the last releaser).
# Returns 1.
FENCE_MAX = Script(
    "distlock.fence_max",
    """
local v = redis.call('GET', KEYS[1])
local last, rel = 0, nil
if v then
  last = tonumber(string.match(v, '^%d+')) or 0
  rel = string.match(v, '^%d+:(.+)$')
end
if tonumber(ARGV[1]) > last then
  local value = ARGV[1]
  if rel then value = value .. ':' .. rel end
  redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
end
return 1
""",
)
