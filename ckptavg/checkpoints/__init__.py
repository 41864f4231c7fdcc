"""What checkpoints are: each format (safetensors, `torch.save` archives, DCP folders) and each trainer's
layout turned into one typed index of tensors (`index.py`), which is all the engine reads.

    names.py              what the files are called (no torch: the Hub source picks files with it)
    layouts.py            where each trainer puts the steps of a run (no torch)
    index.py              the typed index: tensors, their dtype, shape and the byte ranges that hold them
    safetensors_header.py, torchsave.py, dcp.py   one module per encoding, each producing that index
    open.py               the detector: a path in, a `Checkpoint` out

Nothing is imported here, so that `names` and `layouts` stay free of torch.
"""
