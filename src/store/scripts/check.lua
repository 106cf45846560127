-- Admission (post-debit): read every counter of one request in one atomic step.
-- KEYS: the request's counters (one hash slot: they share the {rule_name} tag).
-- ARGV[3i - 2 .. 3i]: the algorithm (1 fixed, 2 sliding, 3 bucket), window (s) and limit of KEYS[i].
-- Returns, per key: tokens used, and milliseconds until its budget frees; 0 and -1 for a key
-- that cannot be read (a value of another type under it).
local out = {}
for i, key in ipairs(KEYS) do
  local ok, used, reset = pcall(state, key, tonumber(ARGV[3 * i - 2]), tonumber(ARGV[3 * i - 1]), tonumber(ARGV[3 * i]))
  if not ok and foreign(used) then used, reset = 0, -1 end
  out[2 * i - 1] = used
  out[2 * i] = reset
end
return out
