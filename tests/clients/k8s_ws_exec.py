#!/usr/bin/env python3
"""Drives one of the daemon's Exec URLs with the WebSocket client of PyPI's `kubernetes`
package (kubernetes.stream.ws_client.WSClient, on `websocket-client`), the client this project
did not write, and prints what came back as one JSON object for the e2e test to check.

usage: k8s_ws_exec.py URL [--protocol P] [--stdin TEXT] [--resize WxH]

--protocol  what to offer in Sec-WebSocket-Protocol (the client's default: v5 then v4)
--stdin     written to stdin, which is then closed (v5's close channel)
--resize    a terminal size sent before reading (the exec must have a tty)
"""

import argparse
import json
import sys

from kubernetes.client import Configuration
from kubernetes.stream.ws_client import RESIZE_CHANNEL, STDIN_CHANNEL, WSClient

TIMEOUT = 60


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--protocol")
    parser.add_argument("--stdin")
    parser.add_argument("--resize")
    args = parser.parse_args()

    headers = {"sec-websocket-protocol": args.protocol} if args.protocol else None
    url = args.url.replace("http://", "ws://", 1)
    client = WSClient(Configuration(), url, headers, capture_all=True)
    if args.resize:
        width, height = (int(n) for n in args.resize.split("x"))
        client.write_channel(RESIZE_CHANNEL, json.dumps({"Width": width, "Height": height}))
    if args.stdin is not None:
        client.write_stdin(args.stdin)
        client.close_channel(STDIN_CHANNEL)
    client.run_forever(timeout=TIMEOUT)
    if client.is_open():
        print(json.dumps({"error": "the session did not end in %d s" % TIMEOUT}))
        return 1
    result = {
        "subprotocol": client.subprotocol,
        "stdout": client.read_stdout(),
        "stderr": client.read_stderr(),
        "returncode": client.returncode,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
