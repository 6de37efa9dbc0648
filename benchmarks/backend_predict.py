"""Latency and concurrency of the ML backend's ``/predict`` over real HTTP (werkzeug, threaded).

Builds a small run on the synthetic default (1-epoch model: only the serving path matters), serves it on
127.0.0.1 and measures: a batch of 50 known tasks (``predict_known_p50_ms``), one image the run has never
seen sent as a data URI (``predict_unseen_p50_ms``), and 50 concurrent requests (``concurrent_errors``).

    python benchmarks/backend_predict.py --out bench-out/ml_backend.json
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from runs import attention_run
from werkzeug.serving import make_server

from ml_backend._wsgi import create_app
from ml_backend.model import SlimAttentionBackend
from pipeline.core.io import atomic_write_json
from pipeline.core.store import AnnotationStore
from pipeline.core.synth import SynthSpec
from pipeline.labelstudio.server import free_port


def build_run(work: Path) -> Path:
    """A 1-epoch run on the synthetic default, with the run id that tasks made by ``push`` carry."""
    run = attention_run(work / "run", work / "data", SynthSpec(), epochs=1)
    store = AnnotationStore(run.labels_path)
    with store.transaction() as db:
        store.set_meta("run_id", store.get_meta("run_id") or "benchmark", db)
    store.close()
    return run.root


def p50_ms(post, body: dict, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        response = post(body)
        times.append((time.perf_counter() - start) * 1000)
        response.raise_for_status()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="bench-out/ml_backend", help="run goes here")
    parser.add_argument("--out", default="bench-out/ml_backend.json", help="JSON result file")
    parser.add_argument("--repeats", type=int, default=20, help="requests per latency figure")
    args = parser.parse_args()
    run = build_run(Path(args.work))
    backend = SlimAttentionBackend(run).setup()
    server = make_server("127.0.0.1", free_port(9090), create_app(backend), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/predict"
    run_id = AnnotationStore(run / "labels.sqlite").get_meta("run_id")
    known = {"tasks": [{"id": i, "data": {"image_id": int(image_id), "run_id": run_id}}
                       for i, image_id in enumerate(backend.arrays.index[:50])]}
    buffer = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(buffer, "PNG")
    unseen = {"tasks": [{"id": 1, "data": {"image": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()}}]}
    with httpx.Client(timeout=60) as client:
        def post(body: dict) -> httpx.Response:
            return client.post(url, json=body)

        known_ms, unseen_ms = p50_ms(post, known, args.repeats), p50_ms(post, unseen, args.repeats)
        bodies = [known if i % 2 else unseen for i in range(50)]
        start = time.perf_counter()
        with ThreadPoolExecutor(50) as pool:
            statuses = list(pool.map(lambda body: httpx.post(url, json=body, timeout=120).status_code, bodies))
        concurrent_s = time.perf_counter() - start
    server.shutdown()
    result = {"predict_known_p50_ms": round(known_ms, 1), "known_batch": 50,
              "predict_unseen_p50_ms": round(unseen_ms, 1), "concurrent_requests": 50,
              "concurrent_errors": sum(status != 200 for status in statuses),
              "concurrent_wall_s": round(concurrent_s, 2), "server": "werkzeug threaded, 127.0.0.1"}
    atomic_write_json(Path(args.out), result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
