"""Stand-ins for running a raftlib Runtime in one process: a transport with no peers and a state machine that
records what it applied."""

from raftlib.runtime import StateMachine


class NullTransport:
    def set_peers(self, addresses):
        pass

    def send(self, messages):
        pass


class Values(StateMachine):
    """Applies a command by appending it; the result is how many there are now."""

    def __init__(self):
        self.applied = []

    def apply(self, index, command):
        self.applied.append(command)
        return len(self.applied)

    def snapshot(self):
        return b""

    def restore(self, data):
        pass
