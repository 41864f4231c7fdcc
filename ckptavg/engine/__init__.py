"""One weighted average of checkpoints: index the inputs (tensors), plan every output tensor (plan),
read, accumulate and write them overlapped (pipeline, writer), and record it (average)."""
