"""The cache's Lua scripts. Every key one script touches carries the same hash tag.

Keys of namespace ``NS`` under prefix ``P`` with ``shards=1`` (all on one Cluster slot)::

    P:cache:{NS}:epoch       STRING  16-digit stamp, changed by every invalidation   (no TTL)
    P:cache:{NS}:ns          STRING  generation of the namespace (set by clear)       PX >= entries
    P:cache:{NS}:t:<tag>     STRING  generation of one tag (set by invalidate_tags)   PX >= entries
    P:cache:{NS}:k:<key>     STRING  an entry (envelope below), or a tombstone        PX ttl+grace
    P:cache:{NS}:h:<sha256>  STRING  the same, for keys longer than 200 characters    PX ttl
    P:cache:{NS}:mk:<key>    STRING  write mark of a key (random; set by set/delete)  PX 2 x fill
    P:cache:{NS}:mh:<sha256> STRING  the same, for a hashed key                          timeout

With ``shards=N > 1`` each shard ``i`` has the same kinds of keys under
``P:cache.N:{NS.i}:`` (its own epoch and records, on its entries' slot), so every script below
still runs on one slot; an invalidation runs BUMP once per shard.

Generations are epoch values: an invalidation sets the epoch to ``max(now_us, epoch + 1)`` (a
hybrid logical clock, as the lock's fencing tokens) and stamps that value into the namespace or
tag record it invalidates. An entry records the epoch and every generation it was written under.
On a read, ``entry.epoch == epoch`` proves that nothing was invalidated since the write (the hit
path: one ``MGET`` of entry and epoch, no Lua); otherwise REVALIDATE compares the recorded
generations with the current ones and re-stamps the entry (valid) or deletes it (invalid).

A lost record (eviction, restart) reads as absent, which never equals a recorded generation: the
entries that depend on it become misses, never stale hits.

Entry envelope (written by WRITE; bytes 4-19 re-stamped in place by REVALIDATE)::

    0   "dc1:"        magic and format version 1
    4   epoch         16 ASCII digits
    20  serializer    one byte: "j" JSON, "p" signed pickle, ...
    21  kind          "v" value, "n" negative (a loader's None stored with negative_ttl)
    22  H             4 hex digits: length of the metadata
    26  metadata      "computed_at_ms|compute_us|ttl_ms|ns_gen|tag=gen,tag=gen"
    26+H payload      the serializer's bytes

``computed_at_ms`` is the server's clock (``TIME``) at the write and ``ttl_ms`` the logical time
to live, so ``computed_at_ms + ttl_ms`` is the expiry on the one clock every process can compare
to; the key itself lives ``grace`` longer (``PX ttl + grace``; grace is the largest stale-serving
window), which makes the staleness bound hard: Redis deletes the entry when it runs out.
``compute_us`` is the loader's measured time, the δ of early refresh (XFetch).

A tombstone (``delete``) is ``"dc1~" + random``, kept for the fill timeout: a fill that read the
key before the delete finds it changed and is refused. ``set`` and ``delete`` also replace the
key's write mark, which a fill's read captures and its WRITE compares: the mark outlives the entry
or tombstone as far as fills are concerned (twice the larger of the fill timeout and 60 s, from
the write), so a fill that read the key empty before a ``set`` is refused even after that entry
expired, was deleted by a revalidation or was evicted. A fill whose read found no epoch is always
refused (see ``LOOK``).
"""

from __future__ import annotations

from distkit import Script

__all__ = ["BUMP", "DELETE", "DELETE_MANY", "LOOK", "NOW", "REVALIDATE", "WRITE"]

_HELPERS = """
local function pad(n) return string.format('%016.0f', n) end

local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- The namespace epoch (created from the server clock when absent), as a number and a string.
local function current_epoch(key)
  local v = redis.call('GET', key)
  if v then return tonumber(v), v end
  local s = pad(now_us())
  redis.call('SET', key, s)
  return tonumber(s), s
end

-- A generation record: created at `epoch_s` when absent, kept alive for at least ttl_ms.
-- Extended to twice ttl_ms, so a steady stream of writes touches it once per ttl_ms, not at every
-- write: each touch is a tracking message the near cache must treat as a possible loss.
local function record(key, epoch_s, ttl_ms)
  local v = redis.call('GET', key)
  if not v then
    redis.call('SET', key, epoch_s, 'PX', 2 * ttl_ms)
    return epoch_s
  end
  local pttl = redis.call('PTTL', key)
  if pttl >= 0 and pttl < ttl_ms then redis.call('PEXPIRE', key, 2 * ttl_ms) end
  return v
end
"""

# KEYS: epoch, then the records to invalidate (namespace record and/or tag records)
# ARGV: min_ttl_ms (a new or short-lived record is kept at least this long: the fill timeout)
# Returns the new epoch (16-digit string); every record in KEYS now holds it.
BUMP = Script(
    "distcache.bump",
    _HELPERS
    + """
local e = now_us()
local cur = redis.call('GET', KEYS[1])
-- an epoch that is not one of ours (foreign bytes, a wrong length, a number past 2^53 that would
-- exhaust the space) is replaced: its entries then read as misses, and invalidations go on
local n = cur and #cur == 16 and tonumber(cur)
if n and n >= e and n + 1 < 9007199254740992 then e = n + 1 end
if e >= 9007199254740992 then error('DISTCACHE epoch space exhausted at ' .. KEYS[1]) end
local s = pad(e)
redis.call('SET', KEYS[1], s)
local min_ttl = tonumber(ARGV[1])
for i = 2, #KEYS do
  if redis.call('PTTL', KEYS[i]) > min_ttl then
    redis.call('SET', KEYS[i], s, 'KEEPTTL')
  else
    redis.call('SET', KEYS[i], s, 'PX', min_ttl)
  end
end
return s
""",
)

# KEYS: epoch, namespace record, tag records (ntags), then per entry: the entry and its write
#       mark (n pairs), then the failure note of a fill (nnote: 0 or 1, deleted by a fill)
# ARGV: seen ('' for a plain set; else the epoch the fill's read saw, '0' when there was none),
#       ttl_ms (the logical time to live, recorded in the metadata), grace_ms (kept this much
#       longer for stale serving: the key's PX is ttl_ms + grace_ms), ntags, tag names (ntags),
#       mark (a plain set's new write mark, random; '' for a fill), mark_ms (its life), nnote,
#       then for each entry: baseline, mark seen, flags (serializer id + kind), compute_us, payload
#       baseline: '*' no check; '' the read saw nothing; '<len>:<sha1>' the bytes it saw;
#                 '!' unknown (never matches)
#       mark seen: '*' no check; '=' .. the mark the read saw ('=' alone: none); '!' unknown
# Returns one code per entry: 1 written; 0 refused, the key changed since the read (delete, set,
#         another fill); -1 refused, the namespace or one of the tags was invalidated since, or
#         the epoch is gone (what happened since the read is unknown).
# The compare-and-set of a fill (memcache leases, without a lease round trip): the read captured
# the epoch; any invalidation since moved it, and then the namespace and tag records are checked
# one by one: a record newer than `seen` (or gone) means this fill's value may predate it.
# A set or delete also replaces the key's write mark (kept mark_ms = 2 x fill timeout), so a fill
# whose read saw the key empty is refused even once the set's entry is gone again (expired,
# revalidated away, evicted): its mark is not the one the read saw.
WRITE = Script(
    "distcache.write",
    _HELPERS
    + """
local seen_s, ntags = ARGV[1], tonumber(ARGV[4])
local ttl_ms = tonumber(ARGV[2]) + tonumber(ARGV[3])  -- the physical life: ttl + grace
local mark, mark_ms, nnote = ARGV[5 + ntags], ARGV[6 + ntags], tonumber(ARGV[7 + ntags])
local n = (#KEYS - 2 - ntags - nnote) / 2
local function refuse_all(code)
  local out = {}
  for j = 1, n do out[j] = code end
  return out
end
if nnote == 1 then redis.call('DEL', KEYS[#KEYS]) end  -- this load did not fail
if seen_s ~= '' then
  local seen = tonumber(seen_s)
  local cur = redis.call('GET', KEYS[1])
  if not cur then
    -- The epoch is gone (or never was, seen == 0): an invalidation since the read may have
    -- created it and lost it again. Refuse; the next read finds the epoch this creates.
    current_epoch(KEYS[1])
    return refuse_all(-1)
  end
  if tonumber(cur) ~= seen then
    for i = 2, 2 + ntags do
      local v = redis.call('GET', KEYS[i])
      if not v or tonumber(v) > seen then return refuse_all(-1) end
    end
  end
end
local _, epoch_s = current_epoch(KEYS[1])
local ns_gen = record(KEYS[2], epoch_s, ttl_ms)
local parts = {}
for i = 1, ntags do
  parts[i] = ARGV[4 + i] .. '=' .. record(KEYS[2 + i], epoch_s, ttl_ms)
end
local t = redis.call('TIME')
local now_ms = string.format('%.0f', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
local tail = ARGV[2] .. '|' .. ns_gen .. '|' .. table.concat(parts, ',')
local out = {}
local a = 7 + ntags
for j = 1, n do
  local key, mkey = KEYS[1 + ntags + 2 * j], KEYS[2 + ntags + 2 * j]
  local baseline, seen_mark = ARGV[a + 1], ARGV[a + 2]
  local flags, compute, payload = ARGV[a + 3], ARGV[a + 4], ARGV[a + 5]
  a = a + 5
  local ok = true
  if baseline ~= '*' then
    local cur = redis.call('GET', key)
    local now = ''
    if cur then now = #cur .. ':' .. redis.sha1hex(cur) end
    ok = now == baseline
  end
  if ok and seen_mark ~= '*' then
    ok = '=' .. (redis.call('GET', mkey) or '') == seen_mark
  end
  if ok then
    local meta = now_ms .. '|' .. compute .. '|' .. tail
    redis.call('SET', key,
      'dc1:' .. epoch_s .. flags .. string.format('%04x', #meta) .. meta .. payload,
      'PX', ttl_ms)
    if mark ~= '' then redis.call('SET', mkey, mark, 'PX', mark_ms) end
    out[j] = 1
  else
    out[j] = 0
  end
end
return out
""",
)

# KEYS: epoch, namespace record, tag records (m: the union over the entries), entries (n)
# ARGV: m, then for each entry: header (its bytes up to the payload, as read), recorded namespace
#       generation, k, then k pairs (index of the tag record in KEYS[3..], recorded generation)
# Returns one code per entry: 1 still valid (re-stamped with the current epoch); 0 invalid
#         (deleted); -1 the entry changed since it was read (left alone).
REVALIDATE = Script(
    "distcache.revalidate",
    _HELPERS
    + """
local _, epoch_s = current_epoch(KEYS[1])
local m = tonumber(ARGV[1])
local n = #KEYS - 2 - m
local ns_now = redis.call('GET', KEYS[2])
local out = {}
local a = 2
for j = 1, n do
  local key = KEYS[2 + m + j]
  local header, ns_gen, k = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  a = a + 3
  local ok = ns_now == ns_gen
  for _ = 1, k do
    local idx, gen = tonumber(ARGV[a]), ARGV[a + 1]
    a = a + 2
    if ok and redis.call('GET', KEYS[2 + idx]) ~= gen then ok = false end
  end
  local cur = redis.call('GETRANGE', key, 0, #header - 1)
  -- the same entry, whatever its epoch stamp (another reader may have re-stamped it already)
  if string.sub(cur, 1, 4) ~= string.sub(header, 1, 4)
      or string.sub(cur, 21) ~= string.sub(header, 21) then
    out[j] = -1
  elseif ok then
    redis.call('SETRANGE', key, 4, epoch_s)
    out[j] = 1
  else
    redis.call('DEL', key)
    out[j] = 0
  end
end
return out
""",
)

# KEYS: entry, its write mark;  ARGV: tombstone, ttl_ms (the fill timeout), mark, mark_ms
# Returns 1 if the key held an entry (valid or not), 0 if it held nothing or a tombstone.
DELETE = Script(
    "distcache.delete",
    """
local old = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
if old and string.sub(old, 1, 4) == 'dc1:' then return 1 end
return 0
""",
)

# KEYS: entry, epoch, write mark
# ARGV: none
# Returns {entry, epoch, mark} as one MGET would, after creating the epoch if it was absent: the
# look of a read-through whose first read found no epoch (a fill never compares against none).
LOOK = Script(
    "distcache.look",
    _HELPERS
    + """
local _, epoch_s = current_epoch(KEYS[2])
return {redis.call('GET', KEYS[1]), epoch_s, redis.call('GET', KEYS[3])}
""",
)

# KEYS: any key of the namespace's slot (only routes the call to the right node)
# ARGV: none
# Returns the server's clock in milliseconds (TIME), the clock entry expiries are written in.
NOW = Script(
    "distcache.now",
    """
local t = redis.call('TIME')
return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
""",
)

# KEYS: per key: the entry and its write mark (pairs, all on one slot)
# ARGV: ttl_ms (tombstone life: the fill timeout), mark_ms, then per key: tombstone, mark
# Returns how many keys held an entry (valid or not); each key now holds a tombstone and a new
# write mark, exactly as DELETE leaves one key.
DELETE_MANY = Script(
    "distcache.delete_many",
    """
local n = 0
for j = 1, #KEYS / 2 do
  local key, mkey = KEYS[2 * j - 1], KEYS[2 * j]
  local old = redis.call('GET', key)
  redis.call('SET', key, ARGV[1 + 2 * j], 'PX', ARGV[1])
  redis.call('SET', mkey, ARGV[2 + 2 * j], 'PX', ARGV[2])
  if old and string.sub(old, 1, 4) == 'dc1:' then n = n + 1 end
end
return n
""",
)
