-- Settlement (post-debit): add tokens to counters, atomically. KEYS: the counters (distinct, so
-- none is charged twice; one hash slot). ARGV[4i - 3 .. 4i]: the tokens, algorithm, window (s)
-- and limit of KEYS[i]: one request's debit, or many requests' debits merged per counter.
-- A fixed window starts at the first debit of its key (Higress semantics); a key found
-- without expiry (written by hand, or by a crashed older client) is given one.
for i, key in ipairs(KEYS) do
  add(key, tonumber(ARGV[4 * i - 2]), tonumber(ARGV[4 * i - 1]), tonumber(ARGV[4 * i]), tonumber(ARGV[4 * i - 3]), nil)
end
return #KEYS
