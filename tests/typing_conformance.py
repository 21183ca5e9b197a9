"""Checked by mypy, never run (tests/test_typing.py): each implementation of a raftlib seam conforms to its
`typing.Protocol` by type. A function that returns its argument as the protocol fails to type-check as soon as the
implementation's methods or their signatures drift from the protocol's."""

from __future__ import annotations

from raftlib import MemoryStorage, RaftNode, StateMachine, Storage, Transport
from raftlib.runtime import Runtime
from raftlib.server.api import NodeView, Raft
from raftlib.server.store import KeyValueStore
from raftlib.storage import DiskStorage
from raftlib.transport import ZmqTransport
from runtime_fakes import NullTransport, Values


def disk_storage(s: DiskStorage) -> Storage:
    return s


def memory_storage(s: MemoryStorage) -> Storage:
    return s


def zmq_transport(t: ZmqTransport) -> Transport:
    return t


def null_transport(t: NullTransport) -> Transport:
    return t


def values(v: Values) -> StateMachine:
    return v


def runtime(node: RaftNode, storage: DiskStorage, transport: ZmqTransport, state_machine: Values) -> Runtime:
    return Runtime(node, storage, transport, state_machine)


def key_value_store(s: KeyValueStore) -> StateMachine:
    return s


def runtime_for_the_routes(r: Runtime) -> Raft:
    return r


def node_for_the_routes(n: RaftNode) -> NodeView:
    return n
