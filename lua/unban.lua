-- unban.lua: lift a subject's ban.
--
-- The ban ends now; strikes stay remembered (a later offence still
-- escalates) and the violation window starts afresh.
--
-- KEYS[1]  ban hash   <prefix>{<subject>}:ban
-- KEYS[2]  state hash <prefix>{<subject>}:b
-- Returns 1 if a ban was active, 0 if there was none.

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ban_until = tonumber(redis.call('HGET', KEYS[1], 'until')) or 0
if ban_until <= now_ms then return 0 end
redis.call('HSET', KEYS[1], 'until', 0)
redis.call('HDEL', KEYS[2], '#vs', '#vc')
return 1
