"""mpiinfer: bulk offline LLM inference on HPC clusters, launched with mpiexec / srun."""
__version__ = "0.1.0"
