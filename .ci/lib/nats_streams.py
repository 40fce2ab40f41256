# Lists the JetStream streams (KV buckets included) of the NATS server on 127.0.0.1:4222 whose
# name contains argv[1], over the plain NATS protocol (no client library needed).
import socket, json, sys
s=socket.create_connection(("127.0.0.1",4222)); f=s.makefile('rb')
f.readline()
s.sendall(b'CONNECT {"verbose":false}\r\nSUB _INBOX.x 1\r\n')
names=[]; offset=0
while True:
    body=json.dumps({"offset":offset}).encode()
    s.sendall(b'PUB $JS.API.STREAM.NAMES _INBOX.x %d\r\n%s\r\nPING\r\n'%(len(body),body))
    while True:
        line=f.readline()
        if line.startswith(b'MSG'):
            n=int(line.split()[-1]); data=f.read(n+2)[:-2]; break
    r=json.loads(data); names+= r.get("streams") or []
    offset+=r.get("limit",1024)
    if offset>=r.get("total",0): break
print("\n".join(n for n in names if len(sys.argv)<2 or sys.argv[1] in n))
