"""Pruning of decoder-only language models (Llama / Mistral / Qwen2 / GPT-2).

Structured width pruning (:mod:`~prunekit.pruning.llm.width`): SwiGLU/GELU MLP channels and whole GQA groups, scored
by ``auto`` (least-squares-aware greedy removal ``obs`` for MLP channels, VBP variance for GQA groups), variance,
fluctuation, magnitude, structured Wanda or random, with mean / least-squares compensation; key-value heads merged
keeping every query head (``kv_ratio``, :mod:`~prunekit.pruning.llm.kv_merge`); block reconstruction of each pruned
layer (:mod:`~prunekit.pruning.llm.reconstruct`, on by default when attention is pruned); the result reloads with
plain ``AutoModelForCausalLM.from_pretrained``. One decoder layer in memory at a time: ``prune_width_streaming``,
``prune_depth_streaming``, ``sparsify_streaming``.

Hidden-size pruning (:mod:`~prunekit.pruning.llm.hidden`, Llama / Mistral / Qwen2): residual-stream channels across
every RMSNorm, the embeddings and the LM head, scored by RMSNorm output activation, with an RMS correction.

Depth pruning (:mod:`~prunekit.pruning.llm.depth`): whole decoder layers removed by measured importance (angular
distance between a layer's input and output hidden states, or the calibration loss without it).

One size target (:mod:`~prunekit.pruning.llm.search`): ``prune_to_params`` solves ``target_params`` across MLP
width, heads, hidden size and depth over a few candidate shapes scored on held-out calibration loss.

Unstructured and N:M sparsity (:mod:`~prunekit.pruning.llm.sparse`): Wanda and SparseGPT block by block
(``prune_decoder``; also the ``wanda`` / ``sparsegpt`` methods of ``prunekit sparsify``).

Example:
    >>> from prunekit.pruning.llm import prune_width, save_pruned
    >>> report = prune_width(model, calib_ids, mlp_ratio=0.5)            # criterion auto, lstsq compensation
    >>> save_pruned(model, "pruned/", report)
"""

from prunekit.pruning.llm.arch import get_family, list_families
from prunekit.pruning.llm.criteria import get_criterion, list_criteria
from prunekit.pruning.llm.depth import DepthConfig, prune_depth
from prunekit.pruning.llm.hidden import prune_hidden
from prunekit.pruning.llm.search import TargetConfig, prune_to_params
from prunekit.pruning.llm.sparse import LLM_METHODS, DecoderSparsity, decoder_blocks, decoder_linears, prune_decoder
from prunekit.pruning.llm.stats import collect_inputs
from prunekit.pruning.llm.stream import prune_width_streaming
from prunekit.pruning.llm.stream_depth import prune_depth_streaming
from prunekit.pruning.llm.stream_sparse import sparsify_streaming
from prunekit.pruning.llm.width import WidthSettings, kept_count, prune_width, save_pruned, unwrap

__all__ = ["DepthConfig", "prune_depth", "LLM_METHODS", "DecoderSparsity", "decoder_blocks", "decoder_linears",
           "prune_decoder",
           "WidthSettings", "collect_inputs", "get_criterion", "get_family", "kept_count", "list_criteria",
           "list_families", "prune_hidden", "prune_to_params", "prune_width", "save_pruned", "TargetConfig", "unwrap",
           "prune_width_streaming", "prune_depth_streaming", "sparsify_streaming"]
