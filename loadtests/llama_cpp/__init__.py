"""The llama.cpp peer of the load tests: finding the build, converting to GGUF, starting and addressing llama-server."""
