"""Ask the ipcprobe model (gRPC stream) for its measurements and print them: client.py [HOST:PORT]."""

import json
import queue
import sys

import numpy as np
import tritonclient.grpc as grpcclient


def main() -> None:
    url = sys.argv[1] if len(sys.argv) > 1 else "localhost:18301"
    answers: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    x = grpcclient.InferInput("X", [1], "INT32")
    x.set_data_from_numpy(np.array([1], dtype=np.int32))
    client.async_stream_infer("ipcprobe", [x])
    try:
        while True:
            result, error = answers.get(timeout=300)
            if error is not None:
                raise SystemExit(f"ipcprobe failed: {error}")
            value = result.as_numpy("Y")[0]
            if value != b"x":
                print(json.dumps(json.loads(value), indent=1))
                return
    finally:
        client.stop_stream()


if __name__ == "__main__":
    main()
