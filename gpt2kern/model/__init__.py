"""The drop-in model: GPT-2's body on the kernels, installed on Hugging Face's GPT-2 classes."""
