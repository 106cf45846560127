-- Reserve mode, at admission: the reservations of ARGV[1] requests, in order, each all or none
-- on its own counters, atomically. Per reservation, from ARGV[2] on: the amount, the number of
-- its keys (the next ones in KEYS), then for each key its algorithm, window (s) and limit.
-- An amount fits a counter whose budget is not spent and that is either empty (an oversized
-- request gets one turn per window) or has room for it.
-- Returns, per reservation: 1 if reserved else 0, then per key: tokens used before it,
-- milliseconds until its budget frees, and the window id the reservation went into (0 when
-- refused).
local out = {}
local a, k = 2, 1
for _ = 1, tonumber(ARGV[1]) do
  local amount, count = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  a = a + 2
  local used, reset, ids = {}, {}, {}
  local fits = true
  for i = 0, count - 1 do
    local p = a + 3 * i
    local algo, window, limit = tonumber(ARGV[p]), tonumber(ARGV[p + 1]), tonumber(ARGV[p + 2])
    if algo == 1 then
      used[i], reset[i], ids[i] = fixed_state(KEYS[k + i], window)
    else
      used[i], reset[i] = state(KEYS[k + i], algo, window, limit)
    end
    if not (used[i] < limit and (used[i] == 0 or used[i] + amount <= limit)) then
      fits = false
    end
  end
  out[#out + 1] = fits and 1 or 0
  for i = 0, count - 1 do
    local wid = 0
    if fits then
      local p = a + 3 * i
      local algo, window, limit = tonumber(ARGV[p]), tonumber(ARGV[p + 1]), tonumber(ARGV[p + 2])
      -- A running fixed window keeps its expiry, and its id is already known.
      add(KEYS[k + i], algo, window, limit, amount, nil, ids[i] ~= nil)
      wid = ids[i] or window_id(KEYS[k + i], algo, window)
    end
    out[#out + 1] = used[i]
    out[#out + 1] = reset[i]
    out[#out + 1] = wid
  end
  a = a + 3 * count
  k = k + count
end
return out
