-- Reserve mode, at the end of a response: correct each counter by actual - reserved.
-- KEYS: the request's counters. ARGV[1]: tokens reserved; ARGV[2]: tokens actually used;
-- ARGV[1 + 2i], ARGV[2 + 2i]: the window id the reservation went into (PEXPIRETIME) and the
-- window (seconds) of KEYS[i].
-- In the same window: add the difference (a refund never takes a counter below zero). In a
-- later window: a refund is dropped (the old window took the reservation with it), extra
-- usage is added to the current window.
local reserved = tonumber(ARGV[1])
local actual = tonumber(ARGV[2])
for i, key in ipairs(KEYS) do
  if redis.call('PEXPIRETIME', key) == tonumber(ARGV[1 + 2 * i]) then
    if actual >= reserved then
      redis.call('INCRBY', key, actual - reserved)
    else
      local used = tonumber(redis.call('GET', key) or '0') or 0
      redis.call('DECRBY', key, math.min(reserved - actual, used))
    end
  elseif actual > reserved then
    redis.call('INCRBY', key, actual - reserved)
    if redis.call('TTL', key) == -1 then
      redis.call('EXPIRE', key, ARGV[2 + 2 * i])
    end
  end
end
return #KEYS
