"""Reads what a finished run left behind, from inside the cluster's network; prints JSON.

The multi-node test runs it in the head's namespace (only there are the store and service
reachable):

    python tests/deploy/probe.py --redis redis://10.200.0.1:6380/0 \
        --service http://10.200.0.1:8000 --run RUN

Output: `batches_by_rank` (the last batch sequence number the store accepted from each worker
rank), `records_by_rank` (loss records in the store's log per rank; a snapshot may have trimmed
the log, so the test keeps snapshots off), `run` (the
service's GET /v1/runs/RUN) and `samples` (GET /v1/runs/RUN/samples/ID for a few ids that each
rank scored, keyed "rank:id").
"""

from __future__ import annotations

import argparse
import json
import time

import httpx
import numpy as np
from hardbatch.services.store import LossStore


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--redis", required=True)
    p.add_argument("--service", required=True)
    p.add_argument("--run", required=True)
    p.add_argument("--per-rank", type=int, default=3, help="Sample ids to look up per rank.")
    p.add_argument("--settle-s", type=float, default=30.0,
                   help="How long to wait for the service to apply every record.")
    args = p.parse_args()

    store = LossStore.from_url(args.redis)
    records = store.log_records(args.run)
    ranks, counts = np.unique(records["rank"], return_counts=True)
    out: dict[str, object] = {
        "batches_by_rank": {str(r): s for r, s in store.run_info(args.run).ranks.items()},
        "records_by_rank": {str(int(r)): int(c) for r, c in zip(ranks, counts, strict=True)}}

    with httpx.Client(base_url=args.service, timeout=10) as http:
        deadline = time.monotonic() + args.settle_s
        while True:
            run = http.get(f"/v1/runs/{args.run}").json()
            if run.get("lag_records") == 0 and run.get("applied_records") == run.get("records"):
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        out["run"] = run
        samples = {}
        for r in ranks:
            ids = np.unique(records["sample_id"][records["rank"] == r])[: args.per_rank]
            for i in ids:
                resp = http.get(f"/v1/runs/{args.run}/samples/{int(i)}")
                samples[f"{int(r)}:{int(i)}"] = {"status": resp.status_code, **resp.json()}
        out["samples"] = samples
    print(json.dumps(out))


if __name__ == "__main__":
    main()
