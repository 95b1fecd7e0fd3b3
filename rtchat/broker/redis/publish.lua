-- Store one message and announce it, atomically, on the master.
-- KEYS[1] room stream; KEYS[2], when given, the send's idempotency key.
-- ARGV: maxlen, ttl, channel, nick, text, ts, node, body, digest, dedup_seconds, user,
-- publish command (PUBLISH; SPUBLISH in a Redis Cluster, where the channel shares KEYS[1]'s slot).
-- Returns {id, prev, state, ts, node}: state 0 stored now, 1 a duplicate of the key's
-- first message (nothing stored or announced), 2 the key was used for other content.
-- The payload is "<id>\n<prev>\n<body JSON>".
if KEYS[2] then
  local seen = redis.call('HMGET', KEYS[2], 'id', 'prev', 'digest', 'ts', 'node')
  if seen[1] then
    if seen[3] ~= ARGV[9] then return {'', '', 2, '', ''} end
    return {seen[1], seen[2], 1, seen[4], seen[5]}
  end
end
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local prev = ''
if last[1] then prev = last[1][1] end
local fields = {'nick', ARGV[4], 'text', ARGV[5], 'ts', ARGV[6], 'node', ARGV[7], 'prev', prev}
if ARGV[11] ~= '' then  -- a verified speaker's id; anonymous entries stay as they were
  table.insert(fields, 'user')
  table.insert(fields, ARGV[11])
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(fields))
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call(ARGV[12], ARGV[3], id .. '\n' .. prev .. '\n' .. ARGV[8])
if KEYS[2] then
  -- The window runs from this first answer, not from the last retry.
  redis.call('HSET', KEYS[2], 'id', id, 'prev', prev, 'digest', ARGV[9], 'ts', ARGV[6],
    'node', ARGV[7])
  redis.call('EXPIRE', KEYS[2], ARGV[10])
end
return {id, prev, 0, ARGV[6], ARGV[7]}
