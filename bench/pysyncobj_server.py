"""PySyncObj as a reference for the bench: a replicated dict (ReplDict) behind a threaded HTTP server with the same
/db/KEY routes. Writes wait for commit (sync=True). PySyncObj does not fsync. Not part of raftdzmq.
Usage: python bench/pysyncobj_server.py SELF_ADDR PARTNER_ADDRS(comma separated) HTTP_PORT"""

import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from pysyncobj import SyncObj, SyncObjConf
from pysyncobj.batteries import ReplDict

self_addr, partners, http_port = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])
store = ReplDict()
node = SyncObj(self_addr, partners, consumers=[store], conf=SyncObjConf(dynamicMembershipChange=False))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _answer(self, status: int, body: bytes = b"") -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/leader":
            return self._answer(200, b"yes" if node._isLeader() else b"no")
        value = store.get(self.path[4:].split("?")[0])
        self._answer(404 if value is None else 200, value or b"")

    def do_POST(self):
        value = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        try:
            store.set(self.path[4:], value, sync=True, timeout=5)
            self._answer(200)
        except Exception as e:
            self._answer(503, str(e).encode())


ThreadingHTTPServer(("127.0.0.1", http_port), Handler).serve_forever()
