-- decide_batch.lua: several subjects' decisions in one atomic call.
--
-- The gateway coalesces the decisions that arrive together on one worker
-- into one call, so Redis pays the per-call cost (command parsing, script
-- lookup, the Lua call, TIME) once per batch instead of once per request.
-- Each subject is decided exactly as decide.lua decides it alone: the line
-- marked below is replaced, when the gateway starts, by the whole text of
-- decide.lua, which becomes the body of decide_one. Subjects are decided in
-- order, on one reading of Redis' clock, atomically as a whole.
--
-- Standalone Redis only: on a Cluster the keys of different subjects live
-- in different slots, and one script may only touch one slot.
--
-- KEYS     every subject's keys, one subject after the other
-- ARGV[1]  number of subjects
-- then per subject: its number of keys, its number of arguments, and its
--          arguments exactly as decide.lua takes them (its first argument,
--          '' for Redis' clock, is given this call's one TIME reading)
--
-- Returns one decide.lua reply per subject, in order.

local function decide_one(KEYS, ARGV)
-- @DECIDE@
end

local now = nil
local out = {}
local k, a = 0, 1
for s = 1, tonumber(ARGV[1]) do
  local nk, na = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local keys, argv = {}, {}
  for i = 1, nk do keys[i] = KEYS[k + i] end
  for i = 1, na do argv[i] = ARGV[a + 2 + i] end
  if argv[1] == '' then
    if now == nil then
      local t = redis.call('TIME')
      now = string.format('%.0f', tonumber(t[1]) * 1000000 + tonumber(t[2]))
    end
    argv[1] = now
  end
  out[s] = decide_one(keys, argv)
  k = k + nk
  a = a + 2 + na
end
return out
