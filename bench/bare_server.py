"""The reference ceiling: a bare Bottle app on gevent's WSGI server that stores values in a dict, with the same
routes as raftdzmq and the same TCP_NODELAY listener. No Raft, no disk. Usage: python bench/bare_server.py PORT"""

from gevent import monkey

monkey.patch_all()

import socket  # noqa: E402
import sys  # noqa: E402

import bottle  # noqa: E402
import gevent  # noqa: E402
import gevent.pywsgi  # noqa: E402

app = bottle.Bottle()
data: dict[str, bytes] = {}


@app.post("/db/<key:path>")
def set_key(key):
    data[key] = bottle.request.body.read()
    return ""


@app.get("/db/<key:path>")
def get_key(key):
    value = data.get(key)
    if value is None:
        return bottle.HTTPResponse("no such key\n", 404)
    return value


if __name__ == "__main__":
    listener = gevent.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    listener.bind(("127.0.0.1", int(sys.argv[1])))
    listener.listen(1024)
    gevent.pywsgi.WSGIServer(listener, app, log=None).serve_forever()
