"""raftlib.server: the key/value server that `raftdzmq.py` runs, one concern a module (ARCHITECTURE.md has the map).

    store.py     the key/value state machine: pure and deterministic (no gevent, Bottle, zmq or clock)
    admin.py     admin request signatures and the cluster secret: pure, importable without monkey-patching
    metrics.py   the Prometheus metrics of GET /metrics
    health.py    the checks of GET /livez and GET /readyz: pure (the time and the status passed in)
    edge.py      the HTTP edge on gevent's WSGI server: strict framing, limits, connections, turns of the loop
    api.py       the HTTP application: every group of routes installed behind one callback each (CSRF, outcomes)
    routes_shared.py  what the routes share: the Api, the one mapping from failures to answers, request checks
    routes_*.py  the HTTP routes as module-level functions, a module a concern: kv, txn, watch, leases, cluster, ops
    node.py      the wiring: storage, transport, runtime and store; joining a cluster; a graceful stop
    nodestart.py a node's identity and first start, -force-new-cluster: over DiskStorage, no gevent

Rules: no module here monkey-patches (the command does, before it imports any of them); importing this package
imports none of its modules.
"""
