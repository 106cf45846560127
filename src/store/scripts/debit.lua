-- Settlement (post-debit): add tokens to counters, atomically. KEYS: the counters (distinct, so
-- none is charged twice; one hash slot). ARGV[4i - 3 .. 4i]: the tokens, algorithm, window (s)
-- and limit of KEYS[i]: one request's debit, or many requests' debits merged per counter.
-- A fixed window starts at the first debit of its key (Higress semantics); a key found
-- without expiry (written by hand, or by a crashed older client) is given one.
-- Returns the positions in KEYS of the keys that failed (a value of another type under them),
-- which are left as they are; the others are written all the same.
local failed = {}
for i, key in ipairs(KEYS) do
  local ok, e = pcall(add, key, tonumber(ARGV[4 * i - 2]), tonumber(ARGV[4 * i - 1]), tonumber(ARGV[4 * i]), tonumber(ARGV[4 * i - 3]), nil)
  if not ok and foreign(e) then
    failed[#failed + 1] = i
  end
end
return failed
