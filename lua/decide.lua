-- decide.lua: one subject's whole decision in one atomic call.
--
-- Ban check, every matched rule (all-or-nothing), the violation counter and
-- the escalation to a ban. Time is Redis' own clock, so gateway nodes with
-- skewed clocks agree.
--
-- A rule is one of three kinds:
--
-- 'r' token bucket, by GCRA, the exact integer form of a token bucket: a
--     bucket is one number, its TAT (the time, in microseconds, at which it
--     is full again). With T = microseconds per token and B = burst:
--       tokens(now)  = B - max(0, TAT - now) / T       (fractional, exact)
--       a request of cost c passes  iff  max(TAT, now) + c*T - now <= B*T
--       passing sets TAT = max(TAT, now) + c*T
--       a refused request waits      max(TAT, now) + c*T - B*T - now
--     All values are integers below 2^53, exact in Lua's doubles.
-- 'q' calendar quota: at most Q per UTC hour, day or month; the field holds
--     '<period start, s>:<count>', and a count of an earlier period is 0.
--       a request of cost c passes  iff  count + c <= Q
--       a refused request waits until the next period starts
-- 'c' concurrency cap: at most M requests in flight. Each holds a lease in
--     the rule's lease set (a sorted set: lease id -> expiry in us) until
--     lease.lua releases it or it expires (a node that died never does).
--       a request passes  iff  live leases (expiry > now) + 1 <= M
--
-- KEYS[1]  state hash <prefix>{<subject>}:b - field per rate rule = TAT
--          (us), per quota rule = 'start:count'; '#vs' = violation window
--          start (ms), '#vc' = violations in it; '#bu' = ban until (ms),
--          '#bs' = strikes (remembered while '#bu' + memory is ahead, and
--          forgotten then however busy the subject is); '#x' = the time
--          (ms) the hash is kept until, which no call ever brings forward:
--          each call asks for what its own rules need, and an unrelated
--          request or a refund never cuts short a quota, a violation window
--          or remembered strikes that other fields need. The ban lives in
--          the state hash so that a subject without concurrency rules has
--          one key, and a slot being moved never answers TRYAGAIN; the
--          ban's full record (<prefix>{<subject>}:ban, read by the admin API
--          and reconcile) is written by ban.lua.
-- KEYS[2..] one lease set <prefix>{<subject>}:c:<rule> per concurrency
--          rule, in the order of the rules (same hash tag, same slot)
-- ARGV[1]  now in microseconds, or '' for redis TIME (tests pin the clock)
-- ARGV[2]  'd' decide ('b': the same, for one request whose rules are all
--          token buckets, none in shadow mode: a shorter path), 'r:<rule>' refund: give the costs back (rule <rule>
--          of another subject refused the request; the request's leases
--          are released) and count a violation, 'p' peek: evaluate
--          every rule at cost 0 and write nothing, or 't' top-up: a node
--          that admits this request from tokens it holds asks for up to
--          ARGV[12] more for its lease; charged like a decision when the
--          subject can spare them, otherwise nothing is charged and the
--          reply is a peek's (never a refusal: no violation is counted),
--          or 's' settle: the answer of an admitted request told its real
--          cost; each rule's cost (below) is the difference, signed: taken
--          off (a refund, never below an untouched bucket) when negative,
--          charged when positive even past the limit (the subject is then
--          in debt and its next requests wait); never a refusal, never a
--          violation, and the state lives until the debt is paid
-- ARGV[3]  idle TTL of the state hash, ms (every bucket of it refills,
--          every quota period of it ends)
-- ARGV[4]  '1' if the subject can be banned (check and escalate)
-- ARGV[5..10] after, within_ms, duration_ms, factor, max_ms, memory_ms
--          (after = 0: no automatic bans)
-- ARGV[11] the request's lease id ('' without concurrency rules)
-- ARGV[12] requests this call is for: in a decision, at most this many (the
--          node asks for a lease of tokens: the grant is charged now, on
--          every rule, all or nothing, and the node admits the requests
--          after the first from memory); never more than half of what
--          every rule has left, so near the limit the grant falls to 1 and
--          the subject is decided call by call. In a refund, exactly this
--          many are given back. '1' for one request.
-- ARGV[13..] per rule, 6 each: name, kind, a, b, cost, shadow '1'/'0'
--          where (a, b) is (T us, burst) for 'r', (period 'h'/'d'/'m',
--          quota) for 'q', (lease ms, max) for 'c'
--
-- Returns {status, ban_ms, strikes, until_ms, granted, then per rule:
-- state, room, wait} where status is 0 allowed, 1 limited, 2 banned before
-- this request, 3 banned by this request; granted is the requests charged
-- (ARGV[12] at most; 1 unless a lease was asked for and the subject could
-- spare it); a rule's state is 0 charged, 1 refusing, 2
-- would refuse but shadow (not charged). For 'r', room = tokens left x T
-- (us) and wait = us until allowed (refusing) or until full; for 'q', room
-- = requests left in the period and wait = us until the next period; for
-- 'c', room = free slots and wait = 1 s when refusing, else 0.
--
-- KEYS[i] and ARGV[i] above are KEYS[K + i] and ARGV[A + i] below: alone,
-- K = A = 0; in a batch, the subject's offsets.
--
-- Needs Redis >= 5 (effects replication, so TIME may precede writes).

-- What every decision reads, as locals: a local is a slot of the running
-- function, a global is a table lookup each time.
local KEYS, ARGV, redis, tonumber, unpack = KEYS, ARGV, redis, tonumber, unpack
local floor_of, sub = math.floor, string.sub

-- The UTC calendar period holding now_s: its start and the next one's,
-- in seconds (months by Howard Hinnant's civil_from_days).
local function period_bounds(code, now_s)
  if code == 'h' then
    local s = now_s - now_s % 3600
    return s, s + 3600
  end
  if code == 'd' then
    local s = now_s - now_s % 86400
    return s, s + 86400
  end
  local days = floor_of(now_s / 86400)
  local z = days + 719468
  local era = floor_of(z / 146097)
  local doe = z - era * 146097
  local yoe = floor_of((doe - floor_of(doe / 1460) + floor_of(doe / 36524)
    - floor_of(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + floor_of(yoe / 4) - floor_of(yoe / 100))
  local mp = floor_of((5 * doy + 2) / 153)
  local d = doy - floor_of((153 * mp + 2) / 5) + 1
  local m = mp + 3
  if mp >= 10 then m = mp - 9 end
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  local len = 31
  if m == 4 or m == 6 or m == 9 or m == 11 then
    len = 30
  elseif m == 2 then
    if (y % 4 == 0 and y % 100 ~= 0) or y % 400 == 0 then len = 29 else len = 28 end
  end
  local start = (days - (d - 1)) * 86400
  return start, start + len * 86400
end

-- The commands on the subject's state hash go through these, so that a
-- batch can point them at its copy of a hash that comes back within it.
local function hmget(key, fields) return redis.call('HMGET', key, unpack(fields)) end
local function hset(key, args) return redis.call('HSET', key, unpack(args)) end
local function hdel(key, fields) return redis.call('HDEL', key, unpack(fields)) end
local function pexpire(key, ms) return redis.call('PEXPIRE', key, ms) end

-- @BODY@
-- decide_batch.lua keeps what is above at its top level and makes what
-- follows a function, whose parameters replace the next line: where this
-- subject's keys and arguments start in KEYS and ARGV (offsets), how many
-- arguments it has, and a reading of Redis' clock (nil: read it here).
local K, A, NA, NOW = 0, 0, #ARGV, nil -- @FRAME@
local hkey = KEYS[K + 1]

local now
if NOW ~= nil then
  now = NOW
elseif ARGV[A + 1] ~= '' then
  now = tonumber(ARGV[A + 1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local now_ms = floor_of(now / 1000)
local mode = sub(ARGV[A + 2], 1, 1)
local topup = mode == 't'
if topup then mode = 'd' end
-- A settlement is a refund of the negated differences (see ARGV[2]).
local settle = mode == 's'
if settle then mode = 'r' end
local ttl = tonumber(ARGV[A + 3])
local bannable = ARGV[A + 4] == '1'
local after = tonumber(ARGV[A + 5])

-- 'b': the common case, a decision for one request whose rules are all
-- token buckets, none in shadow mode (the gateway sends 'b' for 'd' then).
-- The same reads, the same answer and the same writes as the general
-- steps below, with less bookkeeping. A subject that is banned or refused
-- goes on to the general steps (nothing is written here before that).
if mode == 'b' then
  mode = 'd'
  local n = (NA - 12) / 6
  local f = {}
  for i = 1, n do f[i] = ARGV[A + 7 + 6 * i] end
  f[n + 1], f[n + 2], f[n + 3] = '#vs', '#bu', '#bs'
  f[n + 4] = '#x'
  local cur = hmget(hkey, f)
  local bu = tonumber(cur[n + 2]) or 0
  if not (bannable and bu > now_ms) then
    local out = {0, 0, 0, 0, 1}
    local args = {}
    local pass = true
    for i = 1, n do
      local base = A + 6 + 6 * i
      local T = tonumber(ARGV[base + 3])
      local cap = T * tonumber(ARGV[base + 4])
      local tat = tonumber(cur[i]) or now
      if tat < now then tat = now end
      tat = tat + T * tonumber(ARGV[base + 5])
      if tat - now > cap then
        pass = false
        break
      end
      out[3 * i + 3], out[3 * i + 4], out[3 * i + 5] = 0, cap - (tat - now), tat - now
      args[2 * i - 1], args[2 * i] = f[i], tat
    end
    if pass then
      local keep = now_ms + ttl
      local kept = tonumber(cur[n + 4]) or 0
      if kept > keep then keep = kept end
      local memory = tonumber(ARGV[A + 10])
      if cur[n + 3] and bu + memory > keep then keep = bu + memory end
      local vs = tonumber(cur[n + 1])
      if vs ~= nil and bannable and after > 0 then
        local window_end = vs + tonumber(ARGV[A + 6])
        if window_end > keep then keep = window_end end
      end
      args[2 * n + 1], args[2 * n + 2] = '#x', keep
      hset(hkey, args)
      pexpire(hkey, keep - now_ms)
      return out
    end
  end
end

-- One read of the subject's hash: every rule's field, the violation
-- window, and the ban.
local lease = ARGV[A + 11]
local n = (NA - 12) / 6
local fields = {}
for i = 1, n do fields[i] = ARGV[A + 12 + (i - 1) * 6 + 1] end
fields[n + 1] = '#vs'
fields[n + 2] = '#vc'
fields[n + 3] = '#bu'
fields[n + 4] = '#bs'
fields[n + 5] = '#x'
local cur = hmget(hkey, fields)

-- keep: the time (ms) the hash must live until. At least as long as it was
-- to live, this call's idle TTL, and the end of ban memory while strikes
-- are remembered; each write below may raise it, never lower it.
local keep = now_ms + ttl
local kept = tonumber(cur[n + 5]) or 0
if kept > keep then keep = kept end
local memory = tonumber(ARGV[A + 10])
local ban_until = tonumber(cur[n + 3]) or 0
local strikes = 0
if cur[n + 4] and ban_until + memory > now_ms then
  strikes = tonumber(cur[n + 4]) or 0
  if ban_until + memory > keep then keep = ban_until + memory end
end
if bannable and mode == 'd' and ban_until > now_ms then
  return {2, ban_until - now_ms, strikes, ban_until, 0}
end
local now_s = floor_of(now / 1000000)

-- The requests this call is for (see ARGV[12]). A lease takes at most half
-- of what each rule has left; shadow rules and concurrency caps are never
-- leased (the node does not ask), and grant 1 if asked.
local units = tonumber(ARGV[A + 12])
if mode == 'd' and (units > 1 or topup) then
  for i = 1, n do
    local base = 12 + (i - 1) * 6
    local kind = ARGV[A + base + 2]
    local b = tonumber(ARGV[A + base + 4])
    local cost = tonumber(ARGV[A + base + 5])
    local fits = 1
    if ARGV[A + base + 6] == '1' or cost < 1 then
      fits = 1
    elseif kind == 'r' then
      local T = tonumber(ARGV[A + base + 3])
      local tat = tonumber(cur[i]) or now
      if tat < now then tat = now end
      fits = floor_of((T * b - (tat - now)) / (T * cost))
    elseif kind == 'q' then
      local start = period_bounds(ARGV[A + base + 3], now_s)
      local count = 0
      local ps, pc = string.match(cur[i] or '', '^(%d+):(%d+)$')
      if ps ~= nil and tonumber(ps) == start then count = tonumber(pc) end
      fits = floor_of((b - count) / cost)
    end
    local share = floor_of(fits / 2)
    if share < units then units = share end
  end
  if topup and units < 1 then
    -- Nothing to spare: read, charge nothing, grant nothing.
    units = 0
    mode = 'p'
  elseif units < 1 then
    units = 1
  end
elseif mode ~= 'r' then
  units = 1
end

local out = {0, 0, 0, 0, units}
local o = 5
local vals = {}
local lease_keys = {}
local refused = nil
local next_key = 1
for i = 1, n do
  local base = 12 + (i - 1) * 6
  local kind = ARGV[A + base + 2]
  local b = tonumber(ARGV[A + base + 4])
  local cost = tonumber(ARGV[A + base + 5]) * units
  if mode == 'p' then cost = 0 end
  local shadow = ARGV[A + base + 6] == '1'
  local pass = false
  local room, wait
  if kind == 'r' then
    local T = tonumber(ARGV[A + base + 3])
    local cap = T * b
    cost = T * cost
    local tat = tonumber(cur[i]) or now
    if tat < now then tat = now end
    if mode == 'r' then
      if settle then cost = -cost end
      tat = tat - cost
      if tat < now then tat = now end
      pass = true
      -- A debt is kept until it is paid.
      local paid_ms = floor_of(tat / 1000) + 1
      if settle and paid_ms > keep then keep = paid_ms end
    elseif tat + cost - now <= cap then
      tat = tat + cost
      pass = true
    end
    if pass then
      room, wait = cap - (tat - now), tat - now
    else
      room, wait = cap - (tat - now), tat + cost - cap - now
    end
    vals[i] = tat
  elseif kind == 'q' then
    local start, stop = period_bounds(ARGV[A + base + 3], now_s)
    local count = 0
    local ps, pc = string.match(cur[i] or '', '^(%d+):(%d+)$')
    if ps ~= nil and tonumber(ps) == start then count = tonumber(pc) end
    if mode == 'r' then
      if settle then cost = -cost end
      count = count - cost
      if count < 0 then count = 0 end
      pass = true
    elseif count + cost <= b then
      count = count + cost
      pass = true
    end
    room, wait = b - count, stop * 1000000 - now
    vals[i] = string.format('%.0f:%.0f', start, count)
    -- The counter lives at least until its period ends.
    if stop * 1000 > keep then keep = stop * 1000 end
  else
    next_key = next_key + 1
    local key = KEYS[K + next_key]
    lease_keys[i] = key
    local count = redis.call('ZCOUNT', key, '(' .. string.format('%.0f', now), '+inf')
    if mode == 'r' then
      local expiry = tonumber(redis.call('ZSCORE', key, lease))
      if expiry ~= nil then
        redis.call('ZREM', key, lease)
        if expiry > now then count = count - 1 end
      end
      pass = true
    elseif count + cost <= b then
      count = count + cost
      pass = true
    end
    room, wait = b - count, 0
    if not pass then wait = 1000000 end
  end
  local state = 0
  if not pass then
    if shadow then state = 2 else state = 1 end
    if state == 1 and refused == nil then refused = fields[i] end
  end
  out[o + 1], out[o + 2], out[o + 3] = state, room, wait
  o = o + 3
end

if mode == 'p' then return out end

if refused == nil and mode == 'd' then
  -- Charge every rule that passed (a shadow rule that would refuse is
  -- left as a real refusal would leave it).
  local args = {}
  for i = 1, n do
    if out[5 + (i - 1) * 3 + 1] == 0 then
      local key = lease_keys[i]
      if key ~= nil then
        local ms = tonumber(ARGV[A + 12 + (i - 1) * 6 + 3])
        redis.call('ZREMRANGEBYSCORE', key, '-inf', string.format('%.0f', now))
        redis.call('ZADD', key, string.format('%.0f', now + ms * 1000), lease)
        redis.call('PEXPIRE', key, ms)
      else
        args[#args + 1] = fields[i]
        args[#args + 1] = vals[i]
      end
    end
  end
  if #args > 0 then
    -- Never cut short an open violation window.
    local vs = tonumber(cur[n + 1])
    if vs ~= nil and bannable and after > 0 then
      local window_end = vs + tonumber(ARGV[A + 6])
      if window_end > keep then keep = window_end end
    end
    args[#args + 1] = '#x'
    args[#args + 1] = keep
    hset(hkey, args)
    pexpire(hkey, keep - now_ms)
  end
  return out
end

if mode == 'r' then
  local args = {}
  for i = 1, n do
    if lease_keys[i] == nil then
      args[#args + 1] = fields[i]
      args[#args + 1] = vals[i]
    end
  end
  if #args > 0 then
    args[#args + 1] = '#x'
    args[#args + 1] = keep
    hset(hkey, args)
    pexpire(hkey, keep - now_ms)
  end
  if settle then return out end
  refused = sub(ARGV[A + 2], 3)
end

-- A refusal: charge nothing, count a violation, maybe escalate.
out[1] = 1
if not bannable or after <= 0 then
  return out
end
local within = tonumber(ARGV[A + 6])
local vs = tonumber(cur[n + 1])
local vc = tonumber(cur[n + 2]) or 0
if vs == nil or now_ms - vs >= within then
  vs = now_ms
  vc = 0
end
vc = vc + 1
if vc < after then
  if vs + within > keep then keep = vs + within end
  hset(hkey, {'#vs', vs, '#vc', vc, '#x', keep})
  pexpire(hkey, keep - now_ms)
  return out
end

strikes = strikes + 1
local dur = tonumber(ARGV[A + 7]) * (tonumber(ARGV[A + 8]) ^ (strikes - 1))
local max = tonumber(ARGV[A + 9])
if dur > max then dur = max end
dur = floor_of(dur)
ban_until = now_ms + dur
if ban_until + memory > keep then keep = ban_until + memory end
hset(hkey, {'#bu', ban_until, '#bs', strikes, '#x', keep})
hdel(hkey, {'#vs', '#vc'})
pexpire(hkey, keep - now_ms)
out[1] = 3
out[2] = dur
out[3] = strikes
out[4] = ban_until
return out
