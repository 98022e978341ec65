"""Measurement: MACs/FLOPs/params, latency, profiles. Knows models and inputs, nothing of training."""

from prunekit.measure.macs import call_model, count_flops, count_macs, count_params

__all__ = ["call_model", "count_flops", "count_macs", "count_params"]
