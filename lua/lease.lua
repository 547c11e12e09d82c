-- lease.lua: renew or release one request's concurrency slots of one
-- subject.
--
-- A request allowed by a concurrency rule holds a lease in the rule's lease
-- set (lease id -> expiry in us, written by decide.lua). While the response
-- streams, the gateway renews it; when the response ends, it releases it.
-- A lease that was not renewed in time has expired: it is not renewed
-- again (its slot may already be someone else's).
--
-- KEYS[1..n] lease sets <prefix>{<subject>}:c:<rule>
-- ARGV[1]  now in microseconds, or '' for redis TIME (tests pin the clock)
-- ARGV[2]  'k' keep (renew) or 'x' release
-- ARGV[3]  the lease id
-- ARGV[4..] the lease length of each key's rule, ms
-- Returns how many of the sets still hold the lease (0 after a release).

local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local held = 0
for i, key in ipairs(KEYS) do
  if ARGV[2] == 'x' then
    redis.call('ZREM', key, ARGV[3])
  else
    local expiry = tonumber(redis.call('ZSCORE', key, ARGV[3]))
    if expiry ~= nil and expiry > now then
      local ms = tonumber(ARGV[3 + i])
      redis.call('ZADD', key, string.format('%.0f', now + ms * 1000), ARGV[3])
      redis.call('PEXPIRE', key, ms)
      held = held + 1
    end
  end
end
return held
