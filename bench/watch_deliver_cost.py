#!/usr/bin/env python
"""The watching follower's CPU per delivery, in process (issue 14, fan-out): W watch streams of one prefix
(raftlib.server.watchstream.watch_stream behind a stand-in for pywsgi's handler, as tests/test_watch.py's
loopback_streams) on real loopback TCP connections whose other ends a second process drains; drives of E events
applied to the WatchHub one after the other, each once the sweep of the one before was written. The wake
(WatchHub._wake_some, which writes each waiting stream's frame itself) is timed with time.thread_time(): CPU,
so the figures hold on a shared machine better than wall time does. Then the kernel's floor: the same frames
sent with one plain non-blocking sendmsg per socket and nothing else. Bench only; asserts nothing.

    python bench/watch_deliver_cost.py -W 1000 --events 100 --drives 40 --repeat 5
    python bench/watch_deliver_cost.py --build /work/main ...   # the raftlib of another tree

Prints, per repeat: us of CPU per delivery in the wake (median over the drives), the floor's, and their
difference (the Python part); the loop's whole CPU per delivery (applying included); frames, and frames the
greenlets wrote (a send the socket did not take whole: the fallback).
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import os  # noqa: E402
import selectors  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402

import gevent  # noqa: E402


def reader(port: int, count: int) -> int:
    """The readers' process: `count` connections to 127.0.0.1:`port`, drained until each is closed; prints the
    bytes read. Plain sockets and a selector: the monkey's patches are not this process's concern (no greenlets)."""
    sel = selectors.DefaultSelector()
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    buf = bytearray(1 << 20)
    total, open_ = 0, count
    while open_:
        for key, _ in sel.select(timeout=30):
            try:
                n = key.fileobj.recv_into(buf)  # type: ignore[union-attr]
            except BlockingIOError:
                continue
            except OSError:
                n = 0
            if n:
                total += n
            else:
                sel.unregister(key.fileobj)
                key.fileobj.close()  # type: ignore[union-attr]
                open_ -= 1
    print(total, flush=True)
    return 0


def _took_all(parts) -> int:
    """A stand-in for a socket's sendmsg that takes every byte and sends none."""
    return sum(map(len, parts))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-W", "--watchers", type=int, default=1000)
    p.add_argument("--events", type=int, default=100, help="events a drive (one entry each, no yield between)")
    p.add_argument("--drives", type=int, default=40)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--value-size", type=int, default=100)
    p.add_argument("--build", help="import raftlib from this tree (default: this one)")
    p.add_argument("--reader", nargs=2, type=int, metavar=("PORT", "COUNT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.reader:
        return reader(*args.reader)
    sys.path.insert(0, os.path.abspath(args.build) if args.build else
                    os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from raftlib.server import watchstream
    from raftlib.server.metrics import Metrics
    from raftlib.server.store import Event
    from raftlib.server.watch import Filter, WatchHub

    import raftlib
    print(f"raftlib from {os.path.dirname(raftlib.__file__)}; load {os.getloadavg()}")
    for run in range(args.repeat):
        hub, metrics = WatchHub(), Metrics()
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(args.watchers)
        readers = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--reader",
                                    str(listener.getsockname()[1]), str(args.watchers)], stdout=subprocess.PIPE)
        conns, streams, greenlets = [], [], []
        for _ in range(args.watchers):
            conn, _ = listener.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as the edge's listener sets it
            handler = types.SimpleNamespace(socket=conn, rfile=conn.makefile("rb", -1), response_use_chunked=True,
                                            close_connection=False, server=types.SimpleNamespace(watching={}, busy={}))
            chunks = watchstream.watch_stream(hub, metrics, 0, Filter(prefix="fan/"), {"raftdzmq.handler": handler})
            first = next(chunks)  # pywsgi's to write, with the head
            conn.sendall(b"%x\r\n%s\r\n" % (len(first), first))
            conns.append(conn)
            streams.append(chunks)
            greenlets.append(gevent.spawn(next, chunks, None))
        listener.close()
        watchers = list(hub._by_prefix["fan/"])
        for _ in range(10_000):  # until every stream's greenlet took its socket: a bound in turns of the loop
            if all(w.deliver is not None for w in watchers):
                break
            gevent.sleep(0.001)
        writers = [w.deliver.__self__ for w in watchers]  # type: ignore[union-attr]

        def settled() -> bool:
            return not hub._waking and all(w.armed for w in writers)

        def wait_settled() -> None:
            for _ in range(100_000):  # a bound in turns of the loop
                if settled():
                    return
                gevent.sleep(0.0005)
            raise SystemExit("the streams never settled")

        wait_settled()
        wake_cpu = [0.0]
        wake_some = hub._wake_some

        def timed_wake_some() -> None:
            started = time.thread_time()
            wake_some()
            wake_cpu[0] += time.thread_time() - started

        hub._wake_some = timed_wake_some  # type: ignore[method-assign]
        value = b"v" * args.value_size
        index = 0

        def drives() -> tuple[list[float], list[float]]:
            """Per drive: the wake's CPU per delivery, and the loop's (applying included), in us."""
            nonlocal index
            wake, loop = [], []
            for _ in range(args.drives):
                wake_cpu[0] = 0.0
                wakes = hub.wakes
                loop_started = time.thread_time()
                for _ in range(args.events):
                    index += 1
                    hub.on_events((Event("put", f"fan/{index}", value, index, index),))
                    hub.applied(index)
                wait_settled()
                loop_cpu = time.thread_time() - loop_started
                delivered = hub.wakes - wakes
                wake.append(wake_cpu[0] / delivered * 1e6)
                loop.append(loop_cpu / delivered * 1e6)
            return wake, loop

        frames_before = sum(metrics.watch_delivery_seconds.counts)
        wakes_before = hub.wakes
        per_delivery, loop_per_delivery = drives()
        frames = sum(metrics.watch_delivery_seconds.counts) - frames_before
        wakes = hub.wakes - wakes_before
        frame = hub.sse(hub.read(index - args.events, Filter(prefix="fan/"))[0])
        parts = (b"%x\r\n" % len(frame), frame, b"\r\n")
        floor = []
        for _ in range(args.drives):  # the kernel's part: the same sends, nothing else
            gevent.sleep(0.02)  # the readers drain
            started = time.thread_time()
            for conn in conns:
                try:
                    conn._sock.sendmsg(parts)  # type: ignore[attr-defined]
                except OSError:
                    pass
            floor.append((time.thread_time() - started) / len(conns) * 1e6)
        # The Python part alone: the same wakes with each stream's non-blocking send a stand-in that takes it all.
        for writer in writers:
            writer._sendmsg = _took_all
        python_alone, _ = drives()
        for chunks, greenlet in zip(streams, greenlets):
            greenlet.kill()
            chunks.close()
        for conn in conns:
            conn.shutdown(socket.SHUT_RDWR)  # the handler's rfile holds the descriptor open: close alone waits for it
            conn.close()
        try:
            out, _ = readers.communicate(timeout=60)
        finally:
            if readers.poll() is None:
                readers.kill()
                readers.wait(10)
        wake, kernel = statistics.median(per_delivery), statistics.median(floor)
        print(f"run {run + 1}: {args.watchers} watchers x {args.drives} drives of {args.events} events "
              f"({len(frame):,} B a frame): wake {wake:.2f} us/delivery; Python alone (no send) "
              f"{statistics.median(python_alone):.2f}; sendmsg alone {kernel:.2f}; "
              f"loop {statistics.median(loop_per_delivery):.2f} us/delivery; "
              f"{wakes:,} wakes, {frames:,} frames written ({wakes - frames} not by the wake's send); "
              f"read {int(out or 0):,} B; load {os.getloadavg()[0]:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
