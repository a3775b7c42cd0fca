"""Speed benchmarks of UTIO vs vanilla vLLM, their results format, and reports."""
