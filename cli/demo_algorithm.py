"""The demo's algorithm: summary statistics of every numeric column of every input CSV.

It runs inside the sandbox with only the standard library, reads /data/inputs as the reference
system lays it out, prints its progress, and writes /data/outputs/summary.json."""

import csv
import json
import math
import os
import time

inputs = os.environ.get("INPUTS", "/data/inputs")
outputs = os.environ.get("OUTPUTS", "/data/outputs")
summary = {}
for dataset_id in json.loads(os.environ.get("DIDS", "[]")):
    folder = os.path.join(inputs, dataset_id)
    for name in sorted(os.listdir(folder), key=int):
        with open(os.path.join(folder, name), newline="") as f:
            rows = list(csv.reader(f))
        header, body = rows[0], rows[1:]
        print(
            f"dataset {dataset_id[:8]} file {name}: {len(body)} rows, columns {header}", flush=True
        )
        for column, title in enumerate(header):
            values = [float(row[column]) for row in body]
            mean = sum(values) / len(values)
            summary[title] = {
                "count": len(values),
                "mean": mean,
                "min": min(values),
                "max": max(values),
                "stdev": math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)),
            }
            print(f"  column {title}: mean {mean:.4f}", flush=True)
            time.sleep(0.2)  # slow enough that the log can be watched arriving live
with open(os.path.join(outputs, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2, sort_keys=True)
print("wrote summary.json", flush=True)
