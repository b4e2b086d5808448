"""Evaluation of KV-cache quantizers against PM-KVQ at equal bytes."""
