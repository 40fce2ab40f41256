#!/usr/bin/env python3
"""The least Redis CPU one task's life can cost on this machine, whatever the client.

Starts a private redis-server on a free port (no persistence), sends it the Redis work of N
tasks' lives with `redis-cli --pipe` (one connection, everything pipelined: the cheapest a client
can make it), and prints the server's CPU time per task, read from /proc/<pid>/stat. The work is a
stripped-down version of what agent-orchestra's Redis backend does, kept only to the part the
issue's layout requires: one lab-compatible HASH per task (the same 15 fields `bench` leaves),
a ready set, the PENDING index, the lease index and the COMPLETED index. Left out, so the figures
are a floor: message bodies, in-flight entries and delivery counts (redelivery, dead letters),
TIME, events, the check that an id is new, stale-receipt checks, lease expiry.

Variants:
  plain    the commands alone, no script (not atomic: no compare-and-set is possible)
  lua B    three scripts as the backend has them (submit 500 at a time, claim and record B at a
           time: -c 16 gives B of about 8), each task claimed and completed under a
           compare-and-set on its status

Usage: python3 docs/perf/redis_floor.py [N] [runs]    (defaults 20000 and 3)
"""
import hashlib
import os
import socket
import subprocess
import sys
import tempfile
import time

ISO = '2026-12-03T19:14:34.286569815+00:00'
T0 = 1764789274286569

SUBMIT = '''
local z = {}
for i = 1, #ARGV, 4 do
  local id = ARGV[i]
  redis.call('HSET', 'floor:t:' .. id, 'task_id', id, 'queue', 'bench', 'payload', ARGV[i + 1],
    'priority', '5', 'max_attempts', '3', 'created_at', ARGV[i + 2], 'status', 'PENDING',
    'attempt', '0', 'updated_at', ARGV[i + 2])
  z[#z + 1] = ARGV[i + 3]; z[#z + 1] = id
end
redis.call('ZADD', KEYS[1], unpack(z))
redis.call('ZADD', KEYS[2], unpack(z))
return #z
'''
CLAIM = '''
local ids = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
if #ids == 0 then return {} end
redis.call('ZREM', KEYS[1], unpack(ids))
local out, l, gone = {}, {}, {}
for i = 1, #ids do
  local key = 'floor:t:' .. ids[i]
  local all = redis.call('HGETALL', key)
  local status
  for j = 1, #all, 2 do if all[j] == 'status' then status = all[j + 1] end end
  if status == 'PENDING' then
    redis.call('HSET', key, 'status', 'RUNNING', 'attempt', '1', 'worker_id', ARGV[2],
      'lease_until', ARGV[3], 'heartbeat_at', ARGV[3], 'started_at', ARGV[3], 'updated_at', ARGV[3])
    out[#out + 1] = all
    l[#l + 1] = ARGV[4]; l[#l + 1] = ids[i]; gone[#gone + 1] = ids[i]
  end
end
if #gone > 0 then
  redis.call('ZREM', KEYS[2], unpack(gone))
  redis.call('ZADD', KEYS[3], unpack(l))
end
return out
'''
RECORD = '''
local c, ids = {}, {}
for i = 3, #ARGV do
  local key = 'floor:t:' .. ARGV[i]
  local cur = redis.call('HMGET', key, 'status', 'attempt')
  if cur[1] == 'RUNNING' and cur[2] == '1' then
    redis.call('HSET', key, 'status', 'COMPLETED', 'result', 'null', 'result_json', 'null',
      'finished_at', ARGV[1], 'updated_at', ARGV[1])
    redis.call('HDEL', key, 'lease_until')
    ids[#ids + 1] = ARGV[i]; c[#c + 1] = ARGV[2]; c[#c + 1] = ARGV[i]
  end
end
if #ids > 0 then
  redis.call('ZREM', KEYS[1], unpack(ids))
  redis.call('ZADD', KEYS[2], unpack(c))
end
return #ids
'''


def resp(*args):
    out = [b'*%d\r\n' % len(args)]
    for a in args:
        a = str(a).encode()
        out.append(b'$%d\r\n%s\r\n' % (len(a), a))
    return b''.join(out)


def ids(n):
    return ['task_%032x' % i for i in range(n)]


def plain(n):
    out = []
    t = ids(n)
    for i in range(n):
        out.append(resp('HSET', 'floor:t:' + t[i], 'task_id', t[i], 'queue', 'bench', 'payload',
                        '{"t":%d}' % i, 'priority', '5', 'max_attempts', '3', 'created_at', ISO,
                        'status', 'PENDING', 'attempt', '0', 'updated_at', ISO))
        out.append(resp('ZADD', 'floor:pending', T0 + i, t[i]))
        out.append(resp('ZADD', 'floor:ready', T0 + i, t[i]))
    for i in range(n):
        key = 'floor:t:' + t[i]
        out.append(resp('ZRANGE', 'floor:ready', 0, 0))
        out.append(resp('ZREM', 'floor:ready', t[i]))
        out.append(resp('HGETALL', key))
        out.append(resp('HSET', key, 'status', 'RUNNING', 'attempt', '1', 'worker_id', 'w1',
                        'lease_until', ISO, 'heartbeat_at', ISO, 'started_at', ISO,
                        'updated_at', ISO))
        out.append(resp('ZREM', 'floor:pending', t[i]))
        out.append(resp('ZADD', 'floor:leases', T0 + i, t[i]))
        out.append(resp('HSET', key, 'status', 'COMPLETED', 'result', 'null', 'result_json',
                        'null', 'finished_at', ISO, 'updated_at', ISO))
        out.append(resp('HDEL', key, 'lease_until'))
        out.append(resp('ZREM', 'floor:leases', t[i]))
        out.append(resp('ZADD', 'floor:completed', T0 + i, t[i]))
    return b''.join(out)


def scripted(n, batch):
    sha = [hashlib.sha1(s.encode()).hexdigest() for s in (SUBMIT, CLAIM, RECORD)]
    out = [resp('SCRIPT', 'LOAD', s) for s in (SUBMIT, CLAIM, RECORD)]
    t = ids(n)
    for s in range(0, n, 500):
        args = []
        for i in range(s, min(n, s + 500)):
            args += [t[i], '{"t":%d}' % i, ISO, T0 + i]
        out.append(resp('EVALSHA', sha[0], 2, 'floor:pending', 'floor:ready', *args))
    for _ in range(0, n, batch):
        out.append(resp('EVALSHA', sha[1], 3, 'floor:ready', 'floor:pending', 'floor:leases',
                        batch, 'w1', ISO, T0))
    for s in range(0, n, batch):
        out.append(resp('EVALSHA', sha[2], 2, 'floor:leases', 'floor:completed', ISO, T0,
                        *t[s:s + batch]))
    return b''.join(out)


def cpu_ticks(pid):
    with open('/proc/%d/stat' % pid) as f:
        fields = f.read().rsplit(')', 1)[1].split()
    return int(fields[11]) + int(fields[12])


def free_port():
    s = socket.socket()
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
    s.close()
    return port


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    hz = os.sysconf('SC_CLK_TCK')
    port = free_port()
    workdir = tempfile.mkdtemp(prefix='redis-floor-')
    server = subprocess.Popen(['redis-server', '--port', str(port), '--bind', '127.0.0.1',
                               '--save', '', '--appendonly', 'no', '--dir', workdir],
                              stdout=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if subprocess.run(['redis-cli', '-p', str(port), 'ping'], capture_output=True).stdout:
                break
            time.sleep(0.05)
        variants = [('plain', plain(n))] + [('lua %d' % b, scripted(n, b)) for b in (1, 8, 16, 64)]
        for name, payload in variants:
            figures = []
            for _ in range(runs):
                # A private server: emptying it touches nobody else's keys.
                subprocess.run(['redis-cli', '-p', str(port), 'flushall'], capture_output=True)
                before = cpu_ticks(server.pid)
                r = subprocess.run(['redis-cli', '-p', str(port), '--pipe'], input=payload,
                                   capture_output=True)
                after = cpu_ticks(server.pid)
                if b'errors: 0' not in r.stdout:
                    sys.exit('%s: %s' % (name, r.stdout.decode()[-300:]))
                figures.append((after - before) / hz / n * 1e6)
            print('%-8s Redis CPU per task: %s µs' % (name, ' / '.join('%.0f' % f for f in figures)))
    finally:
        server.terminate()
        server.wait()


if __name__ == '__main__':
    main()
