import json


def load_plan():
    with checkpoints.plan.get().output[0].open() as f:
        return json.load(f)


def batch_ids(wildcards):
    return sorted(load_plan()["batches"])


def read_json_file(path):
    with open(path) as f:
        return json.load(f)
