-- ban.lua: an operator's ban of one subject (an IP key), or the record of a
-- ban decide.lua just made.
--
-- Keeps the subject's strike count (a manual ban is not a strike) and sets
-- the ban's end from Redis' clock, so every node agrees on it. Writes the
-- ban's record (what the admin API lists) and the two fields of the state
-- hash that decide.lua checks on every request.
--
-- KEYS[1]  ban hash   <prefix>{<subject>}:ban - until (ms), strikes,
--          reason, source, at (ms), dur (ms)
-- KEYS[2]  state hash <prefix>{<subject>}:b - '#bu' until (ms), '#bs'
--          strikes (remembered while '#bu' + memory is ahead), '#x' the
--          time the hash is kept until (never brought forward)
-- ARGV[1]  duration, ms
-- ARGV[2]  reason
-- ARGV[3]  memory, ms (how long strikes are remembered after the ban)
-- ARGV[4]  source ('manual', or 'auto' for an automatic ban: its record
--          after decide.lua made it, or one made during a Redis outage
--          written back)
-- ARGV[5]  strikes the subject has at least (an automatic ban keeps its
--          escalation; 0 for an operator's ban)
-- ARGV[6]  '1' to keep a longer ban already in place untouched (writing
--          back what a node knew must never shorten a ban made elsewhere)
-- Returns {until_ms, strikes, now_ms}.

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local dur = tonumber(ARGV[1])
local memory = tonumber(ARGV[3])
local current = redis.call('HMGET', KEYS[1], 'until', 'strikes')
local state = redis.call('HMGET', KEYS[2], '#bu', '#bs', '#x')
local state_strikes = 0
if (tonumber(state[1]) or 0) + memory > now_ms then state_strikes = tonumber(state[2]) or 0 end
local strikes = math.max(tonumber(current[2]) or 0, state_strikes)
local current_until = tonumber(current[1]) or 0
if ARGV[6] == '1' and current_until >= now_ms + dur then
  return {current_until, strikes, now_ms}
end
local least = tonumber(ARGV[5]) or 0
if least > strikes then strikes = least end
local ban_until = now_ms + dur
redis.call('HSET', KEYS[1], 'until', ban_until, 'strikes', strikes,
  'reason', ARGV[2], 'source', ARGV[4], 'at', now_ms, 'dur', dur)
redis.call('PEXPIRE', KEYS[1], dur + memory)
local state_until = ban_until
if ARGV[6] == '1' and (tonumber(state[1]) or 0) > state_until then
  state_until = tonumber(state[1])
end
local keep = state_until + memory
if (tonumber(state[3]) or 0) > keep then keep = tonumber(state[3]) end
redis.call('HSET', KEYS[2], '#bu', state_until, '#bs', strikes, '#x', keep)
redis.call('PEXPIRE', KEYS[2], keep - now_ms)
return {ban_until, strikes, now_ms}
