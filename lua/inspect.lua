-- inspect.lua: read a subject's ban without changing it.
--
-- KEYS[1]  ban hash   <prefix>{<subject>}:ban
-- KEYS[2]  state hash <prefix>{<subject>}:b
-- Returns {now_us, until_ms, strikes, reason, source, at_ms, dur_ms}
-- as strings, '' for what does not exist. Numbers are formatted as whole
-- decimals (Lua's own tostring would give 1.7e+15).

local function whole(x)
  local n = tonumber(x)
  if n == nil then return '' end
  return string.format('%.0f', n)
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local b = redis.call('HMGET', KEYS[1], 'until', 'strikes', 'reason', 'source', 'at', 'dur')
-- decide.lua's own view of the ban wins if it is longer (its record may
-- not have been written yet).
local s = redis.call('HMGET', KEYS[2], '#bu', '#bs')
if (tonumber(s[1]) or 0) > (tonumber(b[1]) or 0) then b[1] = s[1] end
if (tonumber(s[2]) or 0) > (tonumber(b[2]) or 0) then b[2] = s[2] end
-- Only decide.lua bans without writing a record first, so a ban known from
-- the state hash alone is an automatic one.
if not b[4] and s[1] then b[4] = 'auto' end
return {whole(now), whole(b[1]), whole(b[2]), b[3] or '', b[4] or '', whole(b[5]), whole(b[6])}
