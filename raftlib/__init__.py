"""raftlib: the Raft consensus protocol as a pure state machine, with the pieces to run it.

Importing `raftlib` gives the pure API only: it opens no file and imports neither gevent nor zmq. The runtime
(`raftlib.runtime`), the transport (`raftlib.transport`), the codec (`raftlib.codec`), the disk storage
(`raftlib.storage`) and the key/value server (`raftlib.server`) are imported by name when needed.
"""

from .core import (Config, NodeStatus, NotLeader, ProposalDropped, RaftNode, Ready, TargetRestoring,
                   UncommittedBoundExceeded)
from .interfaces import StateMachine, Storage, StoredState, Transport
from .log import RaftLog
from .memory_storage import MemoryStorage
from .messages import (
    AppendEntries,
    AppendEntriesReply,
    ConfChange,
    ConfChangeKind,
    Entry,
    EntryKind,
    HardState,
    InstallSnapshot,
    InstallSnapshotReply,
    Member,
    Membership,
    Message,
    ReadIndexReply,
    ReadIndexRequest,
    Removed,
    RequestVote,
    RequestVoteReply,
    Role,
    Snapshot,
    TimeoutNow,
)
from .progress import Progress, ProgressState, ProgressStatus

__all__ = [
    "AppendEntries", "AppendEntriesReply", "ConfChange", "ConfChangeKind", "Config", "Entry", "EntryKind",
    "HardState", "InstallSnapshot", "InstallSnapshotReply", "MemoryStorage", "Member", "Membership", "Message",
    "NodeStatus", "NotLeader", "Progress", "ProgressState", "ProgressStatus", "ProposalDropped", "RaftLog",
    "RaftNode", "ReadIndexReply", "ReadIndexRequest", "Ready", "Removed", "RequestVote", "RequestVoteReply", "Role",
    "Snapshot", "StateMachine", "Storage", "StoredState", "TargetRestoring", "TimeoutNow", "Transport",
    "UncommittedBoundExceeded",
]
