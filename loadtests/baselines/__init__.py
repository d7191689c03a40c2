"""Peer baselines for the load tests: small OpenAI-compatible servers on the same model and adapters as loraplex.

``python -m loadtests.baselines.<peft_swap|peft_mixed|merged> --model DIR --adapters-dir STORE --port P``
"""
