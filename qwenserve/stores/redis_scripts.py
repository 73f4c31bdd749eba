"""The Lua scripts of the Redis store. Each runs atomically on the server, so a check and the write it
guards cannot be separated by another replica's write, and every key a script creates or extends gets
its expiry in the same step (no key can outlive its session).

Keys of one session (KEYS order where a script takes them all): record hash, events stream, lease,
readers sorted set; then the index of running sessions. Event index i is stream entry `<i+1>-1`; the end
of a session is written as entry `<count+1>-0`, which sorts after the last event, so that a reader
blocked in XREAD wakes up for it. Times come from the Redis server (TIME), never from a replica's clock.
"""

NOW = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function ttl_of(kind, chat_ttl, response_ttl)
  if kind == 'response' then return response_ttl end
  return chat_ttl
end
"""

# KEYS: record, lease, running index. ARGV: id, hash, request, created, kind, background, owner, lease ms,
# running ttl ms, index ttl ms. Returns 0 when the id exists (another replica made it first).
CREATE = NOW + """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'hash', ARGV[2], 'req', ARGV[3], 'created', ARGV[4], 'state', 'running',
           'count', 0, 'kind', ARGV[5], 'bg', ARGV[6], 'epoch', 1, 'control', '')
redis.call('PEXPIRE', KEYS[1], ARGV[9])
redis.call('SET', KEYS[2], ARGV[7] .. ':1', 'NX', 'PX', ARGV[8])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
redis.call('PEXPIRE', KEYS[3], ARGV[10])
return 1
"""

# The fence. KEYS: record, events. ARGV: epoch, first index, chat ttl ms, response ttl ms, then
# (data, token ids, event name) per event. Refuses a stale epoch (another replica took over) and an
# index that is not the next one; XADD with our ids would refuse a second write of an index anyway.
APPEND = NOW + """
local st = redis.call('HMGET', KEYS[1], 'epoch', 'count', 'control', 'kind')
if not st[1] then return {'gone'} end
if st[1] ~= ARGV[1] then return {'fenced'} end
if st[2] ~= ARGV[2] then return {'index'} end
local i = tonumber(ARGV[2])
for j = 5, #ARGV, 3 do
  if ARGV[j + 2] == '' then
    redis.call('XADD', KEYS[2], (i + 1) .. '-1', 'd', ARGV[j], 't', ARGV[j + 1])
  else
    redis.call('XADD', KEYS[2], (i + 1) .. '-1', 'd', ARGV[j], 't', ARGV[j + 1], 'e', ARGV[j + 2])
  end
  i = i + 1
end
redis.call('HSET', KEYS[1], 'count', i)
local ttl = ttl_of(st[4], ARGV[3], ARGV[4])
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
return {'ok', st[3]}
"""

# KEYS: record, events, lease, readers, running index. ARGV: epoch, state, chat ttl ms, response ttl ms,
# id. The end marker wakes blocked readers; the finished session's keys now expire after its TTL.
FINISH = NOW + """
local st = redis.call('HMGET', KEYS[1], 'epoch', 'count', 'kind')
if not st[1] then return 0 end
if st[1] ~= ARGV[1] then return -1 end
local now = now_ms()
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'finished', string.format('%.3f', now / 1000))
redis.call('XADD', KEYS[2], (tonumber(st[2]) + 1) .. '-0', 'end', ARGV[2])
local ttl = ttl_of(st[3], ARGV[3], ARGV[4])
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
redis.call('PEXPIRE', KEYS[4], ttl)
redis.call('DEL', KEYS[3])
redis.call('ZREM', KEYS[5], ARGV[5])
return 1
"""

# Takeover of a running session whose lease expired or was released. KEYS: record, events, lease, readers,
# running index. ARGV: id, owner, lease ms, chat ttl ms, response ttl ms. Returns the new epoch, or 0.
TAKE = NOW + """
local st = redis.call('HMGET', KEYS[1], 'state', 'control', 'kind')
if st[1] ~= 'running' then
  redis.call('ZREM', KEYS[5], ARGV[1])
  return 0
end
if st[2] == 'delete' and redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[4])
  redis.call('ZREM', KEYS[5], ARGV[1])
  return 0
end
local epoch = tonumber(redis.call('HGET', KEYS[1], 'epoch')) + 1
if not redis.call('SET', KEYS[3], ARGV[2] .. ':' .. epoch, 'NX', 'PX', ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], 'epoch', epoch)
local ttl = ttl_of(st[3], ARGV[4], ARGV[5])
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
return epoch
"""

# A producer's heartbeat: renew its lease (fenced), extend its keys, and learn what others asked and
# how many readers are connected anywhere. KEYS: record, events, lease, readers, running index. ARGV:
# epoch, owner, lease ms, chat ttl ms, response ttl ms, index ttl ms. Readers past their deadline (their
# replica died) are dropped; `idle` is how long the session has had no reader, in ms (-1: it has some).
PROBE = NOW + """
local st = redis.call('HMGET', KEYS[1], 'epoch', 'control', 'idle', 'kind')
if not st[1] then return {'gone'} end
if st[1] ~= ARGV[1] then return {'fenced'} end
redis.call('SET', KEYS[3], ARGV[2] .. ':' .. ARGV[1], 'PX', ARGV[3])
local ttl = ttl_of(st[4], ARGV[4], ARGV[5])
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
redis.call('PEXPIRE', KEYS[4], ttl)
redis.call('PEXPIRE', KEYS[5], ARGV[6])
local now = now_ms()
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
local readers = redis.call('ZCARD', KEYS[4])
local idle = -1
if readers == 0 then
  if st[3] then
    idle = now - tonumber(st[3])
  else
    redis.call('HSET', KEYS[1], 'idle', now)
    idle = 0
  end
end
return {'ok', st[2], readers, idle}
"""

# Readers, counted across replicas: one member per connected reader, scored with a deadline that its
# replica keeps pushing forward. KEYS: readers, record. The readers key expires with the record.
JOIN = NOW + """
local pttl = redis.call('PTTL', KEYS[2])
if pttl <= 0 then return 0 end
local deadline = now_ms() + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], deadline, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], pttl)
redis.call('HDEL', KEYS[2], 'idle')
return 1
"""

# KEYS: readers, record. ARGV: member. When the last live reader anywhere leaves, the grace starts now.
LEAVE = NOW + """
redis.call('ZREM', KEYS[1], ARGV[1])
local now = now_ms()
if redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf') == 0 and redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('HSET', KEYS[2], 'idle', now)
end
return 1
"""

COUNT = NOW + """
return redis.call('ZCOUNT', KEYS[1], '(' .. now_ms(), '+inf')
"""

# A cancel or delete asked on any replica. KEYS: record, events, lease, readers, running index. ARGV: what,
# id. A delete of a session nobody produces (ended, or its producer died) drops it at once; otherwise the
# producer sees the request at its next append or heartbeat.
CONTROL = NOW + """
local st = redis.call('HMGET', KEYS[1], 'state', 'control')
if not st[1] then return 'gone' end
if ARGV[1] == 'delete' and (st[1] ~= 'running' or redis.call('EXISTS', KEYS[3]) == 0) then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
  redis.call('ZREM', KEYS[5], ARGV[2])
  return 'deleted'
end
if st[1] ~= 'running' then return st[1] end
if st[2] ~= 'delete' then redis.call('HSET', KEYS[1], 'control', ARGV[1]) end
return 'running'
"""

# A graceful handover: drop our lease (if still ours) and tell the other replicas to look now.
# KEYS: lease, handover stream. ARGV: lease value, id, stream ttl ms.
RELEASE = NOW + """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', 1000, '*', 'id', ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return 1
"""
