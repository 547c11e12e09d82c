-- decide.lua: one subject's whole decision in one atomic call.
--
-- Ban check, every matched token bucket (all-or-nothing), the violation
-- counter and the escalation to a ban. Time is Redis' own clock, so gateway
-- nodes with skewed clocks agree.
--
-- Buckets use GCRA, the exact integer form of a token bucket: a bucket is
-- one number, its TAT (the time, in microseconds, at which it is full
-- again). With T = microseconds per token and B = burst:
--   tokens(now)  = B - max(0, TAT - now) / T       (fractional, exact)
--   a request of cost c passes  iff  max(TAT, now) + c*T - now <= B*T
--   passing sets TAT = max(TAT, now) + c*T
--   a refused request waits      max(TAT, now) + c*T - B*T - now
-- All values are integers below 2^53, exact in Lua's doubles.
--
-- KEYS[1]  state hash <prefix>{<subject>}:b - field per rule = TAT (us);
--          '#vs' = violation window start (ms), '#vc' = violations in it;
--          '#bu' = ban until (ms), '#bs' = strikes (kept until '#bu' +
--          memory). One key per subject, so a slot being moved never
--          answers TRYAGAIN. The ban's full record (<prefix>{<subject>}:ban,
--          read by the admin API and reconcile) is written by ban.lua.
-- ARGV[1]  now in microseconds, or '' for redis TIME (tests pin the clock)
-- ARGV[2]  'd' decide, or 'r:<rule>' refund: give the costs back (rule
--          <rule> of another subject refused the request), count a violation
-- ARGV[3]  idle TTL of the state hash, ms (every bucket of it refills)
-- ARGV[4]  '1' if the subject can be banned (check and escalate)
-- ARGV[5..10] after, within_ms, duration_ms, factor, max_ms, memory_ms
--          (after = 0: no automatic bans)
-- ARGV[11..] per bucket, 5 each: rule name, T (us), burst, cost, shadow '1'/'0'
--
-- Returns {status, ban_ms, strikes, until_ms, then per bucket: state,
-- room_us, wait_us} where status is 0 allowed, 1 limited, 2 banned before
-- this request, 3 banned by this request; bucket state is 0 charged,
-- 1 refusing, 2 would refuse but shadow (not charged); room_us = tokens
-- left x T; wait_us = time until allowed (refusing) or until full.
--
-- Needs Redis >= 5 (effects replication, so TIME may precede writes).


local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local now_ms = math.floor(now / 1000)
local mode = string.sub(ARGV[2], 1, 1)
local ttl = tonumber(ARGV[3])
local bannable = ARGV[4] == '1'
local after = tonumber(ARGV[5])

local strikes = 0
-- The hash lives at least until the ban ends plus ban memory (strikes).
local floor = 0
local b = redis.call('HMGET', KEYS[1], '#bu', '#bs')
if b[1] or b[2] then
  floor = (tonumber(b[1]) or 0) + tonumber(ARGV[10]) - now_ms
end
if bannable then
  local ban_until = tonumber(b[1]) or 0
  strikes = tonumber(b[2]) or 0
  if mode == 'd' and ban_until > now_ms then
    return {2, ban_until - now_ms, strikes, ban_until}
  end
end
if ttl < floor then ttl = floor end

local n = (#ARGV - 10) / 5
local fields = {}
for i = 1, n do fields[i] = ARGV[10 + (i - 1) * 5 + 1] end
fields[n + 1] = '#vs'
fields[n + 2] = '#vc'
local cur = redis.call('HMGET', KEYS[1], unpack(fields))

local out = {0, 0, 0, 0}
local tats = {}
local refused = nil
for i = 1, n do
  local base = 10 + (i - 1) * 5
  local T = tonumber(ARGV[base + 2])
  local cap = T * tonumber(ARGV[base + 3])
  local cost = T * tonumber(ARGV[base + 4])
  local shadow = ARGV[base + 5] == '1'
  local tat = tonumber(cur[i]) or now
  if tat < now then tat = now end
  local state, room, wait
  if mode == 'r' then
    tat = tat - cost
    if tat < now then tat = now end
    state, room, wait = 0, cap - (tat - now), tat - now
  elseif tat + cost - now <= cap then
    tat = tat + cost
    state, room, wait = 0, cap - (tat - now), tat - now
  else
    if shadow then state = 2 else state = 1 end
    room, wait = cap - (tat - now), tat + cost - cap - now
    if state == 1 and refused == nil then refused = fields[i] end
  end
  tats[i] = tat
  out[#out + 1] = state
  out[#out + 1] = room
  out[#out + 1] = wait
end

if refused == nil and mode == 'd' then
  -- Charge every bucket that passed (a shadow rule that would refuse is
  -- left as a real refusal would leave it).
  local args = {}
  for i = 1, n do
    if out[4 + (i - 1) * 3 + 1] == 0 then
      args[#args + 1] = fields[i]
      args[#args + 1] = tats[i]
    end
  end
  if #args > 0 then
    redis.call('HSET', KEYS[1], unpack(args))
    -- Never cut short an open violation window.
    local vs = tonumber(cur[n + 1])
    if vs ~= nil and bannable and after > 0 then
      local keep = vs + tonumber(ARGV[6]) - now_ms
      if keep > ttl then ttl = keep end
    end
    redis.call('PEXPIRE', KEYS[1], ttl)
  end
  return out
end

if mode == 'r' then
  local args = {}
  for i = 1, n do
    args[#args + 1] = fields[i]
    args[#args + 1] = tats[i]
  end
  if n > 0 then
    redis.call('HSET', KEYS[1], unpack(args))
    redis.call('PEXPIRE', KEYS[1], ttl)
  end
  refused = string.sub(ARGV[2], 3)
end

-- A refusal: charge nothing, count a violation, maybe escalate.
out[1] = 1
if not bannable or after <= 0 then
  return out
end
local within = tonumber(ARGV[6])
local vs = tonumber(cur[n + 1])
local vc = tonumber(cur[n + 2]) or 0
if vs == nil or now_ms - vs >= within then
  vs = now_ms
  vc = 0
end
vc = vc + 1
if vc < after then
  redis.call('HSET', KEYS[1], '#vs', vs, '#vc', vc)
  local keep = vs + within - now_ms
  if keep < ttl then keep = ttl end
  redis.call('PEXPIRE', KEYS[1], keep)
  return out
end

strikes = strikes + 1
local dur = tonumber(ARGV[7]) * (tonumber(ARGV[8]) ^ (strikes - 1))
local max = tonumber(ARGV[9])
if dur > max then dur = max end
dur = math.floor(dur)
local ban_until = now_ms + dur
redis.call('HSET', KEYS[1], '#bu', ban_until, '#bs', strikes)
redis.call('HDEL', KEYS[1], '#vs', '#vc')
local keep = dur + tonumber(ARGV[10])
if keep < ttl then keep = ttl end
redis.call('PEXPIRE', KEYS[1], keep)
out[1] = 3
out[2] = dur
out[3] = strikes
out[4] = ban_until
return out
