# An independent stdlib-only WebSocket client (no chatstream or squall code): pipelines N sends
# from one user, checks the acks come back in send order with dense seqs, and that the peer
# gets every message live in seq order. Usage: ext-ws-probe.py <token-a> <token-b>
# (both members of conversation $CONV, default ext-c1; node at $HOST:$PORT, default
# 127.0.0.1:31900; N=90 stays under the default rate limit burst of 100).
import socket, base64, os, json, struct, sys, time
HOST = os.environ.get("HOST", "127.0.0.1"); PORT = int(os.environ.get("PORT", "31900"))
CONV = os.environ.get("CONV", "ext-c1")
def connect(token):
    s = socket.create_connection((HOST, PORT)); key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET /ws?token={token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    buf = b""
    while b"\r\n\r\n" not in buf: buf += s.recv(4096)
    head, rest = buf.split(b"\r\n\r\n", 1); assert b" 101 " in head.split(b"\r\n")[0], head
    return [s, rest]
def send(c, text):
    p = text.encode(); m = os.urandom(4); n = len(p)
    h = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n))
    c[0].sendall(h + m + bytes(b ^ m[i % 4] for i, b in enumerate(p)))
def frame(c):
    while True:
        b = c[1]
        if len(b) >= 2:
            n = b[1] & 0x7f; off = 2
            if n == 126: n = struct.unpack(">H", b[2:4])[0]; off = 4
            elif n == 127: n = struct.unpack(">Q", b[2:10])[0]; off = 10
            if len(b) >= off + n:
                op = b[0] & 0x0f; c[1] = b[off + n:]
                if op == 1: return json.loads(b[off:off + n])
                continue
        d = c[0].recv(65536)
        if not d: raise SystemExit("closed")
        c[1] += d
ta, tb, N = sys.argv[1], sys.argv[2], 90
a, b = connect(ta), connect(tb)
assert frame(a)["type"] == "hello" and frame(b)["type"] == "hello"
run = str(time.time_ns())
for i in range(N):
    send(a, json.dumps({"v": 1, "type": "send", "conversation_id": CONV, "client_msg_id": f"{run}-{i}", "body": f"m{i}"}))
acks = []
while len(acks) < N:
    f = frame(a)
    if f["type"] == "ack": acks.append(f)
    elif f["type"] == "error": raise SystemExit(f"error {f}")
ids = [int(x["client_msg_id"].split("-")[1]) for x in acks]; seqs = [x["seq"] for x in acks]
assert ids == list(range(N)), "acks out of send order"
assert seqs == list(range(seqs[0], seqs[0] + N)), "seqs not dense"
live = []
while len(live) < N:
    f = frame(b)
    if f["type"] == "msg" and f["client_msg_id"].startswith(run): live.append(f["seq"])
assert live == seqs, "live order differs from ack order"
print(f"ok: {N} pipelined sends acked in order, seqs {seqs[0]}..{seqs[-1]} dense, peer got all {N} live in seq order")
