#!/usr/bin/env python3
"""Writes the committed seed corpus, fuzz/corpus/<target>/: a handful of valid (and a few
nearly valid) inputs per target, in each target's input layout (see its module doc)."""
import base64
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def frame(obj):
    body = json.dumps(obj, separators=(",", ":")).encode()
    return struct.pack(">I", len(body)) + body


def key(name):
    with open(os.path.join(HERE, "keys", name), "rb") as f:
        return f.read()


def write(target, name, data):
    folder = os.path.join(HERE, "corpus", target)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data)


def control_frames():
    # Selector byte: bit 6 picks proxy messages, the low 6 bits the chunk size - 1.
    write("control_frames", "agent-hello-ping", bytes([0x02])
          + frame({"type": "hello", "version": "0.1.0", "heartbeat_interval_ms": 5000})
          + frame({"type": "ping", "seq": 7, "held": ["proxy-0", "proxy-1"]})
          + frame({"type": "reconnect_ack"}))
    write("control_frames", "agent-ping-minimal", bytes([0x00]) + frame({"type": "ping", "seq": 0}))
    write("control_frames", "proxy-welcome-discovery", bytes([0x45])
          + frame({"type": "welcome", "proxy_id": "proxy-0", "heartbeat_interval_ms": 5000,
                   "missed_heartbeats": 3})
          + frame({"type": "discovery", "proxies": [{"id": "proxy-0", "generation": 2},
                                                    {"id": "proxy-1"}]}))
    write("control_frames", "proxy-pong-reconnect", bytes([0x7F])
          + frame({"type": "pong", "seq": 2**64 - 1})
          + frame({"type": "reconnect", "reason": "draining \u00e9"}))
    write("control_frames", "oversized-prefix", bytes([0x01]) + struct.pack(">I", 256 * 1024 + 1) + b"{}")


def join_messages():
    # Selector byte % 3: 0 the root reads, 1 the leaf reads, 2 a token's text.
    write("join_messages", "hello", b"\x00" + frame(
        {"type": "hello", "version": "0.1.0", "token_id": "abcdef", "nonce": "bm9uY2U"}))
    write("join_messages", "join", b"\x00" + frame(
        {"type": "join", "leaf_cluster": "leaf-1", "ca_keys": [key("ca-leaf.pub").decode().strip()],
         "proof": "cHJvb2Y"}))
    write("join_messages", "challenge", b"\x01" + frame(
        {"type": "challenge", "root_cluster": "root", "ca_keys": [key("ca-root.pub").decode().strip()],
         "nonce": "bm9uY2U", "proof": "cHJvb2Y"}))
    write("join_messages", "joined", b"\x01" + frame({"type": "joined"}))
    write("join_messages", "refused", b"\x01" + frame(
        {"type": "refused", "reason": "TokenExpired", "message": "expired"}))
    write("join_messages", "token", b"\x02 abcdef.0123456789abcdef\n")


def stream_credit():
    write("stream_credit", "credit", b"\x01\x00\x04\x00\x00")
    write("stream_credit", "dial-ok", b"\x02")
    write("stream_credit", "dial-failed", b"\x03\x02db:5432 refused")
    write("stream_credit", "dial-failed-other", b"\x03\xff\xc3\xa9")


def target_names():
    # Selector byte % 4, a big-endian port, then the text.
    write("target_names", "target", b"\x00\x00\x00db.prod.svc.leaf-1.tether:5432")
    write("target_names", "target-v6", b"\x00\x00\x00[fd00::1].leaf.tether:80")
    write("target_names", "from-name-apiserver", b"\x01\x01\xbb_APIServer.Leaf.tether.")
    write("target_names", "endpoint", b"\x02\x00\x16[::1]:22")
    write("target_names", "endpoint-wire", b"\x02\x00\x16@apiserver")
    write("target_names", "cluster", b"\x03\x00\x00leaf-1")
    # Found by the invariant: the bracketed label once parsed as a host named `_apiserver`.
    write("target_names", "regression-bracketed-apiserver", b"\x01\x00\x50[_apiserver].leaf.tether")
    write("target_names", "regression-bracketed-apiserver-endpoint", b"\x02\x00\x50[_apiserver]:80")


def allow_list():
    write("allow_list", "rules", b"10.0.0.0/8:80,443,8000-8100\n192.168.1.5:22\n[fd00::/8]:443\n"
          b"[::1]:22\ndb.internal.:5432\n*.svc.cluster.local:*")
    write("allow_list", "name", b"DB.Internal:1-65535")
    write("allow_list", "bad-numeric", b"0x7f.1:80")


def http_connect():
    cred = base64.b64encode(b"alice:alice-token-0123456789").decode()
    write("http_connect", "basic", (
        "CONNECT db.prod.leaf-1.tether:5432 HTTP/1.1\r\nHost: x\r\n"
        f"Proxy-Authorization: Basic {cred}\r\n\r\nleftover").encode())
    write("http_connect", "bearer", b"CONNECT [fd00::1].leaf.tether:443 HTTP/1.1\r\n"
          b"proxy-authorization: Bearer alice-token-0123456789\r\n\r\n")
    write("http_connect", "get", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    # Empty lines before the request line are allowed (RFC 9112 section 2.2).
    write("http_connect", "leading-newline", (
        "\nCONNECT _apiserver_b.prod.leaf-1.tether:5432 HTTP/1.1\r\nHost: x\r\n"
        f"Proxy-Authorization: Basic {cred}\r\n\r\nleftover").encode())
    write("http_connect", "no-auth", b"CONNECT _apiserver.leaf.tether:443 HTTP/1.1\r\n\r\n")


def socks_request(host, port, password=b"alice-token-0123456789", atyp=3):
    out = bytes([2, 0, 2]) + bytes([1, 5]) + b"alice" + bytes([len(password)]) + password
    out += bytes([5, 1, 0, atyp])
    out += {1: bytes(4), 3: bytes([len(host)]) + host, 4: bytes(16)}[atyp]
    return out + struct.pack(">H", port)


def socks5():
    # After the version byte the entry's sniffer already read.
    write("socks5", "connect", socks_request(b"db.prod.leaf-1.tether", 5432))
    write("socks5", "apiserver", socks_request(b"_apiserver.leaf.tether", 443))
    write("socks5", "ipv4", socks_request(b"", 80, atyp=1))
    write("socks5", "wrong-password", socks_request(b"db.leaf.tether", 80, password=b"alice-token-x"))
    write("socks5", "no-auth-offered", bytes([1, 0]))


def token_file():
    write("token_file", "file", b"# clients\n\nalice: alice-token-0123456789\nbob:bob-token-abcdefghijkl\r\n")
    write("token_file", "duplicate", b"a:tok-0123456789abcdef\na:tok-0123456789abcdef")


def trust_store():
    # Selector byte % 3: 0 CA key text, 1 certificate text, 2 certificate wire bytes.
    write("trust_store", "ca-keys", b"\x00# CAs\n" + key("ca-leaf.pub") + b"\n" + key("ca-root.pub"))
    for name in ["agent", "client", "host"]:
        text = key(f"{name}-cert.pub")
        write("trust_store", f"{name}-text", b"\x01" + text)
        write("trust_store", f"{name}-wire", b"\x02" + base64.b64decode(text.split()[1]))


def connect_answer():
    # A forward proxy's answers to the agent's CONNECT, as squid and tinyproxy write them.
    write("connect_answer", "established", b"HTTP/1.1 200 Connection established\r\n\r\n")
    write("connect_answer", "established-then-root", b"HTTP/1.0 200 OK\r\nProxy-Agent: t\r\n\r\nSSH-2.0-tether\r\n")
    write("connect_answer", "auth-required", b"HTTP/1.0 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"x\"\r\nContent-Length: 5\r\n\r\nno...")
    write("connect_answer", "forbidden-page", b"HTTP/1.1 403 Access violation\r\nContent-Type: text/html\r\nConnection: close\r\n\r\n<html><title>403</title><p>The CONNECT method not allowed</p></html>\n")
    write("connect_answer", "ssh-greeting", b"SSH-2.0-tether\r\n")


def websocket_frames():
    # Selector byte: even reads the bytes as frames (as server and as client), odd has a client
    # write them in pieces of (byte >> 1) bytes for a server to read back.
    masked = bytes(a ^ b for a, b in zip(b"hello", [1, 2, 3, 4, 1]))
    write("websocket_frames", "masked-binary", bytes([0, 0x82, 0x85, 1, 2, 3, 4]) + masked)
    write("websocket_frames", "unmasked-binary-16bit", bytes([0, 0x82, 126, 0, 3]) + b"abc")
    write("websocket_frames", "ping-then-data", bytes([0, 0x89, 0x80, 0, 0, 0, 0, 0x82, 0x81, 0, 0, 0, 0]) + b"x")
    write("websocket_frames", "close", bytes([0, 0x88, 0x80, 0, 0, 0, 0]))
    write("websocket_frames", "round-trip-pieces", bytes([7]) + b"the quick brown fox jumps over the lazy dog" * 4)


for make in [control_frames, join_messages, stream_credit, target_names, allow_list,
             http_connect, socks5, token_file, trust_store, connect_answer, websocket_frames]:
    make()
