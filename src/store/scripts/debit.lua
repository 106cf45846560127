-- Settlement (post-debit): add the tokens a request used to every one of its counters,
-- atomically. KEYS: the counters (deduplicated by the caller, so none is charged twice).
-- ARGV[1]: tokens; ARGV[3i - 1 .. 3i + 1]: the algorithm, window (s) and limit of KEYS[i].
-- A fixed window starts at the first debit of its key (Higress semantics); a key found
-- without expiry (written by hand, or by a crashed older client) is given one.
local now = now_ms()
local tokens = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  add(key, tonumber(ARGV[3 * i - 1]), tonumber(ARGV[3 * i]), tonumber(ARGV[3 * i + 1]), now, tokens, nil)
end
return #KEYS
