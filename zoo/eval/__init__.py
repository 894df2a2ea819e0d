"""Evaluations for layer-swap ablations: loss by position on long text, passkey retrieval, MQAR, efficiency."""
