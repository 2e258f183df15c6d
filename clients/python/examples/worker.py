"""A worker that upper-cases each payload.

    python examples/worker.py --server 127.0.0.1:50051 --queue emails
"""

import argparse
import os
import socket
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from leasehold_client import Client, TaskFailed, Worker  # noqa: E402


def shout(task):
    if not task.payload:
        raise TaskFailed("empty payload", retryable=False)
    return task.payload.upper()


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--server", default="127.0.0.1:50051")
    parser.add_argument("--queue", action="append", default=[])
    parser.add_argument("--name", default="%s-%d" % (socket.gethostname(), os.getpid()))
    parser.add_argument("--tasks", type=int, default=1 << 62, help="stop after this many tasks")
    args = parser.parse_args()

    worker = Worker(Client(args.server), args.name, args.queue or ["emails"], shout)
    worker.start()
    try:
        for outcome in worker.run(args.tasks):
            print(outcome, flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        worker.stop()


if __name__ == "__main__":
    main()
