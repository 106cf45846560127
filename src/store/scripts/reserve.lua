-- Reserve mode, at admission: reserve ARGV[1] tokens on every counter of one request, all or
-- none, atomically.
-- KEYS: the request's counters. ARGV[1]: the amount; ARGV[2i], ARGV[2i + 1]: the limit and the
-- window (seconds) of KEYS[i].
-- An amount fits a counter whose budget is not spent and that is either empty (an oversized
-- request gets one turn per window) or has room for it.
-- Returns {1 if reserved else 0, then per key: tokens used before (string), PTTL before, and
-- the window id (PEXPIRETIME, Redis >= 7.0) the reservation went into, or 0}.
local amount = tonumber(ARGV[1])
local used, ttl = {}, {}
local fits = true
for i, key in ipairs(KEYS) do
  used[i] = redis.call('GET', key) or '0'
  local u = tonumber(used[i]) or 0
  local limit = tonumber(ARGV[2 * i])
  ttl[i] = redis.call('PTTL', key)
  if not (u < limit and (u == 0 or u + amount <= limit)) then
    fits = false
  end
end
local out = {fits and 1 or 0}
for i, key in ipairs(KEYS) do
  local window_id = 0
  if fits then
    redis.call('INCRBY', key, ARGV[1])
    if redis.call('TTL', key) == -1 then
      redis.call('EXPIRE', key, ARGV[2 * i + 1])
    end
    window_id = redis.call('PEXPIRETIME', key)
  end
  out[#out + 1] = used[i]
  out[#out + 1] = ttl[i]
  out[#out + 1] = window_id
end
return out
