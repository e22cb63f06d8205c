"""train: what train.py runs (docs/training.md).

    config.py       TrainConfig: every setting once, with its flag's help and check; the parser is built from it
    data.py         datasets: Dolly-15k, JSONL, text; packing and batches
    schedule.py     the learning-rate schedules
    distributed.py  torchrun and FSDP
    state.py        the run directory on disk: run.json, metrics, resumable states, the loss plot
    loop.py         the training loop over a Run
"""
