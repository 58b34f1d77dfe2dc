"""The Lua scripts of the Redis rate limiter (:mod:`tokenwire.limits.redis`), one per call.

Each runs atomically in Redis and takes the time from Redis (``TIME``). Numbers come back as
one string, separated by spaces: one bulk string costs the client a fraction of what parsing
an array of ten does (pure-Python RESP parsing was most of a batch's CPU). A TAT is stored as
``"<server µs when written> <seconds ahead of then>"`` and the GCRA follows
:func:`tokenwire.limits.base.gcra` step for step, relative to now.
"""

from __future__ import annotations

COMMON = """
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function fmt(x) return string.format('%.17g', x) end
local function ahead(key, now)
  local v = redis.call('GET', key)
  if not v then return 0 end
  local at, rel = string.match(v, '^(%S+) (%S+)$')
  return tonumber(rel) - (now - tonumber(at)) / 1e6
end
local function store(key, now, rel)
  if rel > 0 then
    redis.call('SET', key, string.format('%.0f ', now) .. fmt(rel), 'PX', math.ceil(rel * 1000))
  else
    redis.call('DEL', key)
  end
end
-- base.gcra() with now = 0: {allowed, new tat, retry after, remaining, reset}
local function gcra(tat, cost, limit, window)
  local interval = window / limit
  local current = math.max(tat, 0)
  local new_tat = current + cost * interval
  if new_tat - window > 0 then
    local remaining = math.max(0, math.floor((window - current) / interval + 1e-3))
    return {0, tat, new_tat - window, remaining, current}
  end
  local remaining = math.max(0, math.floor((window - new_tat) / interval + 1e-3))
  return {1, new_tat, 0, remaining, new_tat}
end
local function push(out, g)  -- allowed (-1: not checked), retry after, remaining, reset
  g = g or {-1, 0, 0, 0, 0}
  for _, i in ipairs({1, 3, 4, 5}) do table.insert(out, fmt(g[i])) end
end
"""

# KEYS: r, t, s. ARGV: window, rpm, tpm, tokens, max_streams (-1: none), stream id, stream ttl.
# Returns now (µs), the request and token states (allowed -1: not checked), open streams.
# (as one string of numbers)
ADMIT = (
    COMMON
    + """
local window, rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tokens, max_streams = tonumber(ARGV[4]), tonumber(ARGV[5])
local now = clock()
local ok, r, t, open = true, nil, nil, 0
if rpm >= 0 then
  r = gcra(ahead(KEYS[1], now), 1, rpm, window)
  ok = r[1] == 1
end
if tpm >= 0 then
  if tokens > tpm then
    ok = false
  else
    t = gcra(ahead(KEYS[2], now), tokens, tpm, window)
    ok = ok and t[1] == 1
  end
end
if max_streams >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', fmt(now))
  open = redis.call('ZCARD', KEYS[3])
  ok = ok and open < max_streams
end
if not ok then
  -- refused: nothing is consumed, so the headers report the buckets as they stand
  if r then
    local p = gcra(ahead(KEYS[1], now), 0, rpm, window)
    r = {r[1], r[2], r[3], p[4], p[5]}
  end
  if tpm >= 0 then
    local p = gcra(ahead(KEYS[2], now), 0, tpm, window)
    if t then t = {t[1], t[2], t[3], p[4], p[5]} else t = {1, 0, 0, p[4], p[5]} end
  end
end
if ok then
  if r then store(KEYS[1], now, r[2]) end
  if t then store(KEYS[2], now, t[2]) end
  if max_streams >= 0 then
    local ttl = tonumber(ARGV[7])
    redis.call('ZADD', KEYS[3], fmt(now + ttl * 1e6), ARGV[6])
    redis.call('PEXPIRE', KEYS[3], math.ceil(ttl * 1000))
  end
end
local out = {fmt(now)}
push(out, r)
push(out, t)
table.insert(out, fmt(open))
return table.concat(out, ' ')
"""
)

# KEYS: t, s. ARGV: stream id, tpm (-1: none), actual - estimated tokens, window.
SETTLE = (
    COMMON
    + """
redis.call('ZREM', KEYS[2], ARGV[1])
local tpm, delta, window = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if tpm > 0 and delta ~= 0 then
  local now = clock()
  store(KEYS[1], now, math.max(0, ahead(KEYS[1], now) + delta * (window / tpm)))
end
return 0
"""
)

# KEYS: the stream ZSETs, one per slot. ARGV: lease seconds, then the stream ids (same order).
RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local lease = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, string.format('%.17g', now + lease * 1e6), ARGV[i + 1])
  redis.call('PEXPIRE', key, math.ceil(lease * 1000))
end
return #KEYS
"""

# KEYS: a. ARGV: limit, window, commit (1: count a failure). Returns "<allowed> <retry after>".
AUTH = (
    COMMON
    + """
local now = clock()
local g = gcra(ahead(KEYS[1], now), 1, tonumber(ARGV[1]), tonumber(ARGV[2]))
if g[1] == 1 and ARGV[3] == '1' then store(KEYS[1], now, g[2]) end
return fmt(g[1]) .. ' ' .. fmt(g[3])
"""
)
