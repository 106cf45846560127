-- Reserve mode, at admission: reserve ARGV[1] tokens on every counter of one request, all or
-- none, atomically. ARGV[3i - 1 .. 3i + 1]: the algorithm, window (s) and limit of KEYS[i].
-- An amount fits a counter whose budget is not spent and that is either empty (an oversized
-- request gets one turn per window) or has room for it.
-- Returns {1 if reserved else 0, then per key: tokens used before, milliseconds until its
-- budget frees, and the window id the reservation went into (0 when refused)}.
local amount = tonumber(ARGV[1])
local used, reset = {}, {}
local fits = true
for i, key in ipairs(KEYS) do
  local limit = tonumber(ARGV[3 * i + 1])
  used[i], reset[i] = state(key, tonumber(ARGV[3 * i - 1]), tonumber(ARGV[3 * i]), limit)
  if not (used[i] < limit and (used[i] == 0 or used[i] + amount <= limit)) then
    fits = false
  end
end
local out = {fits and 1 or 0}
for i, key in ipairs(KEYS) do
  local wid = 0
  if fits then
    local algo, window, limit = tonumber(ARGV[3 * i - 1]), tonumber(ARGV[3 * i]), tonumber(ARGV[3 * i + 1])
    add(key, algo, window, limit, amount, nil)
    wid = window_id(key, algo, window)
  end
  out[#out + 1] = used[i]
  out[#out + 1] = reset[i]
  out[#out + 1] = wid
end
return out
