"""The Lua scripts of the Redis store (see nattool/store/redis.py for the data model).

Scores and horizons are passed as strings and handed to Redis untouched: Lua would
print a number with 14 digits and move the TTL boundary.
"""

from __future__ import annotations

#: ARGV fields per registration in :data:`BATCH_SCRIPT`, after the header.
FIELDS_PER_REGISTRATION = 7
#: ARGV fields before the first registration.
HEADER_FIELDS = 8

# The registrations that need more than the keepalive lane (nattool/store/redis_single.py):
# one call registers a run of them (single Redis) or the part of a batch whose
# groups share one cluster slot. A known member from an unchanged source and
# endpoint whose bookkeeping was done less than `refresh` ago costs an HGET, a ZADD
# and the read of its page; the bookkeeping (caps, stale trimming, key TTLs, the
# counting sets, the source set) is done when a member is new, changed, or due.
#
# Times are integer milliseconds (scores of integers are cheap for Redis to
# compare and to print).
# KEYS: single mode: nt:live, nt:groups; cluster mode: the group keys (declared
# for the slot check only).
# ARGV: mode ('s' single: source cap and counting sets here too; 'c' cluster:
# the caller does those), horizon, key TTL, refresh, max members per group, max
# groups per source, max live members, live members known to the caller (-1:
# count them here); then per registration: group, identity, record (identity US
# endpoint US lan US source), seen, source, offset, limit.
# Returns one string per registration: flag stamp GS total [GS record]...
# where flag is f (fresh: only the score written), n (new) or r (refreshed) and
# stamp the time of its bookkeeping; or F (tracker full) or S (source over its
# groups cap) alone. Then the live count.
BATCH_SCRIPT = """
local call, find, sub, concat = redis.call, string.find, string.sub, table.concat
local single = ARGV[1] == 's'
local horizon = ARGV[2]
local above = '(' .. horizon
local keyttl, refresh = ARGV[3], tonumber(ARGV[4])
local maxm, maxsrc, maxlive = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local live = tonumber(ARGV[8])
local livekey, groupskey = KEYS[1], KEYS[2]
if single and live < 0 then live = call('ZCOUNT', livekey, above, '+inf') end

local function forget(z, h, g, records)
  local ids = {}
  for k, rec in ipairs(records) do ids[k] = sub(rec, 1, find(rec, '\\31', 1, true) - 1) end
  call('ZREM', z, unpack(records))
  call('HDEL', h, unpack(ids))
  if single then
    for k, ident in ipairs(ids) do ids[k] = g .. '\\31' .. ident end
    call('ZREM', livekey, unpack(ids))
  end
end

local out = {}
local touched, touchedlist, ntouched = {}, {}, 0  -- groups whose bookkeeping this call did
for i = 9, #ARGV, 7 do
  local g, id, rec, seen = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local z, h = 'nt:{' .. g .. '}:z', 'nt:{' .. g .. '}:h'
  local old = call('HGET', h, id)
  local oldrec, stamp = nil, 0
  if old then
    local cut = find(old, '\\30', 1, true)
    oldrec, stamp = sub(old, 1, cut - 1), sub(old, cut + 1)
  end
  local flag
  if oldrec == rec and tonumber(seen) - tonumber(stamp) < refresh then
    call('ZADD', z, seen, rec)
    flag = 'f'
  else
    if old then flag = 'r' elseif live >= maxlive then flag = 'F' else flag = 'n' end
    if single and flag ~= 'F' then
      local sk = 'nt:src:{' .. ARGV[i + 4] .. '}'
      if call('ZADD', sk, seen, g) == 1 and call('ZCARD', sk) > maxsrc then
        call('ZREMRANGEBYSCORE', sk, '-inf', horizon)
        if call('ZCARD', sk) > maxsrc then
          call('ZREM', sk, g)
          if not old then flag = 'S' end
        end
      end
      call('PEXPIRE', sk, keyttl)
    end
    if flag == 'n' or flag == 'r' then
      if oldrec and oldrec ~= rec then call('ZREM', z, oldrec) end
      if not touched[g] then
        local stale = call('ZRANGEBYSCORE', z, '-inf', horizon, 'LIMIT', 0, 64)
        if #stale > 0 then forget(z, h, g, stale) end
        touched[g] = seen
        ntouched = ntouched + 1
        touchedlist[ntouched] = g
      end
      if not old then
        if call('ZCARD', z) >= maxm then
          local oldest = call('ZRANGE', z, 0, 0)
          if oldest[1] then forget(z, h, g, oldest) end
        end
        live = live + 1
      end
      call('ZADD', z, seen, rec)
      call('HSET', h, id, rec .. '\\30' .. seen)
      if single then call('ZADD', livekey, seen, g .. '\\31' .. id) end
    end
  end
  if flag == 'F' or flag == 'S' then
    out[#out + 1] = flag
  else
    if flag ~= 'f' then stamp = seen end
    local want = tonumber(ARGV[i + 5]) + tonumber(ARGV[i + 6]) + 1
    local page = call('ZREVRANGEBYSCORE', z, '+inf', above, 'LIMIT', 0, want)
    local total = #page
    if total >= want then total = call('ZCOUNT', z, above, '+inf') end
    if #page > 0 then
      out[#out + 1] = flag .. stamp .. '\\29' .. (total - 1) .. '\\29' .. concat(page, '\\29')
    else
      out[#out + 1] = flag .. stamp .. '\\29' .. (total - 1)
    end
  end
end
-- once per group and call: key TTLs and the groups set
for _, g in ipairs(touchedlist) do
  call('PEXPIRE', 'nt:{' .. g .. '}:z', keyttl)
  call('PEXPIRE', 'nt:{' .. g .. '}:h', keyttl)
  if single then call('ZADD', groupskey, touched[g], g) end
end
out[#out + 1] = tostring(live)
return out
"""

# In a cluster, one call carries the registrations of every group a node serves:
# keys of several slots, all local (Redis 7 and Valkey 7.2 know the flag).
CLUSTER_BATCH_SCRIPT = "#!lua flags=allow-cross-slot-keys\n" + BATCH_SCRIPT

# The groups-per-source cap, in cluster mode (the source set lives in its own slot).
SOURCE_SCRIPT = """
local src = KEYS[1]
if redis.call('ZADD', src, ARGV[2], ARGV[1]) == 1 and redis.call('ZCARD', src) > tonumber(ARGV[4]) then
  redis.call('ZREMRANGEBYSCORE', src, '-inf', ARGV[3])
  if redis.call('ZCARD', src) > tonumber(ARGV[4]) then
    redis.call('ZREM', src, ARGV[1])
    return 0
  end
end
redis.call('PEXPIRE', src, tonumber(ARGV[5]))
return 1
"""

TRIM_SCRIPT = """
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
if #gone > 0 then redis.call('ZREM', KEYS[1], unpack(gone)) end
return #gone
"""

SAVE_TRACKER_SCRIPT = """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  return 0
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
return 1
"""

SCRIPTS = {
    "batch": BATCH_SCRIPT,
    "source": SOURCE_SCRIPT,
    "trim": TRIM_SCRIPT,
    "tracker": SAVE_TRACKER_SCRIPT,
}

CLUSTER_SCRIPTS = {**SCRIPTS, "batch": CLUSTER_BATCH_SCRIPT}

__all__ = ["BATCH_SCRIPT", "CLUSTER_SCRIPTS", "FIELDS_PER_REGISTRATION", "HEADER_FIELDS", "SCRIPTS"]
