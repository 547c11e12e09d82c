-- unban.lua: lift a subject's ban.
--
-- The ban ends now; strikes stay remembered for ban memory from now (a
-- later offence still escalates: decide.lua remembers them while '#bu' +
-- memory is ahead) and the violation window starts afresh.
--
-- KEYS[1]  ban hash   <prefix>{<subject>}:ban
-- KEYS[2]  state hash <prefix>{<subject>}:b ('#bu' is the ban decide.lua
--          checks)
-- Returns 1 if a ban was active, 0 if there was none.

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local record_until = tonumber(redis.call('HGET', KEYS[1], 'until')) or 0
local state_until = tonumber(redis.call('HGET', KEYS[2], '#bu')) or 0
if record_until <= now_ms and state_until <= now_ms then return 0 end
if record_until > now_ms then redis.call('HSET', KEYS[1], 'until', now_ms) end
if state_until > now_ms then redis.call('HSET', KEYS[2], '#bu', now_ms) end
redis.call('HDEL', KEYS[2], '#vs', '#vc')
return 1
