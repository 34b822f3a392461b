"""The Lua scripts Redis runs for the shared limits: each decision is one script, so it is
atomic (no other instance's decision interleaves) and costs one round trip.

Time comes from Redis (``TIME``), never from the instances, so their clocks do not matter.
Rates are ``core/ratelimit.py``'s ``TokenBucket`` to the letter: up to a minute's worth of
tokens, refilled continuously; a delayed request takes its token now and may leave the bucket
below zero. A bucket's key expires once it would be full again (a full bucket is the same as
none), so an address that came once leaves nothing behind. Concurrency slots are leases: one
sorted set per scope (address, peer, site), its members the associations holding a slot, each
scored with the time its lease ends; expired members are dropped before counting, and the set
itself expires with its newest lease. A set per scope rather than a key per slot: counting keys
would take a SCAN, which is neither atomic nor bounded.

``relay/redis_store.py`` runs the four scripts below.
"""

from __future__ import annotations

from typing import Final

#: The time, and the token bucket, for the scripts that need them.
_PRELUDE: Final = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)

-- TokenBucket._refill: tokens and stamp as of now (a missing bucket is a full one)
local function refill(key, rate)
  local state = redis.call('HMGET', key, 't', 's')
  local tokens, stamp = tonumber(state[1]), tonumber(state[2])
  if tokens == nil or stamp == nil then
    return rate, now
  end
  if now > stamp then
    tokens = math.min(rate, tokens + (now - stamp) * rate / 60)
    stamp = now
  elseif tokens > rate then
    tokens = rate
  end
  return tokens, stamp
end

-- TokenBucket.reserve after a refill: take a token (maybe one not there yet)
local function spend(key, rate, tokens, stamp)
  tokens = tokens - 1
  redis.call('HSET', key, 't', string.format('%.17g', tokens), 's', string.format('%.17g', stamp))
  redis.call('PEXPIRE', key, math.ceil((rate - tokens) * 60000 / rate) + 1000)
end

-- TokenBucket.take: a token if there is one now
local function take(key, rate)
  local tokens, stamp = refill(key, rate)
  if tokens < 1 then
    return false
  end
  spend(key, rate, tokens, stamp)
  return true
end
"""

#: May an association start? ``Gate.decide_locally`` for an ``AssociationQuery``, site-wide.
#: KEYS: address bucket, then (with a peer) peer bucket, address slots, peer slots, site slots.
#: ARGV: enforce, address rate, peer rate, address cap, peer cap, site cap (0: not set),
#: lease ms, lease member. Returns {why or '', count or rate, cap, counted (0/1)}.
ASSOCIATE: Final = (
    _PRELUDE
    + """
local enforce = ARGV[1] == '1'
local over = nil
local ip_rate = tonumber(ARGV[2])
if ip_rate > 0 and not take(KEYS[1], ip_rate) then
  over = {'ip_association_rate_exceeded', ip_rate, 0}
end
if #KEYS == 1 or (over and enforce) then
  over = over or {'', 0, 0}
  return {over[1], over[2], over[3], 0}
end
local peer_over = nil
local peer_rate = tonumber(ARGV[3])
if peer_rate > 0 and not take(KEYS[2], peer_rate) then
  peer_over = {'peer_association_rate_exceeded', peer_rate, 0}
end
local scopes = {'ip', 'peer', 'total'}
for i = 1, 3 do
  local key = KEYS[i + 2]
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now_ms)
  local cap = tonumber(ARGV[i + 3])
  if not peer_over and cap > 0 then
    local count = redis.call('ZCARD', key)
    if count >= cap then
      peer_over = {scopes[i] .. '_concurrency_exceeded', count, cap}
    end
  end
end
if peer_over and enforce then
  return {peer_over[1], peer_over[2], peer_over[3], 0}
end
local lease_ms = tonumber(ARGV[7])
for i = 3, 5 do
  redis.call('ZADD', KEYS[i], now_ms + lease_ms, ARGV[8])
  redis.call('PEXPIRE', KEYS[i], lease_ms)
end
local answer = peer_over or over or {'', 0, 0}
return {answer[1], answer[2], answer[3], 1}
"""
)

#: May the peer send this request now? ``Gate.decide_locally`` for a ``RequestQuery``.
#: KEYS: the peer's bucket for the service. ARGV: rate, delay allowed (0/1), longest delay.
#: Returns {passed (0/1), seconds to wait as text} (Redis would truncate a Lua number).
REQUEST: Final = (
    _PRELUDE
    + """
local rate = tonumber(ARGV[1])
local tokens, stamp = refill(KEYS[1], rate)
local wait = 0
if tokens < 1 then
  wait = (1 - tokens) * 60 / rate
end
if wait == 0 or (ARGV[2] == '1' and wait <= tonumber(ARGV[3])) then
  spend(KEYS[1], rate, tokens, stamp)
  return {1, string.format('%.17g', wait)}
end
return {0, string.format('%.17g', wait)}
"""
)

#: The associations of this process still live: their slots last another lease from now.
#: Re-adds a slot Redis lost (a restart, a lease that ran out while Redis was unreachable), so
#: the counts are true again as soon as Redis is back. KEYS: slot sets; ARGV: lease ms, then
#: the member for each key in order. Also the health check: it runs with no keys too.
RENEW: Final = """
local clock = redis.call('TIME')
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local lease_ms = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now_ms + lease_ms, ARGV[i + 1])
  redis.call('PEXPIRE', key, lease_ms)
end
return #KEYS
"""

#: Associations that ended give their slots back. KEYS: slot sets; ARGV: the member for each.
RELEASE: Final = """
for i, key in ipairs(KEYS) do
  redis.call('ZREM', key, ARGV[i])
end
return #KEYS
"""
