#!/usr/bin/env python3
"""Drives one of the daemon's PortForward URLs with the port-forward client of PyPI's
`kubernetes` package (kubernetes.stream.ws_client.PortForward: kubelet's WebSocket
`v4.channel.k8s.io` protocol, ports in the query) and prints what came back as JSON.

usage: k8s_ws_portforward.py URL ECHO_PORT... --refused PORT

Each echo port gets 256 KiB that must come back identical; the refused port must end with a
message on its error channel.
"""

import argparse
import json
import socket
import sys

from kubernetes.client import Configuration
from kubernetes.stream.ws_client import PortForward, create_websocket

TIMEOUT = 60
SIZE = 256 * 1024


def payload(seed):
    return bytes((i * 31 + seed) % 256 for i in range(SIZE))


def echo(sock, data):
    sock.settimeout(TIMEOUT)
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("ports", type=int, nargs="+")
    parser.add_argument("--refused", type=int, required=True)
    args = parser.parse_args()

    ports = args.ports + [args.refused]
    url = "%s?ports=%s" % (args.url.replace("http://", "ws://", 1), ",".join(map(str, ports)))
    websocket = create_websocket(Configuration(), url)
    forward = PortForward(websocket, ports)
    result = {"subprotocol": websocket.getheaders().get("sec-websocket-protocol"), "echoed": {}}
    for seed, port in enumerate(args.ports):
        data = payload(seed)
        result["echoed"][str(port)] = echo(forward.socket(port), data) == data
    refused = forward.socket(args.refused)
    refused.settimeout(TIMEOUT)
    result["refused_eof"] = refused.recv(1) == b""
    result["refused_error"] = forward.error(args.refused)
    forward.close()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
