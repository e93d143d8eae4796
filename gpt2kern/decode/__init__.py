"""The decode engines: gpt2kern.generate (the C++ engine on CPU) and the CUDA-graph decoder."""
