-- Settlement: add the tokens a request used to every one of its counters, atomically.
-- KEYS: the request's counters (deduplicated by the caller, so none is charged twice).
-- ARGV[1]: tokens used; ARGV[1 + i]: the window of KEYS[i], in seconds.
-- A window starts at the first debit of a key (Higress semantics): the key gets its
-- expiry when INCRBY creates it. A key found without expiry (written by hand, or left
-- by a crash between two commands of an older client) is given one, so it cannot
-- block its owner forever.
for i, key in ipairs(KEYS) do
  redis.call('INCRBY', key, ARGV[1])
  if redis.call('TTL', key) == -1 then
    redis.call('EXPIRE', key, ARGV[1 + i])
  end
end
return #KEYS
