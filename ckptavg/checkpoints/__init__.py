"""What checkpoints are: each format (safetensors, `torch.save` archives, DCP folders) and each trainer's
layout turned into one typed index of tensors (`index.py`), which is all the engine reads.

    names.py              what the files are called (no torch: the Hub source picks files with it)
    layouts.py            where each trainer puts the steps of a run (no torch)
    index.py              the typed index: tensors, their dtype, shape and the byte ranges that hold them
    safetensors_header.py, torchsave.py, dcp.py   one module per encoding: it reads (every check made),
                          indexes and writes its format, and declares it as its `FORMAT`
    formats.py            the registry of those `FORMAT`s (adding a format: one module, one line there)
    outputs.py            what a format declares, and how output files are framed
    pickles.py            pickles read into records by an interpreter that executes nothing
    confine.py            every file a checkpoint's metadata names stays inside the checkpoint
    open.py               the detector: a path in, a `Checkpoint` out

Nothing is imported here, so that `names` and `layouts` stay free of torch.
"""
