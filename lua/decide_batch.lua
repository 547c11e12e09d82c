-- decide_batch.lua: several subjects' decisions in one atomic call.
--
-- The gateway coalesces the decisions that arrive together on one worker
-- into one call, so Redis pays the per-call cost (command parsing, script
-- lookup, the Lua call, TIME) once per batch instead of once per request.
-- Each subject is decided exactly as decide.lua decides it alone: the
-- gateway assembles this script from both texts when it starts. What
-- decide.lua has above its BODY marker (helper functions) goes at the
-- PRELUDE marker below, once per call; the rest, without its FRAME line,
-- becomes the body of decide_one (at the DECIDE marker), whose parameters are that frame: where the
-- subject's keys and arguments start in KEYS and ARGV, how many arguments it
-- has, and this call's one reading of Redis' clock. Arguments are read in
-- place, never copied. Subjects are decided in order, on that one reading,
-- atomically as a whole.
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
--
-- A subject that comes back within one batch (a hot client or API key
-- under load) is read from Redis once: decide_one's commands on state
-- hashes go through a batch-local copy, and the hashes it changed are
-- written back once at the end. Every read of a hash sees every earlier
-- write of the batch, as it would with the commands run one by one, and
-- nothing outside this script can run in between, so the replies and the
-- final state are those of the same decisions made one after another,
-- with one HMGET, HSET (and HDEL) and PEXPIRE per distinct subject instead
-- of per decision. Lease sets (sorted sets) are not copied: their commands
-- go to Redis directly.

local n_subjects = tonumber(ARGV[1])
-- key -> {v = field -> value (false: absent), d = changed fields (in
-- order), seen = field -> true once changed, ttl = last PEXPIRE or nil}
local state = {}
local order = {}
local function hash_of(key)
  local h = state[key]
  if h == nil then
    h = {v = {}, d = {}, seen = {}, ttl = nil}
    state[key] = h
    order[#order + 1] = key
  end
  return h
end
local function change(h, f, value)
  h.v[f] = value
  if not h.seen[f] then
    h.seen[f] = true
    h.d[#h.d + 1] = f
  end
end
-- The state hashes worth a copy: those of subjects that come more than
-- once in this batch. A subject that comes once is decided on Redis
-- directly (the copy would only add work); every other key passes through.
local is_state = {}
do
  local count = {}
  local k, a = 0, 1
  for _ = 1, n_subjects do
    local key = KEYS[k + 1]
    local c = (count[key] or 0) + 1
    count[key] = c
    if c == 2 then is_state[key] = true end
    k = k + tonumber(ARGV[a + 1])
    a = a + 2 + tonumber(ARGV[a + 2])
  end
end
-- @PRELUDE@

-- decide.lua's commands on a state hash (hmget, hset, hdel, pexpire, from
-- its helpers above), on Redis itself or, for a repeated subject, on the
-- batch's copy.
local direct_hmget, direct_hset, direct_hdel, direct_pexpire = hmget, hset, hdel, pexpire
local function copy_hmget(key, fields)
  local v = hash_of(key).v
  local missing = nil
  for i = 1, #fields do
    if v[fields[i]] == nil then
      if missing == nil then missing = {} end
      missing[#missing + 1] = fields[i]
    end
  end
  if missing ~= nil then
    local got = redis.call('HMGET', key, unpack(missing))
    for i = 1, #missing do v[missing[i]] = got[i] end
  end
  local out = {}
  for i = 1, #fields do out[i] = v[fields[i]] end
  return out
end
local function copy_hset(key, args)
  local h = hash_of(key)
  for i = 1, #args, 2 do change(h, args[i], args[i + 1]) end
  return 0
end
local function copy_hdel(key, fields)
  local h = hash_of(key)
  for i = 1, #fields do change(h, fields[i], false) end
  return 0
end
local function copy_pexpire(key, ms)
  hash_of(key).ttl = ms
  return 1
end

local function decide_one(K, A, NA, NOW)
-- @DECIDE@
end

local clock = nil
local out = {}
local k, a = 0, 1
for s = 1, n_subjects do
  local nk, na = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  if is_state[KEYS[k + 1]] then
    hmget, hset, hdel, pexpire = copy_hmget, copy_hset, copy_hdel, copy_pexpire
  else
    hmget, hset, hdel, pexpire = direct_hmget, direct_hset, direct_hdel, direct_pexpire
  end
  local now = nil
  if ARGV[a + 3] == '' then
    if clock == nil then
      local t = redis.call('TIME')
      clock = tonumber(t[1]) * 1000000 + tonumber(t[2])
    end
    now = clock
  end
  out[s] = decide_one(k, a + 2, na, now)
  k = k + nk
  a = a + 2 + na
end

-- Write back what changed, hash by hash: deletions, then the fields set,
-- then the last expiry asked for (the key exists by then if any field
-- does, as it did when decide_one asked).
for _, key in ipairs(order) do
  local h = state[key]
  local set, del = {}, {}
  for _, f in ipairs(h.d) do
    local value = h.v[f]
    if value == false then
      del[#del + 1] = f
    else
      set[#set + 1] = f
      set[#set + 1] = value
    end
  end
  if #del > 0 then redis.call('HDEL', key, unpack(del)) end
  if #set > 0 then redis.call('HSET', key, unpack(set)) end
  if h.ttl ~= nil then redis.call('PEXPIRE', key, h.ttl) end
end
return out
