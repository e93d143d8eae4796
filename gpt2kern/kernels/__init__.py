"""The kernels as torch ops (csrc/ compiled into gpt2kern._C) and the weight formats they read."""
