"""Training trajectories: where each step's checkpoint lives (sources, hub, pythia), which windows to
average and when to fetch and evict (schedule), and the run that carries that out (run)."""
