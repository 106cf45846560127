-- Admission: read every counter of one request in one atomic step.
-- KEYS: the request's counters (one hash slot: they share the {rule_name} tag).
-- Returns, per key, two values: the tokens used in its window (a string, "0" when the
-- window has not started) and the milliseconds left in the window (PTTL: -2 when the
-- key does not exist, -1 when it has no expiry).
local out = {}
for i, key in ipairs(KEYS) do
  out[2 * i - 1] = redis.call('GET', key) or '0'
  out[2 * i] = redis.call('PTTL', key)
end
return out
