"""The lock's Lua scripts. Every key of one lock name carries the same hash tag ``{name}``.

Keys of lock ``N`` under prefix ``P``::

    P:lock:{N}             STRING owner-id ["*"], PX ttl          the lease ("*": waiters queued)
    P:lock:{N}:fence       STRING last token issued, PX retention fencing state
    P:lock:{N}:rel         LIST the last 64-128 releasers, PX    recognises a retried release
    P:lock:{N}:queue       ZSET "<ttl_ms>:<owner>" -> arrival ms  FIFO of blocked waiters
    P:lock:{N}:qexp        HASH "<ttl_ms>:<owner>" -> expiry ms   waiters' keep-alive
    P:lock:{N}:wake:<own>  LIST [token]                           handoff to one waiter

Fencing token = max(server TIME in microseconds, last + 1): a hybrid logical clock, so tokens
keep increasing after the fence key expires or the server restarts empty (docs/fencing.md).
Release hands the lease straight to the oldest live waiter and pushes the token onto that waiter's
own wake list: one waiter wakes per release, in FIFO order, in about one round trip. A waiter that
queues marks the lease with a trailing "*", so a release without waiters never looks at the queue.
All scripts are idempotent for a given owner id, so a retry after a lost reply is harmless.

The uncontended paths come first in each script and avoid Lua library calls (they cost about as
much as a Redis command inside a script): acquire = EXISTS, SET NX, TIME, SET ... GET (the new
token written and the last one read back in one call; rewritten only when the last is ahead);
release = GET, LPUSH, PEXPIRE, DEL (the marker list is trimmed only once it passes 128).
Helpers for the contended paths are defined only when those paths run.
"""

from __future__ import annotations

from distkit import Script

# A fence value as a number, nil for none; anything distlock never writes (not a number, nan, inf,
# negative, fractional, 2^53 or more) is an error naming the key ("DISTLOCK corrupt": the client
# raises ForeignDataError). Operators only, no library call: it runs on the fast path.
_FENCE_VALUE = """
local function fence_value(fence, last)
  if not last then return nil end
  local n = tonumber(last)
  if not n or n < 0 or n % 1 ~= 0 or n >= 9007199254740992 then
    error('DISTLOCK corrupt fencing state at ' .. fence)
  end
  return n
end
"""

# Issue the next token for `fence`: max(TIME in us, last + 1), refusing past 2^53 (where Lua's
# doubles stop counting exactly) before anything is written. Lua numbers print as 1.79e+15 when
# concatenated; redis.call() arguments print exactly, so tokens only ever travel that way.
_NEXT_TOKEN = (
    _FENCE_VALUE
    + """
local function next_token(fence)
  local t = redis.call('TIME')
  local token = t[1] * 1000000 + t[2]
  local last = fence_value(fence, redis.call('GET', fence))
  if last and last >= token then token = last + 1 end
  if token >= 9007199254740992 then
    error('DISTLOCK fencing token space exhausted at ' .. fence)
  end
  return token
end
"""
)

# Bounds on what a queue entry may hold, as distlock writes it: a keep-alive at most
# MAX_KEEPALIVE_MS after the server's now (a waiter writes now + wait_ms, wait_ms at most
# MAX_WAIT_MS: 1.5 s in practice) and a ttl from 1 ms to ten years (distkit's MAX_SECONDS).
# (The Lua text spells them out: sources are literals, tests/test_security.py.)
MAX_WAIT_MS = 60_000
MAX_KEEPALIVE_MS = MAX_WAIT_MS
MAX_TTL_MS = 315_360_000_000

# A queue entry as a waiter: its ttl (a string of digits) and owner id, or nil when it is dead
# (its keep-alive passed) or foreign (a keep-alive that is not a number or lies further ahead than
# distlock ever writes, a member that is not "<ttl_ms>:<owner>" with a ttl distlock accepts, a wake
# list of another type): such entries are dropped like expired waiters, never granted or trusted.
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

# Drop dead or foreign waiters from the head of the queue; return the first live member (and its
# ttl and owner id), nil when the queue is empty, or false when 64 were dropped and more remain
# (bounded work per call: the queue is not known to be empty, so nobody may be granted past it;
# the next call goes on).
_FIRST_LIVE = (
    _WAITER
    + """
local function first_live(queue, qexp, wake_prefix)
  local t = redis.call('TIME')
  local now = t[1] * 1000 + math.floor(t[2] / 1000)
  for _ = 1, 64 do
    local first = redis.call('ZRANGE', queue, 0, 0)[1]
    if not first then return nil, now end
    local ttl, who = waiter(first, redis.call('HGET', qexp, first), now, wake_prefix)
    if ttl then return first, now, ttl, who end
    redis.call('ZREM', queue, first)
    redis.call('HDEL', qexp, first)
  end
  if redis.call('EXISTS', queue) == 1 then return false, now end
  return nil, now
end
"""
)

# Hand the lease to the oldest live waiter (a new token, pushed onto its wake list). Every key it
# writes is checked first (a foreign fence raises before any write; queue entries that cannot be
# used were dropped by first_live), so a handoff is whole or not at all. Returns the new owner id,
# or nil when nobody waits. retention_ms: the fence's minimum lifetime.
_HAND_OFF = """
local function hand_off(lease, fence, queue, qexp, wake_prefix, retention_ms)
  local first, _, next_ttl, next_owner = first_live(queue, qexp, wake_prefix)
  if not first then return nil end
  local token = next_token(fence)
  redis.call('ZREM', queue, first)
  redis.call('HDEL', qexp, first)
  local value = next_owner
  if redis.call('EXISTS', queue) == 1 then value = next_owner .. '*' end
  redis.call('SET', lease, value, 'PX', next_ttl)
  redis.call('SET', fence, token, 'PX', math.max(tonumber(retention_ms), tonumber(next_ttl)))
  local next_wake = wake_prefix .. next_owner
  redis.call('RPUSH', next_wake, token)
  redis.call('PEXPIRE', next_wake, next_ttl)
  return next_owner
end
"""

# KEYS: lease, fence, queue, qexp, my wake list
# ARGV: owner, ttl_ms, fence_px (>= ttl_ms),
#       wait_ms (0: try only; > 0: join/refresh the queue; -1: try, else leave the queue)
# Returns {1, token} when held by owner (granted now, or earlier: a retried call or a handoff,
#         whose lease TTL is then reset to ttl_ms: every grant writes, so a WAIT after it counts);
#         {0, pttl} otherwise (pttl -2: free but older waiters are queued; -1: key has no expiry).
ACQUIRE = Script(
    "distlock.acquire",
    _NEXT_TOKEN
    + """
local lease, fence, queue = KEYS[1], KEYS[2], KEYS[3]
local owner = ARGV[1]
local queued = redis.call('EXISTS', queue) == 1
if not queued and redis.call('SET', lease, owner, 'NX', 'PX', ARGV[2]) then
  -- The common case in four calls: the clock's token is written and the last one read back in
  -- one SET ... GET; only when the last is ahead (or foreign) is anything written again.
  local t = redis.call('TIME')
  local token = t[1] * 1000000 + t[2]
  local last = redis.pcall('SET', fence, token, 'PX', ARGV[3], 'GET')
  if last then
    local problem = nil
    if type(last) == 'table' then
      problem = last  -- not a string (WRONGTYPE): nothing was written to the fence
    else
      local valid, n = pcall(fence_value, fence, last)
      if not valid then
        problem = 'DISTLOCK corrupt fencing state at ' .. fence
      elseif n >= token then
        token = n + 1
        if token >= 9007199254740992 then
          problem = 'DISTLOCK fencing token space exhausted at ' .. fence
        else
          redis.call('SET', fence, token, 'PX', ARGV[3])
        end
      end
      if problem then redis.call('SET', fence, last, 'PX', ARGV[3]) end
    end
    if problem then  -- undo the grant: an error leaves nothing held
      redis.call('DEL', lease)
      if type(problem) == 'table' then return problem end
      return redis.error_reply(problem)
    end
  end
  return {1, token}
end
"""
    + _FIRST_LIVE
    + """
local qexp, wake, wait_ms = KEYS[4], KEYS[5], tonumber(ARGV[4])
local wake_prefix = string.sub(wake, 1, string.len(wake) - string.len(owner))
-- every key this path may write is read first: a foreign type raises before any write
redis.call('ZCARD', queue)
redis.call('HEXISTS', qexp, owner)
redis.call('LLEN', wake)
local holder = redis.call('GET', lease)
local member = ARGV[2] .. ':' .. owner
if holder == owner or holder == owner .. '*' then  -- a retried call, or handed over meanwhile
  local token = fence_value(fence, redis.call('GET', fence))
  if not token then error('DISTLOCK fencing state lost at ' .. fence) end
  redis.call('DEL', wake)
  redis.call('ZREM', queue, member)  -- a holder never keeps a queue entry
  redis.call('HDEL', qexp, member)
  redis.call('PEXPIRE', lease, ARGV[2])  -- always a write: a WAIT after this call covers the grant
  return {1, token}
end
local now = nil
if not holder and queued then
  local first
  first, now = first_live(queue, qexp, wake_prefix)
  if first == nil or first == member then
    local token = next_token(fence)  -- first: a foreign fence fails before anything is written
    local value = owner
    if first then
      redis.call('ZREM', queue, member)
      redis.call('HDEL', qexp, member)
      if redis.call('EXISTS', queue) == 1 then value = owner .. '*' end
    end
    redis.call('SET', lease, value, 'PX', ARGV[2])
    redis.call('SET', fence, token, 'PX', ARGV[3])
    return {1, token}
  end
end
if wait_ms < 0 then  -- leaving (timed out): drop the queue entry and the wake list
  redis.call('ZREM', queue, member)
  redis.call('HDEL', qexp, member)
  redis.call('DEL', wake)
elseif wait_ms > 0 then
  if not now then
    local t = redis.call('TIME')
    now = t[1] * 1000 + math.floor(t[2] / 1000)
  end
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

# KEYS: lease, release markers, fence, queue, qexp, wake-list prefix ("P:lock:{N}:wake:"),
#       my wake list
# ARGV: owner, retention_ms, abandon (1: also leave the queue when not the holder),
#       [marker_ms: how long the release marker lasts; default 60000]
# The markers keep the last 64 releasers, so a retried release is recognised even after other
# holders released in between. One key for all (not one per owner): a key that does not exist
# yet would make every release of a slot in mid-migration answer TRYAGAIN on a Cluster.
# Returns 1 released (handed to the next live waiter if any); 2 already released by this owner
#         (a retry after a lost reply); 0 not the holder (expired or taken over).
RELEASE = Script(
    "distlock.release",
    """
local lease, rel, owner = KEYS[1], KEYS[2], ARGV[1]
local holder = redis.call('GET', lease)
if holder == owner then  -- the common case: nobody waits
  -- LTRIM only once the list has doubled: at least the last 64 are kept, in amortised O(1)
  local n = redis.pcall('LPUSH', rel, owner)
  if type(n) == 'table' then  -- a foreign marker list: the lease is freed all the same
    redis.call('DEL', lease)
    return n
  end
  if n > 128 then redis.call('LTRIM', rel, 0, 63) end
  redis.call('PEXPIRE', rel, ARGV[4] or 60000)
  redis.call('DEL', lease)
  if ARGV[3] == '1' then redis.call('DEL', KEYS[7]) end
  return 1
end
local fence, queue, qexp, wake_prefix, wake = KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
if holder ~= owner .. '*' then
  if ARGV[3] == '1' then
    local members = redis.call('ZRANGE', queue, 0, -1)
    redis.call('HLEN', qexp)  -- a foreign type raises before any write
    for _, m in ipairs(members) do
      if string.sub(m, -string.len(owner) - 1) == ':' .. owner then
        redis.call('ZREM', queue, m)
        redis.call('HDEL', qexp, m)
      end
    end
    redis.call('DEL', wake)
  end
  if redis.call('LPOS', rel, owner) then return 2 end
  return 0
end
"""
    + _NEXT_TOKEN
    + _FIRST_LIVE
    + _HAND_OFF
    + """
-- Foreign state (the marker list, queue, qexp or fence): the lease is freed all the same, handed
-- to nobody, and the error is raised at the end; a handoff is whole or not at all.
local n = redis.pcall('LPUSH', rel, owner)
if ARGV[3] == '1' then redis.call('DEL', wake) end
local ok, problem = false, n
if type(n) ~= 'table' then
  if n > 128 then redis.call('LTRIM', rel, 0, 63) end
  redis.call('PEXPIRE', rel, ARGV[4] or 60000)
  ok, problem = pcall(hand_off, lease, fence, queue, qexp, wake_prefix, ARGV[2])
  if ok and problem then return 1 end
end
redis.call('DEL', lease)
if not ok then
  if type(problem) == 'table' then return problem end
  error(problem)
end
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
local stored = redis.call('HGET', KEYS[1], 'token')
local token = tonumber(ARGV[1])
if stored then
  -- Both below 2^53 (the client refuses larger tokens; a stored one is checked here), where a
  -- Lua double holds every integer exactly: the comparison is exact.
  local highest = tonumber(stored)
  if not highest or highest < 0 or highest % 1 ~= 0 or highest >= 9007199254740992
     or string.format('%.0f', highest) ~= stored then
    error('DISTLOCK corrupt fenced token at ' .. KEYS[1])
  end
  if token < highest then
    return {0, stored}
  end
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
# Raises the fence's last token to at least `token` (a max-register). Returns 1.
FENCE_MAX = Script(
    "distlock.fence_max",
    """
local last = tonumber(redis.call('GET', KEYS[1]))
if not last or tonumber(ARGV[1]) > last then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return 1
""",
)


# KEYS: lease, fence, queue, qexp, wake-list prefix ("P:lock:{N}:wake:")
# ARGV: retention_ms
# Frees the lease whoever holds it (an operator's repair), handing it to the oldest live waiter as
# a release does; the fence is kept, so the next token is still higher than every earlier one.
# Returns {0} when nobody held it; {1, former holder} freed; {2, former holder, next owner}
# handed over; {-1, type} when the key is not a lock (no TTL, or not a string): nothing written.
FORCE_RELEASE = Script(
    "distlock.force_release",
    _NEXT_TOKEN
    + _FIRST_LIVE
    + _HAND_OFF
    + """
local lease, fence, queue, qexp, wake_prefix = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local kind = redis.call('TYPE', lease)['ok']
if kind == 'none' then return {0} end
if kind ~= 'string' or redis.call('PTTL', lease) < 0 then return {-1, kind} end  -- not a lock
local holder = redis.call('GET', lease)
if string.sub(holder, -1) == '*' then holder = string.sub(holder, 1, -2) end
local ok, next_owner = pcall(hand_off, lease, fence, queue, qexp, wake_prefix, ARGV[1])
if ok and next_owner then return {2, holder, next_owner} end
redis.call('DEL', lease)  -- a foreign fence, queue or qexp: freed all the same, handed to nobody
if not ok then
  if type(next_owner) == 'table' then return next_owner end
  error(next_owner)
end
return {1, holder}
""",
)
