"""Causal-LM fine-tuning as a task beside classification: next-token loss with prompt and padding masked,
perplexity, greedy generation, and offline models (a tiny random LLaMA, SmolLM2-135M from a PyPI package).

Modules: ``data`` (formats, masking, packing, partition by group), ``model`` (loading and the SmolLM2 cache),
``train`` (loss, perplexity, generation), ``report`` (generations). The task plug-in that uses them is
:mod:`fedlora.tasks.causal_lm`.
"""
