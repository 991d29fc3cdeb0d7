"""Benchmarks of TrainerEngine: `python -m bench.run_all` (CPU, see bench/run_all.py), `scripts/gpu_check.sh` (GPU)."""
