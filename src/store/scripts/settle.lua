-- Reserve mode, at the end of responses: correct counters by the tokens used minus the tokens
-- reserved, in the window the reservation went into (a refund from a window that has ended is
-- dropped, but for a sliding window's previous window, which takes it; extra usage goes to the
-- current window). KEYS: the counters (one hash slot; a key
-- may repeat, for reservations in different windows). ARGV[6i - 5 .. 6i]: the algorithm,
-- window (s), limit and reservation window id of KEYS[i], then the tokens to refund and the
-- tokens to add (one of them 0): one request's settlement, or many merged per counter and
-- window.
-- Returns the positions in KEYS of the keys that failed, as the debit script does.
local failed = {}
for i, key in ipairs(KEYS) do
  local a = 6 * i
  local ok, e = pcall(add, key, tonumber(ARGV[a - 5]), tonumber(ARGV[a - 4]), tonumber(ARGV[a - 3]), tonumber(ARGV[a]) - tonumber(ARGV[a - 1]), tonumber(ARGV[a - 2]))
  if not ok and foreign(e) then
    failed[#failed + 1] = i
  end
end
return failed
