"""Engine configs: the same Plan rendered for engines people already run.

One module per engine (llama.cpp, HF accelerate, SGLang, vLLM, ExFlow CSV, accelerator
memory maps); each writer validates the shape rules of its target.
"""
