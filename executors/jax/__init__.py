"""The JAX worker: model runner, Llama model, paged attention and sampler in jax.numpy."""
