"""End to end against a running server (started by tests/it/python.rs): a producer enqueues, the
Python worker processes, results are checked, and a superseded claim is recognised by its
ErrorInfo reason. Prints one JSON line with what it saw; exits non-zero on any mismatch."""

import json
import os
import sys
import uuid

import grpc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from leasehold_client import Client, TaskFailed, Worker, error_reason, types_pb2, worker_pb2  # noqa: E402


def shout(task):
    if task.payload == b"reject":
        raise TaskFailed("rejected on purpose", retryable=False)
    return task.payload.upper()


def main(server):
    client = Client(server)
    worker = Worker(client, "python-e2e", ["py"], shout, wait_seconds=1.0)
    worker.start()

    ids = [client.enqueue("py", payload).id for payload in (b"alpha", b"beta", b"reject")]
    outcomes = worker.run(len(ids))
    assert sorted(outcomes) == ["completed", "completed", "failed"], outcomes
    results = {task_id: client.get_task(task_id) for task_id in ids}
    assert results[ids[0]].result == b"ALPHA", results[ids[0]]
    assert results[ids[1]].status == types_pb2.TASK_STATUS_COMPLETED
    assert results[ids[2]].status == types_pb2.TASK_STATUS_FAILED, results[ids[2]]

    # A superseded claim: the server answers FAILED_PRECONDITION with an ErrorInfo reason, and
    # the worker drops the task instead of failing it.
    contested = client.enqueue("py", b"contested").id
    claimed = worker.claim()[0]
    try:
        client.worker.StartTask(worker_pb2.StartTaskRequest(task_id=contested, claim_token=str(uuid.uuid4())))
        raise AssertionError("a forged token was accepted")
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error
        superseded_reason = error_reason(error)
    assert superseded_reason == "CLAIM_SUPERSEDED", superseded_reason
    forged = worker_pb2.ClaimTaskResponse().tasks.add()
    forged.CopyFrom(claimed)
    forged.claim_token = str(uuid.uuid4())
    dropped = worker.process(forged)
    assert dropped == "dropped:CLAIM_SUPERSEDED", dropped
    assert client.get_task(contested).status == types_pb2.TASK_STATUS_DISPATCHED, "dropped, not failed"
    assert worker.process(claimed) == "completed"

    worker.stop()
    print(json.dumps({"completed": ids[:2], "failed": ids[2:], "superseded_reason": superseded_reason,
                      "contested": contested}))


if __name__ == "__main__":
    main(sys.argv[1])
