"""Pruning of decoder-only language models (Llama, Qwen2, GPT-2 style transformers causal LMs).

``sparse``: unstructured and N:M sparsity block by block with Wanda and SparseGPT (``prune_decoder``; also the
``wanda`` / ``sparsegpt`` methods of ``prunekit sparsify``).
"""

from prunekit.pruning.llm.sparse import LLM_METHODS, DecoderSparsity, decoder_blocks, decoder_linears, prune_decoder

__all__ = ["LLM_METHODS", "DecoderSparsity", "decoder_blocks", "decoder_linears", "prune_decoder"]
