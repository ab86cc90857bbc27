"""The decoder-only family: Llama (1-3.x), Qwen2, Mistral.
"""
