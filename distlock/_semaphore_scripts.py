"""The semaphore's Lua scripts. Every key of one semaphore name carries the hash tag ``{name}``.

Keys of semaphore ``N`` under prefix ``P``::

    P:sem:{N}:holders      ZSET owner -> expiry ms (server TIME)  the permits held now
    P:sem:{N}:tokens       HASH owner -> fencing token            each holder's token
    P:sem:{N}:fence        STRING last token issued, PX retention fencing state (an HLC)
    P:sem:{N}:limit        STRING the limit, PX >= retention, never shortened, outlives every lease:
                                                                  refuses a second limit
    P:sem:{N}:queue        ZSET "<ttl_ms>:<owner>" -> arrival ms  FIFO of blocked waiters
    P:sem:{N}:qexp         HASH "<ttl_ms>:<owner>" -> expiry ms   waiters' keep-alive
    P:sem:{N}:wake:<own>   LIST [token]                           handoff to one waiter
    P:sem:{N}:rel          ZSET owner -> release ms, PX 60 s      recognises a retried release

Holders whose expiry (server TIME) has passed are pruned by every script before it counts, so a
crashed holder's permit frees within its TTL. Whenever a permit is free and live waiters are
queued, the script at hand grants it to the oldest one and pushes the token onto that waiter's
own wake list (``fill``): one wake-up per freed permit, in FIFO order. Fencing token =
max(server TIME in microseconds, last + 1), as for the lock (docs/fencing.md). Every script is
idempotent per owner id, so a retry after a lost reply is harmless. Each operation costs
O(log n) in the holders and waiters, plus O(k) for k expired entries it prunes.
"""

from __future__ import annotations

from distkit import Script

# The lock's rule for a queue entry (distlock/_scripts.py, the same text: test_scripts.py checks).
_WAITER = """
local function waiter(member, exp, now, wake_prefix)
  exp = tonumber(exp)
  if not (exp and exp > now and exp <= now + 60000) then return nil end  -- nan too
  local ttl, who = string.match(member, '^([1-9]%d*):([^*]+)$')
  if not ttl or string.len(ttl) > 12 or tonumber(ttl) > 315360000000 then return nil end
  local kind = redis.call('TYPE', wake_prefix .. who)['ok']
  if kind ~= 'none' and kind ~= 'list' then return nil end
  return ttl, who
end
"""

_HELPERS = (
    _WAITER
    + """
-- drop holders whose lease ended by the server clock, and foreign ones: an expiry further ahead
-- than the longest ttl distlock accepts (ten years) was not written by distlock
local function prune(holders, tokens, now)
  local dead = redis.call('ZRANGEBYSCORE', holders, '-inf', now, 'LIMIT', 0, 64)
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', holders, '(' .. (now + 315360000000), '+inf',
                                'LIMIT', 0, 64)) do
    table.insert(dead, m)
  end
  for _, m in ipairs(dead) do
    redis.call('ZREM', holders, m)
    redis.call('HDEL', tokens, m)
  end
end
"""
    + """
local function now_ms()
  local t = redis.call('TIME')
  return t[1] * 1000 + math.floor(t[2] / 1000), t[1] * 1000000 + t[2]
end

-- a stored value distlock never writes is an error naming the key ("DISTLOCK corrupt": the
-- client raises ForeignDataError); the fence: an integer from 0 to 2^53 - 1
local function fence_value(fence)
  local last = redis.call('GET', fence)
  if not last then return nil end
  local n = tonumber(last)
  if not n or n < 0 or n % 1 ~= 0 or n >= 9007199254740992 then
    error('DISTLOCK corrupt fencing state at ' .. fence)
  end
  return n
end

-- the stored limit: as this module writes it, a decimal int from 1 to 2^31
local function limit_value(limit_key, stored)
  local n = tonumber(stored)
  if not string.find(stored, '^[1-9]%d*$') or n > 2147483648 then
    error('DISTLOCK corrupt limit at ' .. limit_key)
  end
  return n
end

local function next_token(fence, us)
  local token = us
  local last = fence_value(fence)
  if last and last >= token then token = last + 1 end
  if token >= 9007199254740992 then
    error('DISTLOCK fencing token space exhausted at ' .. fence)
  end
  return token
end

-- keep the holder keys alive while the latest lease runs, and at least `keep` ms; the stored
-- limit as long (never shortened: it must outlive every live permit, whoever's `keep` is short)
local function keep_alive(holders, tokens, limit_key, now, keep)
  local last = redis.call('ZRANGE', holders, -1, -1, 'WITHSCORES')
  local px = keep
  if last[2] then px = math.max(px, tonumber(last[2]) - now + 1000) end
  redis.call('PEXPIRE', holders, px)
  redis.call('PEXPIRE', tokens, px)
  redis.call('PEXPIRE', limit_key, math.max(px, redis.call('PTTL', limit_key)))
end

local function grant(holders, tokens, fence, owner, ttl, now, us, retention)
  local token = next_token(fence, us)
  redis.call('SET', fence, token, 'PX', math.max(retention, ttl))
  redis.call('ZADD', holders, now + ttl, owner)
  redis.call('HSET', tokens, owner, token)
  return token
end

-- Hand free permits to the oldest live waiters, pushing each its token. Dead and foreign queue
-- entries (see waiter()) are dropped unused, at most 64 per call (bounded work); returns false
-- when that bound stopped it with waiters left, so the queue is not known to hold no live waiter
-- and nobody may be granted past it (the next call goes on), true otherwise.
local function fill(holders, tokens, fence, queue, qexp, wake_prefix, limit, now, us, retention)
  local n = redis.call('ZCARD', holders)
  local dead = 0
  while n < limit do
    local first = redis.call('ZRANGE', queue, 0, 0)[1]
    if not first then return true end
    if dead >= 64 then return false end
    redis.call('ZREM', queue, first)
    local exp = redis.call('HGET', qexp, first)
    redis.call('HDEL', qexp, first)
    local ttl, who = waiter(first, exp, now, wake_prefix)
    if ttl then
      ttl = tonumber(ttl)
      local token = grant(holders, tokens, fence, who, ttl, now, us, retention)
      local wake = wake_prefix .. who
      redis.call('RPUSH', wake, token)
      redis.call('PEXPIRE', wake, ttl)
      n = n + 1
    else
      dead = dead + 1
    end
  end
  return true
end
"""
)

# KEYS: holders, tokens, fence, limit, queue, qexp, wake-list prefix, my wake list
# ARGV: owner, ttl_ms, retention_ms (>= ttl_ms),
#       wait_ms (0: try only; > 0: join/refresh the queue; -1: try, else leave the queue), limit
# Returns {1, token} when owner holds a permit (granted now, or earlier: a retried call or a
#         handoff; the lease is then reset to ttl_ms from now, so every grant writes, and the
#         owner's queue entry and wake list are gone);
#         {0, ms} when no permit is free for owner (ms: until the earliest holder's lease ends,
#         0: dead waiters are still being dropped, ask again at once, -2: no holder);
#         {-1, stored} when the semaphore is in use with another limit (nothing written).
ACQUIRE = Script(
    "distlock.sem_acquire",
    _HELPERS
    + """
local holders, tokens, fence, limit_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local queue, qexp, wake_prefix, wake = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local owner, ttl, retention = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local wait_ms, limit = tonumber(ARGV[4]), tonumber(ARGV[5])
local stored = redis.call('GET', limit_key)
if stored then limit_value(limit_key, stored) end  -- foreign state fails before any write
if stored and stored ~= ARGV[5] then return {-1, stored} end
local last = fence_value(fence)
if last and last + 1 >= 9007199254740992 then
  error('DISTLOCK fencing token space exhausted at ' .. fence)
end
-- every key this script may write is read first: a foreign type raises before any write
redis.call('ZCARD', holders)
redis.call('HLEN', tokens)
redis.call('ZCARD', queue)
redis.call('HLEN', qexp)
redis.call('LLEN', wake)
local now, us = now_ms()
local member = ARGV[2] .. ':' .. owner
redis.call('SET', limit_key, ARGV[5], 'PX', math.max(retention, redis.call('PTTL', limit_key)))
prune(holders, tokens, now)
local clear = true
if not redis.call('ZSCORE', holders, owner) then
  clear = fill(holders, tokens, fence, queue, qexp, wake_prefix, limit, now, us, retention)
end
if redis.call('ZSCORE', holders, owner) then  -- a retried call, or handed over (now or before)
  local token = tonumber(redis.call('HGET', tokens, owner))
  if not token then error('DISTLOCK fencing state lost at ' .. tokens) end
  redis.call('DEL', wake)
  redis.call('ZREM', queue, member)  -- a holder never keeps a queue entry
  redis.call('HDEL', qexp, member)
  redis.call('ZADD', holders, 'XX', now + ttl, owner)
  keep_alive(holders, tokens, limit_key, now, retention)
  return {1, token}
end
if clear and redis.call('ZCARD', holders) < limit then  -- fill() emptied the queue
  local token = grant(holders, tokens, fence, owner, ttl, now, us, retention)
  keep_alive(holders, tokens, limit_key, now, retention)
  return {1, token}
end
keep_alive(holders, tokens, limit_key, now, retention)  -- fill() may have granted waiters
if wait_ms < 0 then  -- leaving (timed out): drop the queue entry and the wake list
  redis.call('ZREM', queue, member)
  redis.call('HDEL', qexp, member)
  redis.call('DEL', wake)
elseif wait_ms > 0 then
  redis.call('ZADD', queue, 'NX', now, member)
  redis.call('HSET', qexp, member, now + wait_ms)
  redis.call('PEXPIRE', queue, wait_ms + 60000)
  redis.call('PEXPIRE', qexp, wait_ms + 60000)
end
if not clear then return {0, 0} end
local first = redis.call('ZRANGE', holders, 0, 0, 'WITHSCORES')
if not first[2] then return {0, -2} end
return {0, math.max(0, tonumber(first[2]) - now)}
""",
)

# KEYS: holders, tokens, fence, queue, qexp, wake-list prefix, my wake list, rel, limit
# ARGV: owner, retention_ms, abandon (1: also leave the queue), my queue member, limit (used
#       only when none is stored: waiters are granted up to the stored limit, never the caller's)
# Returns 1 released (the permit handed to the oldest live waiter, if any); 2 already released by
#         this owner (a retry after a lost reply); 0 not a holder (lease expired).
RELEASE = Script(
    "distlock.sem_release",
    _HELPERS
    + """
local holders, tokens, fence, queue, qexp = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local wake_prefix, wake, rel, limit_key = KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local owner, retention = ARGV[1], tonumber(ARGV[2])
-- Foreign state (limit, fence, tokens, queue, qexp, rel): this owner's permit and queue entry
-- still go, nobody is granted, no foreign key is touched, and the error is raised at the end.
-- A foreign holders key raises at once: nothing is written.
local problem = nil
local function sound(reply)
  if type(reply) == 'table' and reply.err then
    problem = problem or reply
    return false
  end
  return true
end
local stored = nil
local valid, err = pcall(function()
  stored = redis.call('GET', limit_key)
  if stored then limit_value(limit_key, stored) end
  fence_value(fence)
end)
if not valid then problem = err end
local tokens_ok = sound(redis.pcall('HLEN', tokens))
local queue_ok = sound(redis.pcall('ZCARD', queue)) and sound(redis.pcall('HLEN', qexp))
local rel_ok = sound(redis.pcall('ZCARD', rel))
local limit = 0
if not problem then limit = tonumber(stored or ARGV[5]) end
local now, us = now_ms()
local score = tonumber(redis.call('ZSCORE', holders, owner))
if ARGV[3] == '1' then
  if queue_ok then
    redis.call('ZREM', queue, ARGV[4])
    redis.call('HDEL', qexp, ARGV[4])
  end
  redis.call('DEL', wake)
end
local result = 0
if score and score > now then
  redis.call('ZREM', holders, owner)
  if tokens_ok then redis.call('HDEL', tokens, owner) end
  if rel_ok then
    -- the last releases (at most a minute old, at most 64 + 4 * limit of them): enough for the
    -- retry of a lost reply, bounded however fast permits turn over
    redis.call('ZADD', rel, now, owner)
    redis.call('ZREMRANGEBYSCORE', rel, '-inf', now - 60000)
    redis.call('ZREMRANGEBYRANK', rel, 0, -(65 + 4 * limit))
    redis.call('PEXPIRE', rel, 60000)
  end
  result = 1
elseif rel_ok and redis.call('ZSCORE', rel, owner) then
  result = 2
end
if problem then
  if type(problem) == 'table' then return problem end
  error(problem)
end
prune(holders, tokens, now)
fill(holders, tokens, fence, queue, qexp, wake_prefix, limit, now, us, retention)
keep_alive(holders, tokens, limit_key, now, retention)
return result
""",
)

# KEYS: holders, tokens, limit;  ARGV: owner, ttl_ms, retention_ms
# Returns 1 when owner's lease was reset to ttl_ms from now (the stored limit is kept as long),
#         0 when owner holds no live permit.
EXTEND = Script(
    "distlock.sem_extend",
    _HELPERS
    + """
local holders, tokens, owner = KEYS[1], KEYS[2], ARGV[1]
local now = now_ms()
local score = tonumber(redis.call('ZSCORE', holders, owner))
if not score or score <= now then return 0 end
redis.call('HLEN', tokens)  -- a foreign type raises before any write
prune(holders, tokens, now)
redis.call('ZADD', holders, 'XX', now + tonumber(ARGV[2]), owner)
keep_alive(holders, tokens, KEYS[3], now, tonumber(ARGV[3]))
return 1
""",
)

# KEYS: holders;  ARGV: owner ("" for nobody)
# Returns {live holders, 1 when owner holds a live permit else 0}. Read-only.
PEEK = Script(
    "distlock.sem_peek",
    """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local live = redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
local score = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]))
if score and score > now then return {live, 1} end
return {live, 0}
""",
)
