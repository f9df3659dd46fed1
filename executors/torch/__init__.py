"""The torch worker: model runner, CUDA step path and graphs, kernels, layers, models, sampling, speculative decoding."""
