-- No ARGV. Read only: {epoch or '', waiting, expired, {addr, n, ...}} for status and tests.
return {redis.call('HGET', P .. 'meta', 'epoch') or '', redis.call('ZCARD', P .. 'queue'),
  tonumber(redis.call('HGET', P .. 'meta', 'expired') or '0'), redis.call('HGETALL', P .. 'inflight')}
