-- Store one message and announce it, atomically, on the master.
-- KEYS[1] room stream. ARGV: maxlen, ttl, channel, nick, text, ts, node, body.
-- Returns {id, prev}. The PUBLISH payload is "<id>\n<prev>\n<body JSON>".
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local prev = ''
if last[1] then prev = last[1][1] end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*',
  'nick', ARGV[4], 'text', ARGV[5], 'ts', ARGV[6], 'node', ARGV[7], 'prev', prev)
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('PUBLISH', ARGV[3], id .. '\n' .. prev .. '\n' .. ARGV[8])
return {id, prev}
