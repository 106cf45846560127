-- Shared by every script: the three algorithms, over one key each.
--   1 fixed_window   (Higress): a string counter; the window starts at the first write and
--                    lasts `window` seconds (its TTL). Window id: PEXPIRETIME.
--   2 sliding_window a hash {idx, cur, prev} over windows aligned to multiples of `window`;
--                    used = prev * (1 - elapsed fraction) + cur. Window id: the index.
--   3 token_bucket   a hash {used, at}: tokens used drain continuously at limit per window;
--                    used may exceed the limit (debt). Window id: 0 (no windows).
-- Times are Redis's (TIME), in milliseconds, read once per script and only when needed (fixed
-- windows never need it).

local time_ms
local function now_ms()
  if time_ms == nil then
    local t = redis.call('TIME')
    time_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return time_ms
end

-- After a counter's work failed under pcall: whether it failed because its key holds a value
-- the counter cannot count on (set by hand, or by another program: another type, text, or a
-- number an increment would take past 64 bits; nothing of the counter is written then, since
-- each fails on its first command that touches the value). Any other error (Redis refusing a
-- command) stops the script, as it would without pcall.
local function foreign(e)
  local msg = type(e) == 'table' and e.err or tostring(e)
  if string.find(msg, 'WRONGTYPE', 1, true) or string.find(msg, 'not an integer', 1, true)
    or string.find(msg, 'would overflow', 1, true) then
    return true
  end
  error(e)
end

-- A fixed window's count: 0 for a key that does not exist; text that is not an integer fails
-- as INCRBY would (see `foreign`), or the counter would read 0 used while every write to it
-- fails.
local function fixed_count(key)
  local v = redis.call('GET', key)
  if not v then return 0 end
  -- As INCRBY reads it: an optional minus, no leading zero, no space, within 64 bits (Lua's
  -- `tonumber` would also read hex, exponents, `+5`, ` 5`, `5.0`).
  local digits = string.match(v, '^%-?([1-9]%d*)$')
  local max = string.sub(v, 1, 1) == '-' and '9223372036854775808' or '9223372036854775807'
  if v ~= '0' and (digits == nil or #digits > 19 or (#digits == 19 and digits > max)) then
    error({err = 'ERR value is not an integer or out of range'})
  end
  return tonumber(v)
end

-- A count or a time as an integer the answer can carry: past 2^53 (a debt of 2^50 tokens
-- drains for longer than that many ms on a slow bucket) Lua's numbers are not exact, and
-- MessagePack would pack a float the client refuses.
local function clamp(n)
  return math.floor(math.min(n, 2^53))
end

-- The id of the key's current window.
local function window_id(key, algo, window)
  if algo == 1 then return redis.call('PEXPIRETIME', key) end
  if algo == 2 then return math.floor(now_ms() / (window * 1000)) end
  return 0
end

-- Tokens used, and milliseconds until the budget frees: while spent, until a request can pass
-- again; otherwise until the window ends or the bucket is empty (the whole window when nothing
-- runs).
local function state(key, algo, window, limit)
  local w = window * 1000
  if algo == 1 then
    local used = fixed_count(key)
    local ttl = redis.call('PTTL', key)
    if ttl < 0 then ttl = w end
    return clamp(used), ttl
  end
  local now = now_ms()
  if algo == 2 then
    local h = redis.call('HMGET', key, 'idx', 'cur', 'prev')
    local idx_now = math.floor(now / w)
    local idx, cur, prev = tonumber(h[1]), tonumber(h[2]) or 0, tonumber(h[3]) or 0
    if idx == idx_now - 1 then
      prev, cur = cur, 0
    elseif idx ~= idx_now then
      prev, cur = 0, 0
    end
    local into = now % w
    local left = w - into
    local used = prev * left / w + cur
    -- Spent: until the previous window's fading share leaves it under the limit (in the next
    -- window when the current one alone is over); otherwise the next boundary.
    if used >= limit then
      if cur < limit then
        left = math.min(left, math.floor(left - w * (limit - cur) / prev) + 1)
      else
        left = left + math.floor(w * (1 - limit / cur)) + 1
      end
    end
    return clamp(used), clamp(left)
  end
  local h = redis.call('HMGET', key, 'used', 'at')
  local used = tonumber(h[1]) or 0
  local at = tonumber(h[2]) or now
  used = math.max(0, used - (now - at) * limit / w)
  -- Spent: until it drains under the limit; otherwise until it is empty.
  local drain = w
  if used >= limit then
    drain = math.floor((used - limit) * w / limit) + 1
  elseif used > 0 then
    drain = math.ceil(used * w / limit)
  end
  return clamp(used), clamp(drain)
end

-- A fixed window's state read for a reservation: tokens used, milliseconds until it ends, and
-- its id (PEXPIRETIME), nil when the key has no expiry (new, or left without one). With the
-- id in hand a reservation needs no second read of it; the time it costs (TIME) is read once
-- per script.
local function fixed_state(key, window)
  local used = fixed_count(key)
  local at = redis.call('PEXPIRETIME', key)
  if at < 0 then return clamp(used), window * 1000, nil end
  return clamp(used), math.max(0, at - now_ms()), at
end

-- Adds `amount` (negative: a refund, never below zero) to the key. With a window id, a refund
-- from a window that has ended is dropped (a sliding window's previous window, which still
-- weighs in, takes it) and extra usage goes to the current window.
-- `expiring`: the fixed-window key is known (read in this script) to have an expiry.
local function add(key, algo, window, limit, amount, wid, expiring)
  local w = window * 1000
  if algo == 1 then
    local same = wid == nil or redis.call('PEXPIRETIME', key) == wid
    if amount < 0 then
      if same then
        local used = fixed_count(key)
        redis.call('DECRBY', key, math.min(-amount, used))
      end
      return
    end
    if amount > 0 then
      redis.call('INCRBY', key, amount)
    end
    -- Only where no expiry is set: a new key, or one left without (a repair).
    if not expiring then
      redis.call('EXPIRE', key, window, 'NX')
    end
    return
  end
  local now = now_ms()
  if algo == 2 then
    local idx_now = math.floor(now / w)
    local earlier = amount < 0 and wid ~= nil and wid ~= idx_now
    if earlier and wid ~= idx_now - 1 then return end
    local h = redis.call('HMGET', key, 'idx', 'cur', 'prev')
    local idx, cur, prev = tonumber(h[1]), tonumber(h[2]) or 0, tonumber(h[3]) or 0
    if idx == idx_now - 1 then
      prev, cur = cur, 0
    elseif idx ~= idx_now then
      prev, cur = 0, 0
    end
    if earlier then
      prev = math.max(0, prev + amount)
    else
      cur = math.max(0, cur + amount)
    end
    redis.call('HSET', key, 'idx', idx_now, 'cur', cur, 'prev', prev)
    redis.call('PEXPIRE', key, 2 * w)
    return
  end
  local h = redis.call('HMGET', key, 'used', 'at')
  local exact = tonumber(h[1]) or 0
  local at = tonumber(h[2]) or now
  exact = math.max(0, exact - (now - at) * limit / w)
  exact = math.max(0, exact + amount)
  redis.call('HSET', key, 'used', tostring(exact), 'at', now)
  -- As a decimal integer: Redis would write a large number in exponent form and refuse it.
  redis.call('PEXPIRE', key, string.format('%d', clamp(math.ceil(exact * w / limit) + w)))
end
