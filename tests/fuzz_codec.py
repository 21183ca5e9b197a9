"""Coverage-guided fuzzing of the wire codec with atheris (when it installs: pip install atheris):

    python tests/fuzz_codec.py -atheris_runs=2000000          # or -max_total_time=600

Any exception other than CodecError from decoding is a crash that atheris reports with the input.
The seeds are real frames, so mutations start from well-formed messages."""

import sys

import atheris

with atheris.instrument_imports():
    from raftlib import codec


def one_input(data: bytes) -> None:
    try:
        messages = codec.decode_batch(data)
    except codec.CodecError:
        return
    # What decodes must encode again to a frame that decodes to the same messages.
    assert codec.decode_batch(codec.encode_batch(messages)) == messages


def seeds() -> list[bytes]:
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from test_codec import SAMPLES

    return [codec.encode_batch([m]) for m in SAMPLES] + [codec.encode_batch(SAMPLES)]


if __name__ == "__main__":
    import os
    import tempfile

    corpus = tempfile.mkdtemp(prefix="raftdzmq-fuzz-")
    for i, frame in enumerate(seeds()):
        with open(os.path.join(corpus, f"seed{i}"), "wb") as f:
            f.write(frame)
    atheris.Setup(sys.argv + [corpus], one_input)
    atheris.Fuzz()
