-- Reserve mode, at admission: the reservations of ARGV[1] requests, in order, each all or none
-- on its own counters, atomically. Per reservation, from ARGV[2] on: the amount, the number of
-- its keys (the next ones in KEYS), then for each key its algorithm, window (s) and limit.
-- An amount fits a counter whose budget is not spent and that is either empty (an oversized
-- request gets one turn per window) or has room for it.
-- Returns, as a MessagePack array of integers, per reservation: 1 if reserved, 0 if refused,
-- 2 + i if it failed on its i-th key (from 0; a value of another type under it), then per key:
-- tokens used before it, milliseconds until its budget frees, and the window id the
-- reservation went into (0 when refused).
--
-- A fixed window is reserved on first and checked after: INCRBY answers the tokens used before
-- it, and a reservation that does not fit is taken back (DECRBY, or DEL of a key it created)
-- before the script ends, so no one sees it. Two calls per counter where reading first takes
-- three, and Lua's calls into Redis are most of a reservation's cost.

-- One counter of a reservation: tokens used before it, milliseconds until its budget frees,
-- its window id (a fixed window's PEXPIRETIME; false when it has none or is not fixed), and
-- whether the amount is added already (a fixed window is reserved on first, checked after).
local function look(key, algo, window, limit, amount)
  if algo == 1 and amount > 0 then
    local u = redis.call('INCRBY', key, amount) - amount
    local at = redis.call('PEXPIRETIME', key)
    if at < 0 then return u, window * 1000, false, true end
    return u, math.max(0, at - now_ms()), at, true
  end
  if algo == 1 then
    local u, r, id = fixed_state(key, window)
    return u, r, id or false, false
  end
  local u, r = state(key, algo, window, limit)
  return u, r, false, false
end

local out, n = {}, 0
-- Per counter of the current reservation (reused from one to the next).
local used, reset, ids, tried, algos, windows, limits = {}, {}, {}, {}, {}, {}, {}
local a, k = 2, 1
for _ = 1, tonumber(ARGV[1]) do
  local amount, count = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  a = a + 2
  -- broken: the counter whose key holds a value of another type (nothing of it is written).
  local fits, broken = true, nil
  for i = 0, count - 1 do
    local algo, window, limit = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
    a = a + 3
    algos[i], windows[i], limits[i] = algo, window, limit
    local ok = false
    if not broken then
      ok, used[i], reset[i], ids[i], tried[i] = pcall(look, KEYS[k + i], algo, window, limit, amount)
      if not ok then foreign(used[i]) end
    end
    if not ok then
      broken = broken or i
      used[i], reset[i], ids[i], tried[i] = 0, 0, false, false
      fits = false
    elseif used[i] >= limit or (used[i] > 0 and used[i] + amount > limit) then
      fits = false
    end
  end
  n = n + 1
  -- A reservation that failed is taken back as one refused.
  out[n] = broken and 2 + broken or (fits and 1 or 0)
  for i = 0, count - 1 do
    local key, wid = KEYS[k + i], 0
    if fits then
      wid = ids[i]
      if tried[i] then
        -- A new key (or one left without expiry) starts its window now.
        if not wid then
          wid = now_ms() + windows[i] * 1000
          redis.call('PEXPIREAT', key, wid)
        end
      else
        -- A running fixed window keeps its expiry, and its id is already known.
        add(key, algos[i], windows[i], limits[i], amount, nil, wid ~= false)
        if not wid then wid = window_id(key, algos[i], windows[i]) end
      end
    elseif tried[i] then
      if used[i] == 0 and not ids[i] then
        redis.call('DEL', key)
      else
        redis.call('DECRBY', key, amount)
      end
    end
    out[n + 1], out[n + 2], out[n + 3] = used[i], reset[i], wid
    n = n + 3
  end
  k = k + count
end
-- One MessagePack array: cheaper to make than a reply of many integers, and much cheaper for
-- the client to read.
return cmsgpack.pack(out)
