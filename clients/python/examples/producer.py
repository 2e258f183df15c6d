"""Enqueues tasks and waits for their results.

    python examples/producer.py --server 127.0.0.1:50051 --queue emails hello world
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from leasehold_client import Client, types_pb2  # noqa: E402

FINISHED = {types_pb2.TASK_STATUS_COMPLETED, types_pb2.TASK_STATUS_FAILED, types_pb2.TASK_STATUS_CANCELLED}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--server", default="127.0.0.1:50051")
    parser.add_argument("--queue", default="emails")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("payloads", nargs="+")
    args = parser.parse_args()

    client = Client(args.server)
    ids = [client.enqueue(args.queue, payload.encode()).id for payload in args.payloads]
    deadline = time.monotonic() + args.timeout
    for task_id in ids:
        task = client.get_task(task_id)
        while task.status not in FINISHED and time.monotonic() < deadline:
            time.sleep(0.1)
            task = client.get_task(task_id)
        print("%s %s %s" % (task_id, types_pb2.TaskStatus.Name(task.status), task.result.decode(errors="replace")))


if __name__ == "__main__":
    main()
