"""Instruction data: records, partitions, prompts and token batches."""
