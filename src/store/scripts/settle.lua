-- Reserve mode, at the end of a response: correct each counter by actual - reserved, in the
-- window the reservation went into (a refund from a window that has ended is dropped; extra
-- usage goes to the current window).
-- ARGV[1]: tokens reserved; ARGV[2]: tokens used; ARGV[4i - 1 .. 4i + 2]: the algorithm,
-- window (s), limit and reservation's window id of KEYS[i].
local delta = tonumber(ARGV[2]) - tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  add(key, tonumber(ARGV[4 * i - 1]), tonumber(ARGV[4 * i]), tonumber(ARGV[4 * i + 1]), delta, tonumber(ARGV[4 * i + 2]))
end
return #KEYS
